"""The numpy runtime computes what the torch network computes: same argmax, probabilities within 1e-4, on trained
and random weights of every pooling, several heads and ranks, fed features decoded from every codec; and it refuses
bad weights with the torch loader's errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.pb import feature_pb2
from services.common.wire.codec import CodecConfig, FeatureCodec, decode_feature
from services.common.wire.edge_spec import EdgeNetworkConfig
from services.tuner.edge_network import EdgeNetwork, to_safetensors_bytes
from services.tuner.edge_numpy import NumpyEdgeNetwork
from services.tuner.feature_store import FeatureStore
from services.tuner.options import TrainConfig
from services.tuner.predict import load_network, probabilities
from services.tuner.training import predict, train_edge_network

TOKENS, DIMS, CLASSES = 17, 32, 4
BACKBONE = feature_pb2.BackboneId(name="vit_tiny_test", weights_fingerprint="random-0")
TOLERANCE = 1e-4  # the bar; measured differences are ~1e-7 (float32 rounding of the same operations)


def features(count: int, codec: str, *, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    """[count, T, D] features as a device receives them: encoded with `codec` and decoded again."""
    rng = np.random.default_rng(seed)
    encoder = FeatureCodec(CodecConfig.parse(codec))
    raw = (rng.normal(size=(count, TOKENS, DIMS)) * scale).astype(np.float32)
    return np.stack([decode_feature(encoder.encode(x, backbone=BACKBONE, k=1)) for x in raw])


def random_network(config: EdgeNetworkConfig, seed: int) -> EdgeNetwork:
    """Every weight random, LayerNorms included, so that each part of the forward matters to the result."""
    torch.manual_seed(seed)
    model = EdgeNetwork(config, zero_init_proj=False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
            elif name.endswith("norm.bias"):
                parameter.copy_(0.3 * torch.randn_like(parameter))
    return model.eval()


def trained_network(config: EdgeNetworkConfig, seed: int) -> EdgeNetwork:
    """A few epochs of the real training code on separable features of CLASSES classes."""
    rng = np.random.default_rng(seed)
    labels = [i % CLASSES for i in range(48)]
    directions = rng.normal(size=(CLASSES, DIMS)).astype(np.float32)
    store = FeatureStore(labels, num_classes=CLASSES, backbone=BACKBONE)
    encoder = FeatureCodec(CodecConfig.parse("f32-zstd"))
    for index, label in enumerate(labels):
        values = rng.normal(size=(TOKENS, DIMS)).astype(np.float32) + 2.0 * directions[label]
        store.add(index, 1, encoder.encode(values, backbone=BACKBONE, k=1))
    result = train_edge_network(store, 1, config, TrainConfig(epochs=3, batch_size=16, lr=3e-3, seed=seed),
                                train_indices=range(48))  # fmt: skip
    return result.model.eval()


CONFIGS = [
    EdgeNetworkConfig(dims=DIMS, tokens=TOKENS, num_classes=CLASSES, num_blocks=2, rank=4, heads=1, pooling="cls"),
    EdgeNetworkConfig(dims=DIMS, tokens=TOKENS, num_classes=CLASSES, num_blocks=3, rank=8, heads=2, pooling="mean"),
    EdgeNetworkConfig(dims=DIMS, tokens=TOKENS, num_classes=CLASSES, num_blocks=1, rank=16, heads=4, pooling="cls"),
    EdgeNetworkConfig(dims=DIMS, tokens=TOKENS, num_classes=CLASSES, num_blocks=4, rank=12, heads=3, pooling="mean"),
    EdgeNetworkConfig(
        dims=DIMS, tokens=TOKENS, num_classes=CLASSES, num_blocks=2, rank=8, heads=1, pooling="cls+tokens"
    ),  # fmt: skip
    EdgeNetworkConfig(
        dims=DIMS, tokens=TOKENS, num_classes=CLASSES, num_blocks=1, rank=4, heads=2, pooling="mean+tokens"
    ),  # fmt: skip
]


@pytest.mark.parametrize("codec", ["f32-none", "f16-zstd", "bf16-zstd", "i8-zstd"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"M{c.num_blocks}-r{c.rank}-h{c.heads}-{c.pooling}")
@pytest.mark.parametrize("weights", ["random", "trained"])
def test_numpy_and_torch_agree_on_every_image(codec, config, weights):
    # Prepare: one stored version (its safetensors bytes) and what a device would feed it
    model = random_network(config, seed=3) if weights == "random" else trained_network(config, seed=3)
    blob = to_safetensors_bytes(model)
    batch = features(24, codec, seed=CONFIGS.index(config))

    # Execute: the torch network as training.predict runs it, and both runtimes as predict.py loads them
    expected = predict(model, torch.from_numpy(batch)).numpy()
    numpy_runtime, _ = load_network(blob, config, "numpy")
    torch_runtime, _ = load_network(blob, config, "torch")
    got = probabilities(numpy_runtime.logits(batch))
    got_torch = probabilities(torch_runtime.logits(batch))

    # Assert: same argmax on every image, probabilities within the tolerance, not all one class
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert np.abs(got - expected).max() < TOLERANCE and np.abs(got_torch - expected).max() < TOLERANCE
    assert np.allclose(got.sum(axis=1), 1.0) and len(set(expected.argmax(axis=1))) > 1


def test_one_image_of_t_by_d_is_a_batch_of_one():
    config = CONFIGS[0]
    network, metadata = NumpyEdgeNetwork.from_safetensors_bytes(to_safetensors_bytes(random_network(config, 1)))
    image = features(1, "f32-none")[0]

    assert network.logits(image).shape == (1, CLASSES)
    assert np.array_equal(network.logits(image), network.logits(image[None]))
    assert EdgeNetworkConfig.from_json(metadata["mist.edge_network_config"]) == config


def test_bad_weights_and_features_are_refused_like_the_torch_loader():
    # Prepare
    config = CONFIGS[0]
    model = random_network(config, 2)
    blob = to_safetensors_bytes(model)
    nan_model = random_network(config, 2)
    with torch.no_grad():
        nan_model.head.bias[0] = float("nan")
    state = {name: value.detach().clone() for name, value in nan_model.state_dict().items()}
    nan_blob = _unchecked_blob(state, blob)
    other = EdgeNetworkConfig(dims=DIMS, tokens=TOKENS, num_classes=CLASSES + 1, num_blocks=2, rank=4)
    network, _ = NumpyEdgeNetwork.from_safetensors_bytes(blob, config)

    # Execute / Assert
    with pytest.raises(InvalidArgumentError, match="NaN or Inf"):
        NumpyEdgeNetwork.from_safetensors_bytes(nan_blob, config)
    with pytest.raises(FailedPreconditionError, match="the task expects"):
        NumpyEdgeNetwork.from_safetensors_bytes(blob, other)
    with pytest.raises(InvalidArgumentError, match="not a valid safetensors file"):
        NumpyEdgeNetwork.from_safetensors_bytes(b"\x80\x04garbage that is a pickle", config)
    with pytest.raises(InvalidArgumentError, match="not a valid safetensors file"):
        NumpyEdgeNetwork.from_safetensors_bytes(blob[: len(blob) // 2], config)
    with pytest.raises(InvalidArgumentError, match=r"expects features \[B >= 1, 17, 32\]"):
        network.logits(np.zeros((2, TOKENS, DIMS + 1), dtype=np.float32))
    with pytest.raises(InvalidArgumentError, match="floating point"):
        network.logits(np.zeros((2, TOKENS, DIMS), dtype=np.int64))
    with pytest.raises(InvalidArgumentError, match="runtime must be one of numpy, torch"):
        load_network(blob, config, "onnx")  # type: ignore[arg-type]


def _unchecked_blob(state: dict[str, torch.Tensor], like: bytes) -> bytes:
    """Safetensors bytes of `state` with `like`'s metadata, written without to_safetensors_bytes' finite check."""
    from safetensors.torch import save

    from services.common.wire.weights import parse_safetensors

    return save({name: t.contiguous() for name, t in state.items()}, metadata=parse_safetensors(like).metadata)
