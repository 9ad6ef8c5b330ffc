"""`mist`: the command line of the suite for people and scripts (tune, predict, evaluate, registry, demo).

    mist tune --task shapes --data var/demo/data --alias production      # progress on stderr, result on stdout
    mist predict --task shapes --alias production photo.jpg              # one JSON line per image
    mist agent --task shapes --alias production < paths                  # the same, following the alias

Every flag is a field of a typed config class (TuneOptions, ConnectionFlags, ...) and reads MIST_<FLAG> too; the
reference is docs/reference/cli.md. Exit codes: 0 done, 1 refused or failed, 2 usage, 130 interrupted. Importing
this module loads neither torch nor any server code: `mist --help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import select
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from services.common.clients.settings import JsonOutput
from services.common.config import (
    ENV_EPILOG,
    ArgumentParser,
    ConfigBase,
    UsageError,
    add_arguments,
    config_from_args,
    env_names,
    parse_args,
    setting,
)
from services.common.errors import InvalidArgumentError, MistError
from services.tuner.config import ConnectionFlags, Endpoints
from services.tuner.memory import limit_heap_growth
from services.tuner.options import DemoOptions, Runtime, TrainingFlags, TuneOptions

PROG = "mist"
C = TypeVar("C")


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class OutputFlags(ConfigBase):
    """What a command shows on stderr, and how many threads it computes with."""

    progress: Literal["auto", "bar", "log", "quiet"] = setting(
        "auto", help="progress on stderr: a bar on a terminal (auto), log lines, or nothing"
    )
    quiet: bool = setting(False, help="no progress and no log lines below warnings (same as --progress quiet)")
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", help="least severe log line shown")
    threads: int | None = setting(
        None,
        help="torch threads for training and inference; 0 = every CPU",
        minimum=0,
        none_words=("", "auto"),
        shown="every CPU; mist demo: 1, its servers share the machine",
        metavar="N",
    )

    @property
    def progress_mode(self) -> str:
        return "quiet" if self.quiet else self.progress


@dataclass(frozen=True, kw_only=True)
class DataFlags(ConfigBase):
    """The labelled images of a tune."""

    data: str = setting(
        help="ImageFolder tree DIR/<class>/..., split folders DIR/{train,val,test}/<class>/..., a CSV manifest "
        "path,label[,split], or segmentation data DIR/images/{training,validation} with uint8 class-id masks in "
        "DIR/annotations/{training,validation}",
        metavar="PATH",
    )


@dataclass(frozen=True, kw_only=True)
class VersionFlags(ConfigBase):
    """Which stored version a command uses."""

    task: str = setting(help="registry task", metavar="NAME")
    version: int | None = setting(
        None, help="version number to use", minimum=1, shown="--alias, else the latest", metavar="N"
    )
    alias: str | None = setting(None, help="alias to use, e.g. production", metavar="NAME")
    runtime: Runtime = setting(
        "numpy", help="what runs the edge network: numpy (no torch needed) or torch (the training code)"
    )

    def check(self) -> None:
        super().check()
        if self.version is not None and self.alias is not None:
            raise InvalidArgumentError("give --version or --alias, not both")


@dataclass(frozen=True, kw_only=True)
class PredictFlags(VersionFlags):
    """What `mist predict` prints."""

    top_k: int = setting(5, help="classes listed per image, most probable first", minimum=1, metavar="N")
    output_dir: str = setting(
        "mist-segmentation",
        help="segmentation tasks: folder for each image's label map (<name>.labels.png, class ids at the image's "
        "size); made when missing",
        metavar="DIR",
    )
    overlay: bool = setting(False, help="segmentation tasks: also write <name>.overlay.png, the classes in colour")


@dataclass(frozen=True, kw_only=True)
class AgentFlags(ConfigBase):
    """What `mist agent` follows and how it reports (services/tuner/agent.py)."""

    task: str = setting(help="registry task", metavar="NAME")
    alias: str = setting(
        help="alias to follow, e.g. production; each move is validated, then swapped in", metavar="NAME"
    )
    device: str | None = setting(
        None,
        help="this device's name in rollouts and the fleet view",
        shown="the token's name when a token is given, else the host name",
        metavar="NAME",
    )
    runtime: Runtime = setting(
        "numpy", help="what runs the edge network: numpy (no torch needed) or torch (the training code)"
    )
    top_k: int = setting(5, help="classes listed per image, most probable first", minimum=1, metavar="N")
    heartbeat_s: float | None = setting(
        None,
        help="seconds between reports to the registry's fleet view",
        minimum=1.0,
        shown="what the registry asks for (30)",
        metavar="SECONDS",
    )

    def check(self) -> None:
        super().check()
        if not self.task.strip() or not self.alias.strip():
            raise InvalidArgumentError("--task and --alias must not be empty")


@dataclass(frozen=True, kw_only=True)
class EvaluateFlags(VersionFlags):
    """What `mist evaluate` scores."""

    data: str = setting(
        help="labelled images: DIR/<class>/..., DIR/{train,val,test}/<class>/... or a manifest; for a segmentation "
        "task DIR/images/... and DIR/annotations/...",
        metavar="PATH",
    )
    split: Literal["auto", "all", "train", "val", "test"] = setting(
        "auto",
        help="which images to score: test when there is a test split (auto), every image (all), or one split; "
        "segmentation: validation when there is one (auto), training (train), validation (val, test)",
    )


@dataclass(frozen=True)
class Invocation:
    """One parsed command: its settings by class, its positional arguments, and the servers it talks to."""

    settings: Mapping[type, Any]
    args: argparse.Namespace
    endpoints: Endpoints | None

    def get(self, cls: type[C]) -> C:
        return self.settings[cls]


# ---------------------------------------------------------------------------------------------- commands


def _setup(output: OutputFlags, *, uses_torch: bool = True, default_threads: int | None = None) -> None:
    """Logging on stderr (progress in log mode is INFO lines) and torch's thread count, when torch runs at all."""
    from services.common.logging_setup import configure_logging

    quiet = output.progress_mode == "quiet" and output.log_level in ("debug", "info")
    configure_logging("warning" if quiet else output.log_level)
    threads = default_threads if output.threads is None else output.threads
    if threads and uses_torch:  # the numpy runtime must not load torch (memory), even where it is installed
        import torch

        torch.set_num_threads(threads)


def _print(data: Any, text: str, as_json: bool) -> None:
    print(json.dumps(data, indent=2) if as_json else text, flush=True)


def cmd_tune(run: Invocation) -> int:
    from services.tuner.progress import ProgressReporter
    from services.tuner.reports import ReporterObserver
    from services.tuner.tune import tune_path, tuner_identity

    options = dataclasses.replace(run.get(TuneOptions), tuner=tuner_identity("cli"))
    output = run.get(OutputFlags)
    _setup(output)
    assert run.endpoints is not None
    with (
        ProgressReporter(output.progress_mode) as reporter,
        run.endpoints.extractor_client() as extractor,
        run.endpoints.registry_client() as registry,
    ):
        result = tune_path(run.get(DataFlags).data, options, extractor, registry, ReporterObserver(reporter))
    _print(result.to_dict(), result.summary(), run.get(JsonOutput).json)
    return 0


def cmd_predict(run: Invocation) -> int:
    flags, endpoints = run.get(PredictFlags), run.endpoints
    assert endpoints is not None
    if run.args.images == ["-"]:
        return _predict_stdin(run)
    from services.tuner.predict import file_items, image_files, load_version, predict_images

    files = image_files(run.args.images)
    _setup(run.get(OutputFlags), uses_torch=flags.runtime == "torch")
    failures = 0
    with endpoints.extractor_client() as extractor, endpoints.registry_client() as registry:
        loaded = load_version(registry, flags.task, version=flags.version, alias=flags.alias, runtime=flags.runtime)
        window = run.get(ConnectionFlags).max_in_flight
        if loaded.task.kind == "segmentation":
            from services.tuner.segmentation import segment_files

            answers = segment_files(loaded, extractor, files, output_dir=flags.output_dir, overlay=flags.overlay,
                                    max_in_flight=window)  # fmt: skip
        else:
            answers = predict_images(loaded, extractor, file_items(files), top_k=flags.top_k, max_in_flight=window)
        for prediction in answers:
            print(json.dumps(prediction.to_dict(id_key="file")), flush=True)
            failures += not prediction.ok
    return _predicted(failures, len(files), "segmented" if loaded.task.kind == "segmentation" else "classified")


def _predicted(failures: int, total: int, verb: str) -> int:
    """mist predict's exit status: 1, with one line on stderr, when any image got an error line."""
    if failures:
        _error("mist predict", f"{failures} of {total} image(s) could not be {verb} (see their lines)")
        return 1
    return 0


def _predict_stdin(run: Invocation) -> int:
    """`mist predict -`: one image path per stdin line, one JSON line out per image as soon as it is known. The
    version is pulled once; a segmentation version answers with label maps (_segment_stdin)."""
    from services.tuner.predict import Predictor, load_version

    flags = run.get(PredictFlags)
    _setup(run.get(OutputFlags), uses_torch=flags.runtime == "torch")
    assert run.endpoints is not None
    with run.endpoints.registry_client() as registry:
        loaded = load_version(registry, flags.task, version=flags.version, alias=flags.alias, runtime=flags.runtime)
    if loaded.task.kind == "segmentation":
        return _segment_stdin(run, loaded)
    seen = failures = 0
    with Predictor(run.endpoints, flags.task, version=flags.version, alias=flags.alias, runtime=flags.runtime,
                   top_k=flags.top_k, loaded=loaded) as predictor:  # fmt: skip
        for path in _stdin_paths():
            prediction = predictor.predict_file(path)
            print(json.dumps(prediction.to_dict(id_key="file")), flush=True)
            seen, failures = seen + 1, failures + (not prediction.ok)
    return _predicted(failures, seen, "classified")


_STDIN_POLL_S = 0.25  # how late a Ctrl-C may be acted on while `mist predict -` or `mist agent` waits for a line


def _stdin_paths() -> Iterator[str]:
    """One image path per stdin line, read as it comes; blank lines are skipped (a path may hold spaces).

    The descriptor is polled (select, _STDIN_POLL_S) rather than read in one blocking call: a Ctrl-C that the kernel
    hands to one of gRPC's threads only sets Python's flag, which the main thread acts on when it next runs Python
    code, so a blocking read would keep `mist predict -` and `mist agent` waiting for a line that may never come
    (measured: 1 SIGINT in 14 went unanswered). Paths are decoded as the file system does (os.fsdecode)."""
    try:
        descriptor = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's StringIO): nothing to poll
        yield from (path for line in sys.stdin if (path := line.rstrip("\r\n")).strip())
        return
    pending = b""
    while True:
        ready, _, _ = select.select([descriptor], [], [], _STDIN_POLL_S)
        if not ready:
            continue  # back in Python: a pending KeyboardInterrupt is raised here
        chunk = os.read(descriptor, 1 << 16)
        *lines, pending = (pending + chunk).split(b"\n") if chunk else (pending, b"")
        for raw in lines:
            path = os.fsdecode(raw).rstrip("\r")
            if path.strip():
                yield path
        if not chunk:
            return


def _segment_stdin(run: Invocation, loaded: Any) -> int:
    """`mist predict -` on a segmentation version: a label map (and its JSON line) per stdin path, as each is read."""
    from services.common.clients.extractor import ImageItem
    from services.tuner.segmentation import OutputNames, Segmented, segment_items

    flags, endpoints = run.get(PredictFlags), run.endpoints
    assert endpoints is not None
    seen = failures = 0
    names = OutputNames(flags.output_dir)
    with endpoints.extractor_client() as extractor:
        for path in _stdin_paths():
            seen += 1
            try:
                item = ImageItem(path, Path(path).expanduser().read_bytes())
            except OSError as error:  # the line Predictor.predict_file gives an unreadable file
                answers = [Segmented(path, loaded.version.number, error_code="INVALID_ARGUMENT",
                                     error_reason="unreadable_file",
                                     error_message=f"cannot read image {path}: {error.strerror or error}")]  # fmt: skip
            else:
                names.protect(Path(path))
                answers = segment_items(loaded, extractor, [item], output_dir=flags.output_dir, overlay=flags.overlay,
                                        names=names)  # fmt: skip
            for answer in answers:
                print(json.dumps(answer.to_dict(id_key="file")), flush=True)
                failures += not answer.ok
    return _predicted(failures, seen, "segmented")


def cmd_agent(run: Invocation) -> int:
    """`mist agent`: `mist predict -` that follows an alias; exits 0 at the end of stdin (per-image errors are in
    their lines: a long-running device service does not fail as a whole for one unreadable frame)."""
    from services.tuner.agent import Agent

    flags = run.get(AgentFlags)
    _setup(run.get(OutputFlags), uses_torch=flags.runtime == "torch")
    assert run.endpoints is not None
    with Agent(run.endpoints, flags.task, flags.alias, device=flags.device, runtime=flags.runtime, top_k=flags.top_k,
               heartbeat_s=flags.heartbeat_s) as agent:  # fmt: skip
        for path in _stdin_paths():
            print(json.dumps(agent.predict_file(path).to_dict(id_key="file")), flush=True)
    return 0


def cmd_evaluate(run: Invocation) -> int:
    from services.tuner.predict import evaluate_path, load_version

    flags, endpoints = run.get(EvaluateFlags), run.endpoints
    assert endpoints is not None
    _setup(run.get(OutputFlags), uses_torch=flags.runtime == "torch")
    with endpoints.extractor_client() as extractor, endpoints.registry_client() as registry:
        loaded = load_version(registry, flags.task, version=flags.version, alias=flags.alias, runtime=flags.runtime)
        window = run.get(ConnectionFlags).max_in_flight
        if loaded.task.kind == "segmentation":
            from services.tuner.segmentation import evaluate_segmentation

            evaluation = evaluate_segmentation(loaded, extractor, flags.data, split=flags.split, max_in_flight=window)
        else:
            evaluation = evaluate_path(loaded, extractor, flags.data, split=flags.split, max_in_flight=window)
    _print(evaluation.to_dict(), evaluation.summary(), run.get(JsonOutput).json)
    return 0


def cmd_demo(run: Invocation) -> int:
    from services.tuner.demo import run_demo

    # One thread unless told otherwise: the demo's edge network is small, and on a shared 2-core machine two torch
    # threads contending with the servers ran 8-20x slower than one (620 against 35-75 images/s at load average 6).
    _setup(run.get(OutputFlags), default_threads=1)
    return run_demo(run.get(DemoOptions))


# ---------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Command:
    """A `mist` subcommand: what it runs, its one-line help, and its settings in help groups."""

    run: Callable[[Invocation], int]
    help: str
    groups: tuple[tuple[str, tuple[type, ...]], ...]

    @property
    def classes(self) -> tuple[type, ...]:
        return tuple(cls for _, classes in self.groups for cls in classes)


_CONNECTION = ("connection", (ConnectionFlags,))
COMMANDS: dict[str, Command] = {
    "tune": Command(
        cmd_tune,
        "fetch features once, choose k, train the edge network, evaluate, push a version",
        (("tune", (DataFlags, TuneOptions)), _CONNECTION, ("output", (JsonOutput, OutputFlags))),
    ),
    "predict": Command(
        cmd_predict,
        "classify images with a stored version; prints one JSON line per image",
        (("predict", (PredictFlags,)), _CONNECTION, ("output", (OutputFlags,))),
    ),
    "agent": Command(
        cmd_agent,
        "follow an alias on a device: one image path per stdin line, one JSON line per image (with its version); "
        "each move of the alias is validated before it is swapped in",
        (("agent", (AgentFlags,)), _CONNECTION, ("output", (OutputFlags,))),
    ),
    "evaluate": Command(
        cmd_evaluate,
        "score a stored version on a labelled folder: accuracy, per class, confusion",
        (("evaluate", (EvaluateFlags,)), _CONNECTION, ("output", (JsonOutput, OutputFlags))),
    ),
    "demo": Command(
        cmd_demo,
        "start a registry, an extractor and a worker locally, tune a synthetic task, promote it, predict, and show "
        "the transfer table; stops everything it started",
        (("demo", (DemoOptions,)), ("output", (OutputFlags,))),
    ),
}
# Every MIST_* variable `mist` reads; the mist-tuner worker accepts them in its environment too.
CLI_ENV: tuple[str, ...] = tuple(sorted(env_names(*{cls for c in COMMANDS.values() for cls in c.classes})))


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        epilog=ENV_EPILOG,
        description="MIST separated tuning: train tiny edge networks on features from a frozen ViT served in the "
        "cloud; predict; manage their versions.",
    )
    subcommands = add_commands(parser, COMMANDS)
    for name, sub in subcommands.choices.items():
        if name == "predict":
            sub.add_argument(
                "images",
                nargs="+",
                metavar="IMAGE",
                help="image files, or folders of images; '-' reads one path per line from stdin and answers each "
                "line as it comes (one channel and the loaded weights kept across images)",
            )
    subcommands.add_parser(
        "registry", add_help=False, help="tasks, versions, aliases, exports, tokens (see mist registry --help)"
    )
    subcommands.add_parser(
        "reproduce",
        add_help=False,
        help="the paper's protocols: vtab, fewshot, dg (see mist reproduce --help)",
    )
    return parser


def add_commands(parser: argparse.ArgumentParser, commands: Mapping[str, Command]) -> argparse._SubParsersAction:
    """One subcommand per entry, each with its settings' flags in help groups; `prog` set for error lines."""
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=ArgumentParser)
    for name, command in commands.items():
        sub = subcommands.add_parser(
            name, help=command.help, description=command.help, epilog=ENV_EPILOG, allow_abbrev=False
        )
        for title, classes in command.groups:
            group = sub.add_argument_group(title)
            for cls in classes:
                add_arguments(group, cls)
        sub.set_defaults(prog=sub.prog)
    return subcommands


def _invocation(
    args: argparse.Namespace, env: Mapping[str, str], commands: Mapping[str, Command] | None = None
) -> Invocation:
    """Every setting of the command (of `commands`, default mist's) from its flags, else MIST_* variables, else
    defaults; token files read."""
    command = (COMMANDS if commands is None else commands)[args.command]
    given = vars(args)
    settings: dict[type, Any] = {}
    fetches = lambda cls: issubclass(cls, TrainingFlags)  # noqa: E731  # they take the connection's window
    for cls in sorted(command.classes, key=fetches):
        fixed = {"max_in_flight": settings[ConnectionFlags].max_in_flight} if fetches(cls) else {}
        settings[cls] = config_from_args(cls, given, env, **fixed)
    connection = settings.get(ConnectionFlags)
    return Invocation(settings, args, connection.endpoints() if connection else None)


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
    if argv[:1] == ["reproduce"]:
        from services.tuner.reproduce.cli import COMMANDS as REPRODUCE_COMMANDS
        from services.tuner.reproduce.cli import PROG as REPRODUCE_PROG
        from services.tuner.reproduce.cli import build_parser as reproduce_parser

        return run_command(REPRODUCE_PROG, reproduce_parser(), REPRODUCE_COMMANDS, argv[1:], env)
    return run_command(PROG, build_parser(), COMMANDS, argv, env)


def run_command(
    prog: str, parser: argparse.ArgumentParser, commands: Mapping[str, Command], argv: list[str], env: Mapping[str, str]
) -> int:
    """Parse `argv` with `parser`, run the chosen command; the exit code (errors as one `PROG: error:` line)."""
    try:
        args = parse_args(parser, argv)
        prog = args.prog
        run = _invocation(args, env, commands)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except UsageError as error:
        _error(error.prog, f"{error} (see {error.prog} --help)")
        return 2
    except InvalidArgumentError as error:  # a value the settings refuse, or an unreadable token file
        _error(prog, f"{error} (see {prog} --help)")
        return 2
    try:
        return commands[args.command].run(run)
    except KeyboardInterrupt:
        _error(prog, "interrupted")
        return 130
    except MistError as error:
        _error(prog, f"{error.code}: {error}")
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
