"""`mist reproduce`: the paper's protocols in one command each (run through `mist reproduce ...`, see cli.main).

    mist reproduce vtab --root ~/data/vtab-1k --tasks cifar,dtd            # Table 1 layout in reproduce-vtab/
    mist reproduce fewshot --root ~/data/fgvc --shots 1,2,4,8,16 --seeds 0,1,2
    mist reproduce dg --source ~/data/imagenet --shots 16 --targets ~/data/imagenet-a,~/data/imagenet-r

Progress (with an ETA) goes to stderr, the table to stdout (`--json`: the table's data); table.md and table.json
are written in the run folder after every finished unit. Reference: docs/reference/cli.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from services.common.clients.settings import JsonOutput
from services.common.config import ENV_EPILOG, ArgumentParser
from services.tuner.cli import _CONNECTION, Command, Invocation, OutputFlags, _setup, add_commands
from services.tuner.reproduce.options import DgOptions, FewShotOptions, ReproduceFlags, VtabOptions

PROG = "mist reproduce"


def _runner(options_class: type[ReproduceFlags], protocol: str, render: str) -> Callable[[Invocation], int]:
    def run(invocation: Invocation) -> int:
        from services.tuner.progress import ProgressReporter
        from services.tuner.reproduce import protocols, tables
        from services.tuner.reproduce.runner import ReproduceObserver, Session
        from services.tuner.tune import describe, tuner_identity

        options = invocation.get(options_class)
        output = invocation.get(OutputFlags)
        _setup(output)
        plan = getattr(protocols, f"plan_{protocol}")(options)  # the layouts, checked before any server is asked
        assert invocation.endpoints is not None
        with (
            ProgressReporter(output.progress_mode) as reporter,
            invocation.endpoints.extractor_client() as extractor,
            invocation.endpoints.registry_client() as registry,
        ):
            observer = ReproduceObserver(reporter)
            info = describe(extractor)
            if not info.pretrained:
                observer.message(f"warning: {info.warning or 'the extractor runs a randomly initialised backbone'}")
            session = Session(extractor, registry, info, tuner_identity("cli"))
            data: dict[str, Any] = getattr(protocols, f"run_{protocol}")(options, session, observer, plan)
        if invocation.get(JsonOutput).json:
            print(json.dumps(data, indent=2, allow_nan=False), flush=True)
        else:
            print(getattr(tables, render)(data), flush=True)
        return 0

    return run


_OUTPUT = ("output", (JsonOutput, OutputFlags))
COMMANDS: dict[str, Command] = {
    "vtab": Command(
        _runner(VtabOptions, "vtab", "vtab_markdown"),
        "VTAB-1k: per task, k chosen on val200, the recipe on train800val200, scored on test; the paper's Table 1",
        (("vtab", (VtabOptions,)), _CONNECTION, _OUTPUT),
    ),
    "fewshot": Command(
        _runner(FewShotOptions, "fewshot", "fewshot_markdown"),
        "few-shot: class-balanced n-shot samples per seed, scored on the test split; mean and spread over seeds",
        (("fewshot", (FewShotOptions,)), _CONNECTION, _OUTPUT),
    ),
    "dg": Command(
        _runner(DgOptions, "dg", "dg_markdown"),
        "domain generalisation: train on a source once, score that version on each target with its classes' logits",
        (("dg", (DgOptions,)), _CONNECTION, _OUTPUT),
    ),
}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        epilog=ENV_EPILOG,
        description="The paper's protocols with your weights (the extractor's) and local datasets, through the real "
        "services; resumable from their run folder.",
    )
    add_commands(parser, COMMANDS)
    return parser
