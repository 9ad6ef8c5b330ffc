"""Training, k selection, prediction and evaluation of edge networks on small synthetic features.

Features are [17, 32] (the suite's tiny ViT geometry): Gaussian noise plus a class-dependent direction,
which a linear probe on the CLS token separates; an "uninformative" k carries noise only.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.pb import feature_pb2
from services.common.wire.codec import CodecConfig, FeatureCodec
from services.common.wire.edge_spec import EdgeNetworkConfig
from services.tuner.edge_network import EdgeNetwork
from services.tuner.evaluation import Predictions, evaluate, report_from_predictions
from services.tuner.feature_store import FeatureStore
from services.tuner.progress import ProgressReporter, resolve_mode
from services.tuner.training import (
    AdamW,
    EpochStats,
    TrainConfig,
    default_short_epochs,
    lr_at_step,
    predict,
    select_k,
    train_edge_network,
)

TOKENS, DIMS, CLASSES = 17, 32, 3
EDGE = EdgeNetworkConfig(dims=DIMS, tokens=TOKENS, num_classes=CLASSES, num_blocks=2, rank=8)
REPO_ROOT = Path(__file__).resolve().parents[2]
BACKBONE = feature_pb2.BackboneId(name="vit_tiny_test", weights_fingerprint="random-0")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread, and the CI machine's 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_store(
    count: int = 240, *, ks=(1,), informative=(1,), signal: float = 3.0, seed: int = 0, codec: str = "i8-zstd"
) -> tuple[FeatureStore, list[int], list[int]]:
    """A store of `count` images (3 classes, 3/4 train, 1/4 val); only `informative` ks carry the label."""
    rng = np.random.default_rng(seed)
    labels = [i % CLASSES for i in range(count)]
    directions = rng.normal(size=(CLASSES, DIMS)).astype(np.float32)
    splits = ["val" if i % 4 == 3 else "train" for i in range(count)]
    store = FeatureStore(labels, num_classes=CLASSES, splits=splits, backbone=BACKBONE)
    codec = FeatureCodec(CodecConfig.parse(codec))
    for index, label in enumerate(labels):
        for k in ks:
            values = rng.normal(size=(TOKENS, DIMS)).astype(np.float32)
            if k in informative:
                values += signal * directions[label]  # every token, CLS included, leans towards its class
            store.add(index, k, codec.encode(values, backbone=BACKBONE, k=k))
    return store, store.indices("train"), store.indices("val")


# --------------------------------------------------------------------------------------------- training


def test_loss_falls_and_val_accuracy_reaches_near_perfect_on_separable_features():
    # Prepare
    store, train, val = synthetic_store()
    config = TrainConfig(epochs=8, batch_size=32, lr=3e-3, seed=0)
    seen: list[EpochStats] = []

    # Execute
    result = train_edge_network(store, 1, EDGE, config, train_indices=train, val_indices=val, on_epoch=seen.append)

    # Assert
    assert [s.epoch for s in seen] == list(range(1, 9)) and seen == result.history
    assert result.history[-1].train_loss < 0.5 * result.history[0].train_loss
    assert result.best_val_accuracy >= 0.98
    assert result.history[result.kept_epoch - 1].val_accuracy == result.best_val_accuracy
    assert all(s.images_per_second > 0 and s.k == 1 and s.phase == "final" for s in result.history)
    assert not result.model.training


def test_same_seed_gives_bitwise_identical_weights_and_another_seed_does_not():
    # Prepare
    store, train, val = synthetic_store(count=96)
    config = TrainConfig(epochs=3, batch_size=16, seed=5)

    # Execute
    first = train_edge_network(store, 1, EDGE, config, train_indices=train, val_indices=val)
    second = train_edge_network(store, 1, EDGE, config, train_indices=train, val_indices=val)
    other = train_edge_network(
        store, 1, EDGE, TrainConfig(epochs=3, batch_size=16, seed=6), train_indices=train, val_indices=val
    )

    # Assert
    a, b, c = (r.model.state_dict() for r in (first, second, other))
    assert list(a) == list(b)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert [s.train_loss for s in first.history] == [s.train_loss for s in second.history]
    assert not all(torch.equal(a[name], c[name]) for name in a)


def test_micro_batches_give_the_whole_batch_update_up_to_rounding():
    # Prepare
    store, train, val = synthetic_store(count=96)
    whole_config = TrainConfig(epochs=2, batch_size=24, micro_batch_size=24)
    micro_config = TrainConfig(epochs=2, batch_size=24, micro_batch_size=5)  # chunks of 5, 5, 5, 5, 4

    # Execute
    whole = train_edge_network(store, 1, EDGE, whole_config, train_indices=train, val_indices=val)
    micro = train_edge_network(store, 1, EDGE, micro_config, train_indices=train, val_indices=val)

    # Assert
    a, b = whole.model.state_dict(), micro.model.state_dict()
    assert all(torch.allclose(a[name], b[name], atol=1e-5) for name in a)
    assert not all(torch.equal(a[name], b[name]) for name in a)  # really a different summation order
    assert micro.history[-1].train_loss == pytest.approx(whole.history[-1].train_loss, rel=1e-5)


def test_default_micro_batch_caps_one_feature_map_at_4_mib():
    config = TrainConfig(batch_size=32)
    assert config.micro_batch_for(197, 768) == 6  # 6 x 197 x 768 x 4 bytes = 3.5 MiB
    assert config.micro_batch_for(TOKENS, DIMS) == 32  # tiny features: the whole batch at once
    assert config.micro_batch_for(577, 1024) == 1
    assert TrainConfig(batch_size=32, micro_batch_size=64).micro_batch_for(197, 768) == 32


def test_training_leaves_global_rng_and_determinism_setting_alone():
    # Prepare
    store, train, val = synthetic_store(count=48)
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    deterministic_before = torch.are_deterministic_algorithms_enabled()

    # Execute
    train_edge_network(store, 1, EDGE, TrainConfig(epochs=1), train_indices=train, val_indices=val)

    # Assert
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before


def test_keep_final_and_no_val_split_return_the_last_epoch():
    # Prepare
    store, train, val = synthetic_store(count=96)

    # Execute
    final = train_edge_network(
        store, 1, EDGE, TrainConfig(epochs=3, keep="final"), train_indices=train, val_indices=val
    )
    no_val = train_edge_network(store, 1, EDGE, TrainConfig(epochs=3), train_indices=train)

    # Assert
    assert final.kept_epoch == 3 and final.final_val_accuracy == final.history[-1].val_accuracy
    assert no_val.kept_epoch == 3
    assert no_val.best_val_accuracy is None and no_val.history[-1].val_loss is None


def test_on_step_reports_running_figures_for_every_step():
    # Prepare
    store, train, _ = synthetic_store(count=80)  # 60 train images, batch 25 -> steps of 25, 25, 10
    steps = []

    # Execute
    train_edge_network(store, 1, EDGE, TrainConfig(epochs=2, batch_size=25), train_indices=train, on_step=steps.append)

    # Assert
    assert [(s.epoch, s.step, s.steps) for s in steps] == [
        (1, 1, 3),
        (1, 2, 3),
        (1, 3, 3),
        (2, 1, 3),
        (2, 2, 3),
        (2, 3, 3),
    ]
    assert all(0 <= s.accuracy <= 1 and s.loss > 0 and s.epochs == 2 for s in steps)


def test_diverging_training_stops_with_advice():
    store, train, _ = synthetic_store(count=48, signal=1e4, codec="f32-zstd")
    with pytest.raises(InvalidArgumentError, match="training diverged at epoch .*lower the learning rate"):
        train_edge_network(store, 1, EDGE, TrainConfig(epochs=3, lr=1e30, warmup_epochs=0), train_indices=train)


def test_training_refuses_features_that_do_not_fit():
    # Prepare
    store, train, val = synthetic_store(count=24)
    wrong_tokens = EdgeNetworkConfig(dims=DIMS, tokens=TOKENS + 1, num_classes=CLASSES, rank=8)
    wrong_classes = EdgeNetworkConfig(dims=DIMS, tokens=TOKENS, num_classes=CLASSES + 1, rank=8)
    config = TrainConfig(epochs=1)

    # Execute / Assert
    with pytest.raises(
        FailedPreconditionError, match=r"features are \[17, 32\] but the edge network expects .* \[18, 32\]"
    ):
        train_edge_network(store, 1, wrong_tokens, config, train_indices=train)
    with pytest.raises(FailedPreconditionError, match="4 classes but the data has 3"):
        train_edge_network(store, 1, wrong_classes, config, train_indices=train)
    with pytest.raises(FailedPreconditionError, match="24 image.s. have no k=2 feature"):
        train_edge_network(store, 2, EDGE, config, train_indices=train, val_indices=val)
    with pytest.raises(InvalidArgumentError, match="at least one training image"):
        train_edge_network(store, 1, EDGE, config, train_indices=[])
    with pytest.raises(FailedPreconditionError, match="store is empty"):
        train_edge_network(FeatureStore([0, 1, 2], num_classes=3), 1, EDGE, config, train_indices=[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"batch_size": 2.5}, "batch_size must be an integer"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"weight_decay": -1e-4}, "weight_decay must be a finite number >= 0"),
        ({"epochs": 10, "warmup_epochs": 10}, r"warmup_epochs \(10\) must be less than epochs \(10\)"),
        ({"min_lr": 1.0}, "min_lr .* must not exceed lr"),
        ({"label_smoothing": 1.0}, "label_smoothing must be a finite number >= 0.0 and < 1.0"),
        ({"readout_dropout": 1.0}, "readout_dropout must be a finite number >= 0.0 and < 1.0"),
        ({"grad_clip_norm": 0}, "grad_clip_norm must be a finite number > 0"),
        ({"keep": "last"}, "keep must be 'best' or 'final'"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"micro_batch_size": 0}, "micro_batch_size must be an integer >= 1"),
    ],
)
def test_bad_train_config(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        TrainConfig(**kwargs)


def test_adamw_matches_torch_optim_adamw_bitwise():
    # Prepare: the same network twice, one stepped by torch.optim.AdamW with the same no-decay-on-1-D groups
    torch.manual_seed(0)
    ours_model, theirs_model = EdgeNetwork(EDGE, zero_init_proj=False), EdgeNetwork(EDGE, zero_init_proj=False)
    theirs_model.load_state_dict(ours_model.state_dict())
    ours = AdamW(ours_model, weight_decay=0.05)
    groups = [
        {"params": [p for p in theirs_model.parameters() if p.ndim >= 2], "weight_decay": 0.05},
        {"params": [p for p in theirs_model.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]
    theirs = torch.optim.AdamW(groups, lr=1e-3)
    features = torch.randn(4, TOKENS, DIMS)
    labels = torch.tensor([0, 1, 2, 0])

    # Execute
    for step in range(5):
        lr = 1e-3 * (step + 1)
        for group in theirs.param_groups:
            group["lr"] = lr
        for model, optimizer in ((ours_model, ours), (theirs_model, theirs)):
            optimizer.zero_grad()
            F.cross_entropy(model(features), labels).backward()
        ours.step(lr)
        theirs.step()

    # Assert
    ours_state, theirs_state = ours_model.state_dict(), theirs_model.state_dict()
    assert all(torch.equal(ours_state[name], theirs_state[name]) for name in ours_state)
    assert not torch.equal(ours_state["head.weight"], EdgeNetwork(EDGE).state_dict()["head.weight"])


def test_training_never_imports_torch_dynamo():
    # Prepare: a fresh interpreter, since other tests may have imported it in this one
    script = textwrap.dedent(
        """
        import sys
        from tests.unit.test_training import EDGE, TrainConfig, synthetic_store, train_edge_network
        store, train, val = synthetic_store(count=24)
        train_edge_network(store, 1, EDGE, TrainConfig(epochs=1, grad_clip_norm=1.0), train_indices=train, val_indices=val)
        print(sorted(m for m in ("torch._dynamo", "torch._inductor", "sympy") if m in sys.modules))
        """
    )

    # Execute
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)

    # Assert: torch.optim and use_deterministic_algorithms would import all three (+150 MB RSS)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# -------------------------------------------------------------------------------------------- schedule


def test_learning_rate_warms_up_linearly_then_follows_a_cosine():
    # Prepare
    schedule = {"total_steps": 100, "warmup_steps": 10, "base_lr": 1e-3, "min_lr": 1e-5}

    # Execute
    lrs = [lr_at_step(step, **schedule) for step in range(100)]

    # Assert
    assert lrs[0] == pytest.approx(1e-4) and lrs[4] == pytest.approx(5e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # half-way through the cosine
    assert lrs[99] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a < b for a, b in itertools.pairwise(lrs[:10]))
    assert all(a > b for a, b in itertools.pairwise(lrs[10:]))


def test_default_warm_up_is_a_tenth_of_the_epochs_and_training_follows_the_schedule():
    # Prepare
    store, train, _ = synthetic_store(count=64)  # 48 train images, batch 16 -> 3 steps per epoch
    config = TrainConfig(epochs=10, batch_size=16, lr=2e-3)

    # Execute
    result = train_edge_network(store, 1, EDGE, config, train_indices=train)

    # Assert: one warm-up epoch, so epoch 1 ends exactly at the peak; then every epoch ends lower
    assert config.resolved_warmup_epochs == 1 and TrainConfig(epochs=100).resolved_warmup_epochs == 10
    lrs = [s.lr for s in result.history]
    assert lrs[0] == pytest.approx(2e-3)
    assert lrs[1] == pytest.approx(lr_at_step(5, total_steps=30, warmup_steps=3, base_lr=2e-3))
    assert all(a > b for a, b in itertools.pairwise(lrs))


# ------------------------------------------------------------------------------------------- k selection


def test_select_k_picks_the_only_informative_k_and_scores_every_candidate():
    # Prepare
    store, train, val = synthetic_store(count=150, ks=(1, 2, 3, 4), informative=(3,))
    epochs_seen = []

    # Execute
    selection = select_k(
        store, [1, 2, 3, 4], EDGE, TrainConfig(epochs=30, lr=3e-3), train_indices=train, val_indices=val,
        short_epochs=8, on_epoch=epochs_seen.append,
    )  # fmt: skip

    # Assert
    assert selection.chosen_k == 3
    assert sorted(selection.val_accuracy_by_k) == [1, 2, 3, 4] == sorted(selection.val_loss_by_k)
    assert selection.val_accuracy_by_k[3] >= 0.9
    assert max(selection.val_accuracy_by_k[k] for k in (1, 2, 4)) < 0.7  # chance is 1/3
    assert selection.epochs == 8
    assert [(s.k, s.phase) for s in epochs_seen] == [(k, "k-search") for k in (1, 2, 3, 4) for _ in range(8)]
    assert selection.to_dict()["val_accuracy_by_k"]["3"] == selection.val_accuracy_by_k[3]


def store_with_signals(signals: dict[int, float], count: int = 240) -> tuple[FeatureStore, list[int], list[int]]:
    """Every k gets the same noise per image plus `signals[k]` times its class direction (0: the same features)."""
    rng = np.random.default_rng(0)
    labels = [i % CLASSES for i in range(count)]
    directions = rng.normal(size=(CLASSES, DIMS)).astype(np.float32)
    splits = ["val" if i % 4 == 3 else "train" for i in range(count)]
    store = FeatureStore(labels, num_classes=CLASSES, splits=splits, backbone=BACKBONE)
    codec = FeatureCodec(CodecConfig.parse("f32-zstd"))
    for index, label in enumerate(labels):
        noise = rng.normal(size=(TOKENS, DIMS)).astype(np.float32)
        for k, signal in signals.items():
            store.add(index, k, codec.encode(noise + signal * directions[label], backbone=BACKBONE, k=k))
    return store, store.indices("train"), store.indices("val")


def test_select_k_breaks_a_complete_tie_by_the_smallest_k_whatever_the_candidate_order():
    # Prepare: bitwise the same features under k = 2, 3 and 4, so the same seed trains the same network for each
    store, train, val = store_with_signals({2: 3.0, 3: 3.0, 4: 3.0}, count=120)

    # Execute: the candidates in an order where the smallest comes neither first nor last
    selection = select_k(
        store, [4, 2, 3], EDGE, TrainConfig(epochs=10, lr=3e-3), train_indices=train, val_indices=val, short_epochs=2
    )

    # Assert: a real tie on both accuracy and loss (README: "ties: lower loss, then smaller k"), broken by k
    assert len(set(selection.val_accuracy_by_k.values())) == 1 and len(set(selection.val_loss_by_k.values())) == 1
    assert selection.chosen_k == 2


def test_select_k_breaks_an_accuracy_tie_by_the_lower_validation_loss_before_the_smaller_k():
    # Prepare: both ks separate the classes perfectly; k = 2's (weaker, measured) signal ends at the lower val loss
    store, train, val = store_with_signals({1: 8.0, 2: 3.0})

    # Execute
    selection = select_k(
        store, [1, 2], EDGE, TrainConfig(epochs=40, lr=3e-3), train_indices=train, val_indices=val, short_epochs=8
    )

    # Assert: equal accuracy (measured 1.0 both), so the lower loss wins although k = 1 is smaller
    assert selection.val_accuracy_by_k == {1: 1.0, 2: 1.0}
    assert selection.val_loss_by_k[2] < selection.val_loss_by_k[1]  # measured 0.118 against 0.189
    assert selection.chosen_k == 2


def test_short_runs_default_to_a_fifth_of_the_epochs():
    assert [default_short_epochs(epochs) for epochs in (1, 2, 5, 30, 100)] == [1, 2, 2, 6, 20]


def test_select_k_needs_validation_images_and_every_candidate_extracted():
    store, train, val = synthetic_store(count=24, ks=(1, 2))
    with pytest.raises(InvalidArgumentError, match="needs a validation split"):
        select_k(store, [1, 2], EDGE, TrainConfig(), train_indices=train, val_indices=[], short_epochs=1)
    with pytest.raises(FailedPreconditionError, match=r"24 image.s. lack features for some of k = \[1, 2, 3\]"):
        select_k(store, [1, 2, 3], EDGE, TrainConfig(), train_indices=train, val_indices=val, short_epochs=1)
    with pytest.raises(InvalidArgumentError, match="at least one candidate"):
        select_k(store, [], EDGE, TrainConfig(), train_indices=train, val_indices=val)


# ------------------------------------------------------------------------------------- predict / evaluate


def test_predict_returns_probabilities_that_match_the_evaluation():
    # Prepare
    store, train, val = synthetic_store(count=96)
    model = train_edge_network(store, 1, EDGE, TrainConfig(epochs=4, lr=3e-3), train_indices=train).model
    features, labels = store.batch(val, 1)

    # Execute
    probabilities = predict(model, features)
    single = predict(model, features[0].numpy())
    report = evaluate(model, store, 1, val, ["a", "b", "c"])

    # Assert
    assert probabilities.shape == (len(val), CLASSES) and probabilities.dtype == torch.float32
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(len(val)))
    assert single.shape == (1, CLASSES) and torch.allclose(single[0], probabilities[0], atol=1e-6)
    accuracy = float((probabilities.argmax(dim=1) == labels).float().mean())
    assert report.accuracy == pytest.approx(accuracy)
    assert report.count == len(val) == sum(map(sum, report.confusion_matrix))


def test_report_from_hand_made_predictions():
    # Prepare: 3 of class a (2 right), 2 of class b (both right), 1 of class c (wrong), none of class d
    predictions = Predictions(labels=np.array([0, 0, 0, 1, 1, 2]), predicted=np.array([0, 1, 0, 1, 1, 0]), loss_sum=3.0)

    # Execute
    report = report_from_predictions(predictions, ["a", "b", "c", "d"])

    # Assert
    assert report.count == 6 and report.accuracy == pytest.approx(4 / 6) and report.loss == pytest.approx(0.5)
    assert report.confusion_matrix == ((2, 1, 0, 0), (0, 2, 0, 0), (1, 0, 0, 0), (0, 0, 0, 0))
    assert report.per_class_accuracy == (pytest.approx(2 / 3), 1.0, 0.0, None)
    assert report.balanced_accuracy == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert report.to_dict() == {
        "count": 6,
        "accuracy": report.accuracy,
        "balanced_accuracy": report.balanced_accuracy,
        "loss": 0.5,
        "class_names": ["a", "b", "c", "d"],
        "per_class_accuracy": {"a": report.per_class_accuracy[0], "b": 1.0, "c": 0.0, "d": None},
        "confusion_matrix": [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]],
    }


class _FirstTokenLogits(nn.Module):
    """Logits = the first C values of the CLS token: predictions are whatever the features say."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, :CLASSES]


def test_evaluate_scores_a_model_over_stored_features_in_batches():
    # Prepare: each image's CLS token votes for a chosen class with logit 10
    labels = [0, 0, 1, 1, 2]
    votes = [0, 2, 1, 1, 1]
    store = FeatureStore(labels, num_classes=CLASSES)
    codec = FeatureCodec(CodecConfig.parse("f32-none"))
    for index, vote in enumerate(votes):
        values = np.zeros((TOKENS, DIMS), dtype=np.float32)
        values[0, vote] = 10.0
        store.add(index, 1, codec.encode(values, k=1))
    expected_loss = -math.log(math.exp(10) / (math.exp(10) + 2)) * 3 / 5 + (-math.log(1 / (math.exp(10) + 2))) * 2 / 5

    # Execute
    report = evaluate(_FirstTokenLogits(), store, 1, range(5), ["x", "y", "z"], batch_size=2)

    # Assert
    assert report.confusion_matrix == ((1, 0, 1), (0, 2, 0), (0, 1, 0))
    assert report.per_class_accuracy == (0.5, 1.0, 0.0)
    assert report.accuracy == pytest.approx(0.6)
    assert report.loss == pytest.approx(expected_loss, rel=1e-5)


def test_evaluate_bad_arguments():
    store, _, val = synthetic_store(count=12)
    with pytest.raises(InvalidArgumentError, match="got 2 class names for a store of 3 classes"):
        evaluate(_FirstTokenLogits(), store, 1, val, ["a", "b"])
    with pytest.raises(InvalidArgumentError, match="at least one image"):
        evaluate(_FirstTokenLogits(), store, 1, [], ["a", "b", "c"])
    with pytest.raises(InvalidArgumentError, match="batch_size must be an integer >= 1"):
        evaluate(_FirstTokenLogits(), store, 1, val, ["a", "b", "c"], batch_size=0)


# ---------------------------------------------------------------------------------------------- progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_mode_resolution():
    assert resolve_mode("auto", _Terminal(), environ={}) == "bar"
    assert resolve_mode("auto", io.StringIO(), environ={}) == "log"
    for env in ({"CI": "true"}, {"NO_COLOR": "1"}, {"TERM": "dumb"}):
        assert resolve_mode("auto", _Terminal(), environ=env) == "log"
    assert resolve_mode("quiet", _Terminal(), environ={}) == "quiet"
    with pytest.raises(InvalidArgumentError, match="progress mode must be one of"):
        resolve_mode("fancy", _Terminal(), environ={})  # type: ignore[arg-type]


def test_progress_bar_redraws_in_place_and_leaves_one_line_per_epoch():
    # Prepare
    store, train, val = synthetic_store(count=64)
    terminal = _Terminal()
    reporter = ProgressReporter("bar", stream=terminal, min_interval_s=0.0)

    # Execute
    with reporter:
        reporter.on_extraction(32, 64, 32 * 1000)
        reporter.on_extraction(64, 64, 64 * 1000)
        train_edge_network(
            store, 1, EDGE, TrainConfig(epochs=2, batch_size=16), train_indices=train, val_indices=val,
            on_epoch=reporter.on_epoch, on_step=reporter.on_step,
        )  # fmt: skip
        reporter.message("done")

    # Assert
    lines = terminal.getvalue().split("\n")
    assert lines[0].endswith("extracting [####################] 64/64 images, 1.0 KiB/image")
    assert "\r" in lines[0]  # the 50 % state was drawn first and overwritten
    assert "[k=1] epoch 1/2 [" in lines[1] and "img/s" in lines[1]
    final_epoch_line = lines[2].split("\r")[-1]
    assert final_epoch_line.startswith("[k=1] epoch 2/2: loss ") and "val acc" in final_epoch_line
    assert final_epoch_line.endswith(" s")  # finished lines are never cut at the terminal width
    assert lines[3:] == ["done", ""]


def test_quiet_progress_writes_nothing(caplog):
    # Prepare
    terminal = _Terminal()
    reporter = ProgressReporter("quiet", stream=terminal)
    store, train, _ = synthetic_store(count=16)

    # Execute
    with caplog.at_level(logging.DEBUG, logger="mist.tuner.progress"), reporter:
        reporter.on_extraction(16, 16, 1000)
        train_edge_network(store, 1, EDGE, TrainConfig(epochs=1), train_indices=train, on_epoch=reporter.on_epoch)
        reporter.message("hello")

    # Assert
    assert terminal.getvalue() == ""
    assert caplog.records == []


def test_progress_log_mode_writes_one_record_per_epoch_and_per_tenth_of_extraction(caplog):
    # Prepare
    store, train, _ = synthetic_store(count=32)
    reporter = ProgressReporter("log", stream=io.StringIO())

    # Execute
    with caplog.at_level(logging.INFO, logger="mist.tuner.progress"):
        for done in range(0, 101):
            reporter.on_extraction(done, 100, done * 500)
        train_edge_network(
            store,
            1,
            EDGE,
            TrainConfig(epochs=3),
            train_indices=train,
            on_epoch=reporter.on_epoch,
            on_step=reporter.on_step,
        )

    # Assert
    messages = [record.getMessage() for record in caplog.records]
    extraction = [m for m in messages if m.startswith("extracted")]
    assert len(extraction) == 11 and extraction[-1] == "extracted 100/100 images, 0.5 KiB/image"
    epochs = [m for m in messages if m.startswith("[k=1] epoch")]
    assert [m.split(":")[0] for m in epochs] == ["[k=1] epoch 1/3", "[k=1] epoch 2/3", "[k=1] epoch 3/3"]
