"""Trains the LAE edge network on stored gathered features, picks k on validation, and predicts.

The recipe is the paper's (AdamW, cosine schedule with linear warm-up, batch 32); runs are seeded and give
bitwise the same weights for the same inputs on the same machine. Only the current batch is ever decoded.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from services.common.checks import check_int
from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.wire.edge_spec import EdgeNetworkConfig
from services.tuner.edge_network import EdgeNetwork
from services.tuner.evaluation import collect_predictions
from services.tuner.feature_store import FeatureStore
from services.tuner.options import TrainConfig

Phase = Literal["k-search", "final"]


@dataclass(frozen=True)
class StepProgress:
    """After one optimizer step: running figures of the epoch so far (for a live progress bar)."""

    k: int  # the k whose features are trained on
    phase: Phase  # "k-search" (a short candidate run) or "final"
    epoch: int  # 1-based
    epochs: int  # epochs in this run
    step: int  # 1-based step within the epoch
    steps: int  # steps per epoch
    loss: float  # mean training loss of the epoch so far
    accuracy: float  # training accuracy of the epoch so far
    images_per_second: float  # training throughput of the epoch so far, decoding included


@dataclass(frozen=True)
class EpochStats:
    """One finished epoch (what the Tune RPC's EpochProgress carries)."""

    k: int  # the k whose features are trained on
    phase: Phase  # "k-search" or "final"
    epoch: int  # 1-based
    epochs: int  # epochs in this run
    train_loss: float  # mean cross-entropy over the epoch's batches (weights changing as it goes)
    train_accuracy: float  # fraction of training images classified right during the epoch
    val_loss: float | None  # mean cross-entropy on the val split after the epoch; None without one
    val_accuracy: float | None  # accuracy on the val split after the epoch; None without one
    images_per_second: float  # training images per second, decoding included, validation excluded
    lr: float  # learning rate of the epoch's last step
    seconds: float  # wall time of the epoch, validation included

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """A trained edge network and how it got there."""

    model: EdgeNetwork  # in eval mode, holding the kept epoch's weights
    k: int  # the k it was trained on
    history: list[EpochStats]  # one entry per epoch
    kept_epoch: int  # 1-based epoch whose weights `model` holds
    best_val_accuracy: float | None  # highest val accuracy of any epoch; None without a val split
    final_val_accuracy: float | None  # val accuracy after the last epoch; None without a val split
    seconds: float  # wall time of the whole run

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly summary (no weights) for a version's details_json."""
        return {
            "k": self.k,
            "kept_epoch": self.kept_epoch,
            "best_val_accuracy": self.best_val_accuracy,
            "final_val_accuracy": self.final_val_accuracy,
            "seconds": self.seconds,
            "history": [stats.to_dict() for stats in self.history],
        }


@dataclass(frozen=True)
class KSelection:
    """Outcome of `--k auto`: every candidate's short-run val score and the k chosen."""

    chosen_k: int  # best val accuracy; ties: lower val loss, then the smaller k (less cloud compute)
    val_accuracy_by_k: dict[int, float]  # the kept epoch's val accuracy of each candidate's short run
    val_loss_by_k: dict[int, float]  # that epoch's val loss
    epochs: int  # epochs of each short run

    def to_dict(self) -> dict[str, object]:
        return {
            "chosen_k": self.chosen_k,
            "epochs": self.epochs,
            "val_accuracy_by_k": {str(k): v for k, v in self.val_accuracy_by_k.items()},
            "val_loss_by_k": {str(k): v for k, v in self.val_loss_by_k.items()},
        }


def lr_at_step(step: int, *, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up to base_lr, then a cosine to min_lr.

    Warm-up starts at base_lr / warmup_steps (not 0, which would waste a step) and reaches base_lr at step
    warmup_steps; the cosine then falls from base_lr towards min_lr over the remaining steps.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_edge_network(
    store: FeatureStore,
    k: int,
    edge_config: EdgeNetworkConfig,
    train_config: TrainConfig,
    *,
    train_indices: Sequence[int],
    val_indices: Sequence[int] = (),
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_step: Callable[[StepProgress], None] | None = None,
    phase: Phase = "final",
) -> TrainResult:
    """Train a fresh EdgeNetwork(edge_config) on the store's k features of `train_indices`.

    After every epoch the val split (if any) is scored. `keep="best"` returns the epoch with the highest
    val accuracy (ties: lower val loss, then the earlier epoch); without a val split, or with
    `keep="final"`, the last epoch. The global torch RNG is left as it was.
    """
    train_positions, val_positions = _checked_inputs(store, k, edge_config, train_indices, val_indices)
    steps_per_epoch = math.ceil(len(train_positions) / train_config.batch_size)
    micro_batch = train_config.micro_batch_for(edge_config.tokens, edge_config.dims)
    started = time.perf_counter()
    history: list[EpochStats] = []
    best = _BestWeights()
    # Not torch.use_deterministic_algorithms: it imports torch._dynamo (+150 MB RSS, seconds), and the CPU
    # kernels used here are deterministic already (bitwise reproducibility is tested).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_config.seed)
        model = EdgeNetwork(edge_config, readout_dropout=train_config.readout_dropout)
        optimizer = AdamW(model, weight_decay=train_config.weight_decay)
        order_generator = torch.Generator().manual_seed(train_config.seed)
        for epoch in range(1, train_config.epochs + 1):
            epoch_started = time.perf_counter()
            order = torch.randperm(len(train_positions), generator=order_generator).tolist()
            context = _EpochContext(
                k, phase, epoch, train_config.epochs, steps_per_epoch, (epoch - 1) * steps_per_epoch, micro_batch
            )
            loss, accuracy, lr, train_seconds = _train_one_epoch(
                model, optimizer, store, [train_positions[i] for i in order], train_config, context, on_step
            )
            val_loss = val_accuracy = None
            if val_positions:
                scored = collect_predictions(model, store, k, val_positions, batch_size=micro_batch)
                val_loss, val_accuracy = scored.loss, scored.accuracy
                if train_config.keep == "best":
                    best.offer(epoch, val_accuracy, val_loss, model)
            history.append(
                EpochStats(
                    k, phase, epoch, train_config.epochs, loss, accuracy, val_loss, val_accuracy,
                    len(train_positions) / max(train_seconds, 1e-9), lr, time.perf_counter() - epoch_started,
                )
            )  # fmt: skip
            if on_epoch is not None:
                on_epoch(history[-1])
    kept_epoch = best.restore(model) or train_config.epochs
    val_scores = [s.val_accuracy for s in history if s.val_accuracy is not None]
    return TrainResult(
        model=model.eval(),
        k=k,
        history=history,
        kept_epoch=kept_epoch,
        best_val_accuracy=max(val_scores) if val_scores else None,
        final_val_accuracy=history[-1].val_accuracy,
        seconds=time.perf_counter() - started,
    )


def default_short_epochs(epochs: int) -> int:
    """Epochs of each k-search run: a fifth of the full run, at least 2 (one epoch is mostly warm-up noise)."""
    return max(1, min(epochs, max(2, math.ceil(epochs / 5))))


def select_k(
    store: FeatureStore,
    candidate_ks: Sequence[int],
    edge_config: EdgeNetworkConfig,
    train_config: TrainConfig,
    *,
    train_indices: Sequence[int],
    val_indices: Sequence[int],
    short_epochs: int | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_step: Callable[[StepProgress], None] | None = None,
) -> KSelection:
    """Train each candidate k for `short_epochs` (default: default_short_epochs) and keep the best on val.

    Each short run uses train_config with epochs = short_epochs and the default 10 % warm-up, the same seed
    (so candidates differ only in their features), and keeps its best epoch.
    """
    ks = list(dict.fromkeys(candidate_ks))
    if not ks:
        raise InvalidArgumentError("select_k needs at least one candidate k")
    if not len(val_indices):
        raise InvalidArgumentError("choosing k needs a validation split: give val images or a val_fraction above 0")
    epochs = default_short_epochs(train_config.epochs) if short_epochs is None else short_epochs
    check_int("short_epochs", epochs, minimum=1)
    missing = store.missing([*train_indices, *val_indices], ks)
    if missing:
        raise FailedPreconditionError(f"{len(missing)} image(s) lack features for some of k = {ks}: extract them first")
    short = dataclasses.replace(train_config, epochs=epochs, warmup_epochs=None)
    accuracy: dict[int, float] = {}
    loss: dict[int, float] = {}
    for k in ks:
        result = train_edge_network(
            store, k, edge_config, short, train_indices=train_indices, val_indices=val_indices,
            on_epoch=on_epoch, on_step=on_step, phase="k-search",
        )  # fmt: skip
        kept = result.history[result.kept_epoch - 1]
        accuracy[k], loss[k] = float(kept.val_accuracy), float(kept.val_loss)  # type: ignore[arg-type]
    chosen = max(ks, key=lambda k: (accuracy[k], -loss[k], -k))
    return KSelection(chosen_k=chosen, val_accuracy_by_k=accuracy, val_loss_by_k=loss, epochs=epochs)


def predict(model: EdgeNetwork, features: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Class probabilities [B, C] (float32, rows sum to 1) for features [B, T, D] or one image's [T, D]."""
    tensor = torch.as_tensor(features)
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    model.eval()
    with torch.inference_mode():
        return torch.softmax(model(tensor), dim=1)


class AdamW:
    """AdamW (Loshchilov & Hutter), computing exactly what torch.optim.AdamW's single-tensor CPU path does.

    Not torch.optim: every torch Optimizer imports torch._dynamo on first use (measured with torch 2.14:
    +150 MB RSS and seconds of start-up), a third of a device's 500 MB budget for nothing. Biases and
    LayerNorm parameters (1-D) get no weight decay, as timm's optimizer factory does by default: decaying
    a LayerNorm gain towards 0 only fights the normalisation.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.decay = [weight_decay if p.ndim >= 2 else 0.0 for p in self.params]
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.steps += 1
        bias_correction1 = 1 - self.beta1**self.steps
        bias_correction2_sqrt = (1 - self.beta2**self.steps) ** 0.5
        for param, decay, exp_avg, exp_avg_sq in zip(
            self.params, self.decay, self.exp_avg, self.exp_avg_sq, strict=True
        ):
            if param.grad is None:
                continue
            grad = param.grad
            if decay:
                param.mul_(1 - lr * decay)
            exp_avg.lerp_(grad, 1 - self.beta1)
            exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


# ------------------------------------------------------------------------------------------------ internals


@dataclass(frozen=True)
class _EpochContext:
    k: int
    phase: Phase
    epoch: int
    epochs: int
    steps: int
    first_step: int  # global index of the epoch's first optimizer step (for the schedule)
    micro_batch: int  # images per forward/backward chunk


class _BestWeights:
    """A copy of the weights of the best epoch so far: highest val accuracy, then lowest val loss."""

    def __init__(self) -> None:
        self._key: tuple[float, float] | None = None
        self._epoch = 0
        self._state: dict[str, torch.Tensor] = {}

    def offer(self, epoch: int, val_accuracy: float, val_loss: float, model: EdgeNetwork) -> None:
        key = (val_accuracy, -val_loss)
        if self._key is None or key > self._key:  # strictly better: an exact tie keeps the earlier epoch
            self._key, self._epoch = key, epoch
            self._state = {name: t.detach().clone() for name, t in model.state_dict().items()}

    def restore(self, model: EdgeNetwork) -> int:
        """Load the kept weights into `model`; returns their epoch, 0 when none was offered."""
        if self._epoch:
            model.load_state_dict(self._state)
        return self._epoch


def _train_one_epoch(
    model: EdgeNetwork,
    optimizer: AdamW,
    store: FeatureStore,
    ordered: list[int],
    config: TrainConfig,
    context: _EpochContext,
    on_step: Callable[[StepProgress], None] | None,
) -> tuple[float, float, float, float]:
    """One pass in the given order; returns (mean loss, accuracy, last lr, seconds)."""
    model.train()
    total_steps = context.epochs * context.steps
    warmup_steps = config.resolved_warmup_epochs * context.steps
    loss_sum, correct, seen, lr = 0.0, 0, 0, config.lr
    started = time.perf_counter()
    for step in range(context.steps):
        batch = ordered[step * config.batch_size : (step + 1) * config.batch_size]
        lr = lr_at_step(
            context.first_step + step,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            base_lr=config.lr,
            min_lr=config.min_lr,
        )
        optimizer.zero_grad()
        for start in range(0, len(batch), context.micro_batch):
            chunk_loss, chunk_correct = _accumulate_gradients(
                model, store, batch[start : start + context.micro_batch], len(batch), config, context
            )
            if not math.isfinite(chunk_loss):
                raise InvalidArgumentError(
                    f"training diverged at epoch {context.epoch}, step {step + 1} (loss {chunk_loss}): lower the learning rate"
                )
            loss_sum += chunk_loss
            correct += chunk_correct
        if config.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        optimizer.step(lr)
        seen += len(batch)
        if on_step is not None:
            elapsed = time.perf_counter() - started
            on_step(
                StepProgress(
                    context.k, context.phase, context.epoch, context.epochs, step + 1, context.steps,
                    loss_sum / seen, correct / seen, seen / max(elapsed, 1e-9),
                )
            )  # fmt: skip
    return loss_sum / seen, correct / seen, lr, time.perf_counter() - started


def _accumulate_gradients(
    model: EdgeNetwork,
    store: FeatureStore,
    chunk: list[int],
    batch_len: int,
    config: TrainConfig,
    context: _EpochContext,
) -> tuple[float, int]:
    """Forward and backward one chunk of a batch, adding its share of the batch-mean loss's gradient.

    Returns (summed loss of the chunk's images, how many it classified right). Only this chunk is decoded.
    """
    features, labels = store.batch(chunk, context.k)
    logits = model(features)
    summed = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing, reduction="sum")
    (summed / batch_len).backward()
    return summed.item(), int((logits.argmax(dim=1) == labels).sum())


def _checked_inputs(
    store: FeatureStore,
    k: int,
    edge_config: EdgeNetworkConfig,
    train_indices: Sequence[int],
    val_indices: Sequence[int],
) -> tuple[list[int], list[int]]:
    train_positions = [int(i) for i in train_indices]
    val_positions = [int(i) for i in val_indices]
    if not train_positions:
        raise InvalidArgumentError("training needs at least one training image")
    if store.feature_shape is None:
        raise FailedPreconditionError("the feature store is empty: extract features first")
    expected = (edge_config.tokens, edge_config.dims)
    if store.feature_shape != expected:
        raise FailedPreconditionError(
            f"features are {list(store.feature_shape)} but the edge network expects [tokens, dims] = {list(expected)}"
        )
    if edge_config.num_classes != store.num_classes:
        raise FailedPreconditionError(
            f"the edge network has {edge_config.num_classes} classes but the data has {store.num_classes}"
        )
    missing = store.missing([*train_positions, *val_positions], [k])
    if missing:
        raise FailedPreconditionError(
            f"{len(missing)} image(s) have no k={k} feature (first: {missing[:5]}): extract them first"
        )
    return train_positions, val_positions
