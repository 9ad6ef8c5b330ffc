"""The tuner runs on edge devices that have torch (CPU), grpcio, zstandard, numpy and safetensors, nothing more:
importing any tuner module or client, and running `mist --help`, must load no timm, torchvision, extractor code
or torch._dynamo. Checked in a fresh interpreter, since this test process may have loaded anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("timm", "torchvision", "services.extractor", "torch._dynamo")
CLIENT_MODULES = (
    "services.common.clients.extractor",
    "services.common.clients.registry",
    "services.common.clients.channel",
    "services.common.wire.codec",
    "services.common.wire.gather_modes",
    "services.common.wire.edge_spec",
    "services.tuner.synthetic",
)

_PROBE = textwrap.dedent("""
    import contextlib, importlib, io, json, pkgutil, sys
    FORBIDDEN = {forbidden!r}

    def loaded():
        return sorted(n for n in sys.modules if any(n == f or n.startswith(f + ".") for f in FORBIDDEN))

    from services.tuner import cli
    with contextlib.redirect_stdout(io.StringIO()) as help_text:
        codes = [cli.main(argv, env={{}}) for argv in (["--help"], ["tune", "--help"], ["predict", "--help"],
                                                       ["evaluate", "--help"], ["demo", "--help"])]
    after_help = {{"loaded": loaded(), "torch": "torch" in sys.modules, "codes": codes,
                  "help_chars": len(help_text.getvalue())}}
    import services.tuner
    modules = sorted(m.name for m in pkgutil.iter_modules(services.tuner.__path__, "services.tuner."))
    for name in modules + {clients!r}:
        importlib.import_module(name)
    after_imports = loaded()
    import services.extractor.backbone  # the control: the probe does see a forbidden import
    print(json.dumps({{"help": after_help, "modules": modules, "after_imports": after_imports,
                      "control": loaded()}}))
""")


def run_probe() -> dict:
    code = _PROBE.format(forbidden=FORBIDDEN, clients=list(CLIENT_MODULES))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tuner_modules_clients_and_mist_help_import_no_backbone_code():
    # Execute
    probe = run_probe()

    # Assert: every tuner module was imported, none pulled in a forbidden module
    assert {
        "services.tuner.tune",
        "services.tuner.predict",
        "services.tuner.cli",
        "services.tuner.servicer",
        "services.tuner.server",
        "services.tuner.demo",
        "services.tuner.training",
    } <= set(probe["modules"])
    assert probe["after_imports"] == []
    # ... `mist --help` (and every subcommand's) printed help without torch, let alone timm
    assert probe["help"] == {
        "loaded": [],
        "torch": False,
        "codes": [0, 0, 0, 0, 0],
        "help_chars": probe["help"]["help_chars"],
    }
    assert probe["help"]["help_chars"] > 2000
    # ... and the probe is not blind: importing the extractor's backbone code shows up
    assert "timm" in probe["control"] and "services.extractor.backbone" in probe["control"]


def test_the_device_agent_and_mist_agent_help_need_no_torch():
    # A predict-only device (`.[device]`, no torch installed) runs `mist agent`: nothing on its path may import torch.
    code = (
        "import sys, contextlib, io\n"
        "import services.tuner.agent, services.tuner.predict, services.tuner.edge_numpy\n"
        "from services.tuner import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    codes = [cli.main(argv, env={}) for argv in (['agent', '--help'], ['reproduce', 'vtab', '--help'])]\n"
        "print(codes, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[0, 0] False"
