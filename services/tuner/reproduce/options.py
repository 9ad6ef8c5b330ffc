"""The settings of `mist reproduce vtab|fewshot|dg` (no torch here: `mist reproduce --help` stays instant).

Training and fetch flags are mist tune's (TrainingFlags: --k, --codec, --epochs, --lr, --seed, ...); only the number
of epochs defaults to the paper's recipe (100, with 10 warm-up epochs: 10 % of them) instead of a device's 30.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.checks import check_int
from services.common.config import setting
from services.common.errors import InvalidArgumentError
from services.registry.records import NAME_PATTERN
from services.tuner.options import TrainingFlags

PAPER_EPOCHS = 100  # the VTAB-1k recipe of MIST and the PEFT papers it compares with
_NO_VAL_K = "N, the last block (few-shot data has no validation split to choose on)"


@dataclass(frozen=True, kw_only=True)
class ReproduceFlags(TrainingFlags):
    """What every protocol takes besides the data: the recipe (TrainingFlags), the run folder, the task names."""

    epochs: int = setting(PAPER_EPOCHS, help="training epochs of each final run (the paper's recipe)", metavar="N")
    out: str = setting(
        "", help="run folder: a result per finished unit, the fetched features, table.md and table.json; "
        "a killed run given the same folder continues from its finished units", shown="reproduce-PROTOCOL",
        metavar="DIR",
    )  # fmt: skip
    task_prefix: str = setting(
        "", help="registry task names: PREFIX + the dataset's name", shown="PROTOCOL-", metavar="PREFIX"
    )

    protocol = "reproduce"  # not a field: each protocol's name

    @property
    def out_dir(self) -> str:
        return self.out or f"reproduce-{self.protocol}"

    @property
    def prefix(self) -> str:
        return self.task_prefix or f"{self.protocol}-"

    def task_name(self, dataset: str) -> str:
        """The registry task of a dataset: lower case, other characters than [a-z0-9._-] as '-'."""
        name = "".join(c if c.isalnum() or c in "._-" else "-" for c in (self.prefix + dataset).lower())
        if not NAME_PATTERN.fullmatch(name):
            raise InvalidArgumentError(f"{name!r} is not a valid task name: choose another --task-prefix")
        return name

    def check(self) -> None:
        super().check()
        self.task_name("x")


@dataclass(frozen=True, kw_only=True)
class VtabOptions(ReproduceFlags):
    """`mist reproduce vtab`: the 19 VTAB-1k tasks (or --tasks), k chosen on val200, trained on train800val200."""

    root: str = setting(help="the vtab-1k folder: ROOT/<task>/{train800,val200,train800val200,test}.txt", metavar="DIR")
    tasks: tuple[str, ...] = setting((), help="run these tasks only, e.g. cifar,dtd", shown="all 19", metavar="A,B")

    protocol = "vtab"


@dataclass(frozen=True, kw_only=True)
class FewShotOptions(ReproduceFlags):
    """`mist reproduce fewshot`: class-balanced n-shot samples per seed, scored on the test split."""

    root: str = setting(
        help="a dataset folder (train.txt + test.txt lists, or train/ and test/ class folders), or a folder of them",
        metavar="DIR",
    )
    tasks: tuple[str, ...] = setting(
        (), help="datasets (subfolders of --root) to run", shown="every one", metavar="A,B"
    )
    shots: tuple[int, ...] = setting((1, 2, 4, 8, 16), help="train images per class", metavar="N,N")
    seeds: tuple[int, ...] = setting((0, 1, 2), help="sampling seeds; each run also trains with --seed + its seed",
                                     metavar="S,S")  # fmt: skip
    k: int | None = setting(None, help="gather depth", minimum=1, none_words=("", "auto"), shown=_NO_VAL_K,
                            metavar="auto|N")  # fmt: skip

    protocol = "fewshot"

    def check(self) -> None:
        super().check()
        for name in ("shots", "seeds"):
            values = getattr(self, name)
            if not values:
                raise InvalidArgumentError(f"--{name} needs at least one value")
            for value in values:
                check_int(name, value, minimum=1 if name == "shots" else 0)


@dataclass(frozen=True, kw_only=True)
class DgOptions(ReproduceFlags):
    """`mist reproduce dg`: train on a source dataset once, score the pushed version on each target."""

    source: str = setting(
        help="the source dataset folder (train.txt/test.txt[/val.txt] lists, or train/ [val/ test/] class folders)",
        metavar="DIR",
    )
    targets: tuple[str, ...] = setting(
        help="target dataset folders (class folders named like the source's, or lists with the source's labels); "
        "each is scored with the logits of its own classes only", metavar="DIR,DIR",
    )  # fmt: skip
    shots: int | None = setting(
        None, help="train on this many images per class of the source (the paper: 16-shot ImageNet)", minimum=1,
        none_words=("", "all"), shown="all", metavar="N",
    )  # fmt: skip
    k: int | None = setting(None, help="gather depth", minimum=1, none_words=("", "auto"),
                            shown="auto with a source val split, else N", metavar="auto|N")  # fmt: skip

    protocol = "dg"

    def check(self) -> None:
        super().check()
        if not self.targets:
            raise InvalidArgumentError("--targets needs at least one folder")
