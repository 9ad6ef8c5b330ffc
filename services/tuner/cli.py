"""`mist`: the command line of the suite for people and scripts (tune, predict, evaluate, registry, demo).

    mist tune --task shapes --data var/demo/data --extractor 127.0.0.1:50051 --registry 127.0.0.1:50052 \\
        [--k auto|N] [--codec i8-zstd] [--epochs 30 --batch-size 32 --lr 1e-3 --weight-decay 1e-4 --seed 0] \\
        [--alias production] [--json]
    mist predict --task shapes [--version N | --alias production] IMAGE_OR_FOLDER...     # JSON lines
    mist evaluate --task shapes [--version N | --alias A] --data DIR [--split auto|all|train|val|test]
    mist registry ...                                                                    # see mist registry --help
    mist demo                                                                            # the whole story locally

Every flag also reads MIST_<FLAG> (e.g. --batch-size: MIST_BATCH_SIZE; the flag wins). Progress goes to stderr,
results to stdout. Exit codes: 0 done; 1 refused or failed (one line `mist tune: error: CODE: message`);
2 usage (a bad flag or value); 130 interrupted. Importing this module loads neither torch nor any server code:
`mist --help` is instant and the commands import what they need.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from services.common.config import env_name, flag_name
from services.common.errors import InvalidArgumentError, MistError
from services.tuner.config import DEFAULT_EXTRACTOR, DEFAULT_REGISTRY, DEFAULT_TIMEOUT_S
from services.tuner.memory import limit_heap_growth

PROG = "mist"
DEFAULT_CACHE_DIR = "~/.cache/mist/registry"  # pulled weights by sha256, shared by predict and evaluate
_TRUE, _FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})


class UsageError(Exception):
    """A bad flag, value or variable: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------------------------- flags


def _k_value(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected 'auto' or an integer, got {text!r}") from None


def _optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("", "auto", "default") else int(text)


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low not in _TRUE | _FALSE:
        raise ValueError(f"expected true/false (or 1/0, yes/no, on/off), got {text!r}")
    return low in _TRUE


@dataclass(frozen=True)
class Flag:
    """One command-line flag with its MIST_* variable, its type and its default."""

    name: str  # dest; --name-with-dashes and MIST_NAME_IN_CAPS derive from it
    help: str
    type: Callable[[str], Any] = str  # converts flag and variable text alike; ValueError = usage error
    default: Any = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    boolean: bool = False  # --name / --no-name
    required: bool = False
    shown: str | None = None  # how --help shows the default, when not str(default)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        shown = "required" if self.required else f"default: {self._shown_default()}"
        help_text = f"{self.help} [env {env_name(self.name)}; {shown}]".replace("%", "%%")
        if self.boolean:
            parser.add_argument(
                flag_name(self.name),
                dest=self.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            return
        parser.add_argument(
            flag_name(self.name),
            dest=self.name,
            type=self._parse,
            default=argparse.SUPPRESS,
            metavar=self.metavar or ("{" + ",".join(self.choices) + "}" if self.choices else None),
            help=help_text,
        )

    def _shown_default(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.boolean:
            return "true" if self.default else "false"
        return "none" if self.default is None else str(self.default)

    def _parse(self, text: str) -> Any:
        if self.choices is not None and text not in self.choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(self.choices)}, got {text!r}")
        try:
            return self.type(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error) or f"invalid value {text!r}") from None

    def resolve(self, args: argparse.Namespace, env: Mapping[str, str]) -> None:
        """Fill the value from the variable, else the default, when the flag was not given."""
        if hasattr(args, self.name):
            return
        variable = env_name(self.name)
        if variable in env:
            try:
                value = _bool(env[variable]) if self.boolean else self._parse(env[variable])
            except (ValueError, argparse.ArgumentTypeError) as error:
                raise UsageError(f"{variable}: {error}") from None
        elif self.required:
            raise UsageError(f"{flag_name(self.name)} is required (or set {variable})")
        else:
            value = self.default
        setattr(args, self.name, value)


CONNECTION = (
    Flag("extractor", "mist-extractor address", default=DEFAULT_EXTRACTOR, metavar="HOST:PORT"),
    Flag("registry", "mist-registry address", default=DEFAULT_REGISTRY, metavar="HOST:PORT"),
    Flag("token", "registry bearer token; prefer --token-file: flags show in `ps`", metavar="TOKEN"),
    Flag("token_file", "file holding the registry bearer token", metavar="PATH"),
    Flag("extractor_token_file", "file holding the extractor's bearer token, when it checks tokens", metavar="PATH"),
    Flag("tls", "TLS to both servers with the system's CAs", type=_bool, default=False, boolean=True),
    Flag("tls_ca", "PEM CA bundle that signed the servers (implies TLS)", metavar="PATH"),
    Flag("client_cert", "PEM client certificate for mutual TLS", metavar="PATH"),
    Flag("client_key", "PEM key of --client-cert", metavar="PATH"),
    Flag("server_name", "name on the servers' certificates when it differs from HOST", metavar="NAME"),
    Flag(
        "cache_dir",
        "local cache of pulled weights (by sha256); '' keeps them in memory",
        default=DEFAULT_CACHE_DIR,
        metavar="DIR",
    ),
    Flag("timeout_s", "deadline of each registry call", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS"),
    Flag("max_in_flight", "images sent to the extractor and not yet answered", type=int, default=32, metavar="N"),
)
OUTPUT = (
    Flag(
        "progress",
        "progress on stderr: a bar on a terminal (auto), log lines, or nothing",
        default="auto",
        choices=("auto", "bar", "log", "quiet"),
    ),
    Flag(
        "quiet",
        "no progress and no log lines below warnings (same as --progress quiet)",
        type=_bool,
        default=False,
        boolean=True,
    ),
    Flag(
        "log_level",
        "least severe log line shown on stderr",
        default="info",
        choices=("debug", "info", "warning", "error"),
    ),
)
THREADS = (
    Flag("threads", "torch threads for training and inference; 0 = every CPU", type=int, default=0, metavar="N"),
)
VERSION_REF = (
    Flag("version", "version number to use (default: the alias, else the latest)", type=int, metavar="N"),
    Flag("alias", "alias to use, e.g. production", metavar="NAME"),
)
TUNE = (
    Flag("task", "registry task; created on success when it does not exist", required=True, metavar="NAME"),
    Flag(
        "data",
        "ImageFolder tree DIR/<class>/..., split folders DIR/{train,val,test}/<class>/... or a CSV "
        "manifest path,label[,split]",
        required=True,
        metavar="PATH",
    ),
    Flag(
        "k",
        "gather depth, or auto: the best of N/4, N/2, 3N/4, N on the val split",
        type=_k_value,
        shown="auto",
        metavar="auto|N",
    ),
    Flag(
        "codec", "feature codec, e.g. i8-zstd, f16-zstd, f32-none (default: the task's, else i8-zstd)", metavar="NAME"
    ),
    Flag("epochs", "training epochs of the final run", type=int, default=30, metavar="N"),
    Flag(
        "k_search_epochs",
        "epochs per candidate with --k auto (default: a fifth of --epochs, at least 2)",
        type=_optional_int,
        metavar="N",
    ),
    Flag("batch_size", "images per optimizer step", type=int, default=32, metavar="N"),
    Flag("lr", "AdamW peak learning rate (cosine schedule after a linear warm-up)", type=float, default=1e-3),
    Flag("weight_decay", "AdamW decoupled weight decay (weight matrices only)", type=float, default=1e-4),
    Flag("warmup_epochs", "linear warm-up epochs (default: 10% of --epochs)", type=_optional_int, metavar="N"),
    Flag(
        "seed",
        "seed of the initialisation, the batch order and the split: same inputs, same weights",
        type=int,
        default=0,
        metavar="N",
    ),
    Flag("val_fraction", "share of each class's unsplit images kept for validation", type=float, default=0.2),
    Flag("test_fraction", "share of each class's unsplit images kept for the test score", type=float, default=0.0),
    Flag("num_blocks", "edge network blocks M (default: the task's, else 4)", type=int, metavar="M"),
    Flag("rank", "edge network rank r (default: the task's, else min(16, D))", type=int, metavar="R"),
    Flag("heads", "attention heads in the rank-r space (default: the task's, else 1)", type=int, metavar="N"),
    Flag("pooling", "edge network pooling (default: the task's, else cls)", choices=("cls", "mean")),
    Flag("alias", "move this alias (e.g. production) to the new version on success", metavar="NAME"),
    Flag("description", "description of the task when this tune creates it", default=""),
    Flag(
        "force",
        "push even when the task gained a newer version during this tune",
        type=_bool,
        default=False,
        boolean=True,
    ),
    Flag("json", "print the result as JSON on stdout", type=_bool, default=False, boolean=True),
)
PREDICT = (
    Flag("task", "registry task", required=True, metavar="NAME"),
    *VERSION_REF,
    Flag("top_k", "classes listed per image, most probable first", type=int, default=5, metavar="N"),
)
EVALUATE = (
    Flag("task", "registry task", required=True, metavar="NAME"),
    *VERSION_REF,
    Flag(
        "data",
        "labelled images: DIR/<class>/..., DIR/{train,val,test}/<class>/... or a manifest",
        required=True,
        metavar="PATH",
    ),
    Flag(
        "split",
        "which images to score: test when there is a test split (auto), every image (all), or one split",
        default="auto",
        choices=("auto", "all", "train", "val", "test"),
    ),
    Flag("json", "print the report as JSON on stdout", type=_bool, default=False, boolean=True),
)
DEMO = (
    Flag("workdir", "where the demo keeps its dataset, registry database and logs", default="var/demo", metavar="DIR"),
    Flag("epochs", "training epochs of the final run", type=int, default=30, metavar="N"),
    Flag("seed", "seed of the dataset, the split and the training", type=int, default=0, metavar="N"),
    Flag(
        "worker", "also show the tuner worker: predict through its gRPC Predict", type=_bool, default=True, boolean=True
    ),
    # One thread: the demo's edge network is small, and on a shared 2-core machine two torch threads contending
    # with the servers ran 8-20x slower than one (measured: 620 against 35-75 images/s at load average 6).
    Flag("threads", "torch threads for training (0 = every CPU)", type=int, default=1, metavar="N"),
)
# Every MIST_* variable `mist` reads; the mist-tuner worker accepts them in its environment too.
CLI_ENV: tuple[str, ...] = tuple(
    sorted({env_name(f.name) for flags in (CONNECTION, OUTPUT, THREADS, TUNE, PREDICT, EVALUATE, DEMO) for f in flags})
)


# ---------------------------------------------------------------------------------------------- commands


def _checked(build: Callable[[], Any]) -> Any:
    """Settings built from flags: a value they refuse is a usage error (exit 2), caught before any network call."""
    try:
        return build()
    except InvalidArgumentError as error:
        raise UsageError(f"{PROG}: error: {error}") from None


def _endpoints(args: argparse.Namespace) -> Any:
    from services.tuner.config import Endpoints, read_token_file

    return Endpoints(
        extractor=args.extractor, registry=args.registry,
        registry_token=args.token or read_token_file(args.token_file or "", "registry"),
        extractor_token=read_token_file(args.extractor_token_file or "", "extractor"),
        tls=args.tls, tls_ca=args.tls_ca, client_cert=args.client_cert, client_key=args.client_key,
        server_name=args.server_name, cache_dir=args.cache_dir or None, timeout_s=args.timeout_s,
    )  # fmt: skip


def _progress_mode(args: argparse.Namespace) -> str:
    return "quiet" if args.quiet else args.progress


def _setup(args: argparse.Namespace) -> None:
    """Logging on stderr (progress in log mode is INFO lines) and torch's thread count."""
    from services.common.logging_setup import configure_logging

    quiet = _progress_mode(args) == "quiet" and args.log_level in ("debug", "info")
    configure_logging("warning" if quiet else args.log_level)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _print(data: Any, text: str, as_json: bool) -> None:
    print(json.dumps(data, indent=2) if as_json else text, flush=True)


def cmd_tune(args: argparse.Namespace) -> int:
    from services.tuner.progress import ProgressReporter
    from services.tuner.reports import ReporterObserver
    from services.tuner.tune import TuneOptions, tune_path, tuner_identity

    options = _checked(lambda: TuneOptions(
        task=args.task, k=args.k, codec=args.codec, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, seed=args.seed,
        k_search_epochs=args.k_search_epochs, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        num_blocks=args.num_blocks, rank=args.rank, heads=args.heads, pooling=args.pooling, alias=args.alias,
        description=args.description, force=args.force, max_in_flight=args.max_in_flight,
        tuner=tuner_identity("cli")))  # fmt: skip
    endpoints = _checked(lambda: _endpoints(args))
    _setup(args)
    with (
        ProgressReporter(_progress_mode(args)) as reporter,
        endpoints.extractor_client() as extractor,
        endpoints.registry_client() as registry,
    ):
        result = tune_path(args.data, options, extractor, registry, ReporterObserver(reporter))
    _print(result.to_dict(), result.summary(), args.json)
    return 0


def _version_ref(args: argparse.Namespace) -> None:
    if args.version is not None and args.alias is not None:
        raise UsageError(f"{PROG}: error: give --version or --alias, not both")


def cmd_predict(args: argparse.Namespace) -> int:
    from services.tuner.predict import file_items, image_files, load_version, predict_images

    _version_ref(args)
    endpoints = _checked(lambda: _endpoints(args))
    files = image_files(args.images)
    _setup(args)
    failures = 0
    with endpoints.extractor_client() as extractor, endpoints.registry_client() as registry:
        loaded = load_version(registry, args.task, version=args.version, alias=args.alias)
        for prediction in predict_images(
            loaded, extractor, file_items(files), top_k=args.top_k, max_in_flight=args.max_in_flight
        ):
            print(json.dumps(prediction.to_dict(id_key="file")), flush=True)
            failures += not prediction.ok
    if failures:
        _error("mist predict", f"{failures} of {len(files)} image(s) could not be classified (see their lines)")
        return 1
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from services.tuner.predict import evaluate_path, load_version

    _version_ref(args)
    endpoints = _checked(lambda: _endpoints(args))
    _setup(args)
    with endpoints.extractor_client() as extractor, endpoints.registry_client() as registry:
        loaded = load_version(registry, args.task, version=args.version, alias=args.alias)
        evaluation = evaluate_path(loaded, extractor, args.data, split=args.split, max_in_flight=args.max_in_flight)
    _print(evaluation.to_dict(), evaluation.summary(), args.json)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from services.tuner.demo import DemoOptions, run_demo

    options = _checked(
        lambda: DemoOptions(workdir=args.workdir, epochs=args.epochs, seed=args.seed, show_worker=args.worker)
    )
    _setup(args)
    return run_demo(options)


# ---------------------------------------------------------------------------------------------- parsing


_EPILOG = "Every flag also reads MIST_<FLAG> from the environment (the flag wins)."


def build_parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="MIST separated tuning: train tiny edge networks on features from a "
        "frozen ViT served in the cloud; predict; manage their versions.",
        epilog=_EPILOG,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def add(
        name: str, fn: Callable[[argparse.Namespace], int], help_text: str, groups: Sequence[tuple[str, Sequence[Flag]]]
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=_EPILOG)
        for title, flags in groups:
            group = sub.add_argument_group(title)
            for flag in flags:
                flag.add_to(group)
        sub.set_defaults(fn=fn, flags=[flag for _, flags in groups for flag in flags])
        return sub

    add(
        "tune",
        cmd_tune,
        "fetch features once, choose k, train the edge network, evaluate, push a version",
        [("tune", TUNE), ("connection", CONNECTION), ("output", OUTPUT + THREADS)],
    )
    predict = add(
        "predict",
        cmd_predict,
        "classify images with a stored version; prints one JSON line per image",
        [("predict", PREDICT), ("connection", CONNECTION), ("output", OUTPUT + THREADS)],
    )
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders of images")
    add(
        "evaluate",
        cmd_evaluate,
        "score a stored version on a labelled folder: accuracy, per class, confusion",
        [("evaluate", EVALUATE), ("connection", CONNECTION), ("output", OUTPUT + THREADS)],
    )
    commands.add_parser(
        "registry", add_help=False, help="tasks, versions, aliases, exports, tokens (see mist registry --help)"
    )
    add(
        "demo",
        cmd_demo,
        "start a registry, an extractor and a worker locally, tune a synthetic task, promote it, "
        "predict, and show the transfer table; stops everything it started",
        [("demo", DEMO), ("output", OUTPUT)],
    )
    return parser


def _error(prog: str, message: str) -> None:
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)  # one line, always


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Runs one `mist` command; returns the exit code (0 ok, 1 refused or failed, 2 usage, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    limit_heap_growth()
    if argv[:1] == ["registry"]:
        from services.common.clients.registry_cli import main as registry_main

        return registry_main(argv[1:], env)
    prog = PROG
    try:
        args, extra = build_parser().parse_known_args(argv)
        prog = f"{PROG} {args.command}"
        if extra:  # reported by the subcommand, whose --help lists what it takes
            raise UsageError(f"{prog}: error: unrecognized arguments: {' '.join(extra)} (see {prog} --help)")
        for flag in args.flags:
            flag.resolve(args, env)
        return args.fn(args)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except UsageError as error:
        print(" ".join(str(error).split()), file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        _error(prog, "interrupted")
        return 130
    except MistError as error:
        _error(prog, f"{error.code}: {error}")
        return 1
    except grpc.RpcError as error:  # a status the clients did not map (CANCELLED, DEADLINE_EXCEEDED, ...)
        code = error.code().name if callable(getattr(error, "code", None)) else "UNKNOWN"
        _error(prog, f"{code}: {error.details() if callable(getattr(error, 'details', None)) else error}")
        return 1
    except BrokenPipeError:  # `mist predict ... | head`: the reader left; say nothing more
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it
    except OSError as error:
        _error(prog, f"{error.strerror or error}{f': {error.filename}' if error.filename else ''}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
