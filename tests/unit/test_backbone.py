"""load_backbone: weights files (safetensors, checkpoints), the offline cache, the loud random init, refusals, and
proof that nothing touches the network."""

from __future__ import annotations

import argparse
import hashlib
import re
import socket
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
from timm.models import get_pretrained_cfg

from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.extractor.backbone import RANDOM_INIT_WARNING, find_cached_weights, load_backbone, weights_fingerprint

NAME = "vit_tiny_patch16_224"
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


class NetworkAttempt(BaseException):
    """Raised by every patched network entry point; a BaseException so no `except Exception` can swallow it."""


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path) -> list[str]:
    """Empty private caches and no network: every connection or download attempt is recorded and raised."""
    attempts: list[str] = []

    def refuse(what: str):
        def blocked(*args, **kwargs):
            attempts.append(what)
            raise NetworkAttempt(what)

        return blocked

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse("huggingface_hub.hf_hub_download"))
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", refuse("file_download.hf_hub_download"))
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", refuse("timm hf_hub_download"))
    monkeypatch.setattr(timm.models._hub, "download_url_to_file", refuse("timm download_url_to_file"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse("torch.hub.download_url_to_file"))
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


def reference_model(seed: int, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(NAME, pretrained=False, **{**TINY_VIT, **overrides}).eval()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(123))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_random_init_warns_loudly_and_is_reproducible_per_seed(caplog) -> None:
    # Prepare
    rng_before = torch.get_rng_state()

    # Execute
    with caplog.at_level("WARNING", logger="services.extractor.backbone"):
        first = load_backbone(NAME, seed=0, model_kwargs=TINY_VIT)
    again = load_backbone(NAME, seed=0, model_kwargs=TINY_VIT)
    other_seed = load_backbone(NAME, seed=1, model_kwargs=TINY_VIT)
    other_arch = load_backbone(NAME, seed=0, model_kwargs={**TINY_VIT, "depth": 3})

    # Assert
    assert first.pretrained is False
    assert first.warning == RANDOM_INIT_WARNING
    assert "RANDOMLY INITIALISED" in caplog.text and "--weights PATH" in caplog.text
    assert re.fullmatch(r"random-0-[0-9a-f]{16}", first.weights_fingerprint)
    assert again.weights_fingerprint == first.weights_fingerprint
    assert other_seed.weights_fingerprint.startswith("random-1-")
    assert len({first.weights_fingerprint, other_seed.weights_fingerprint, other_arch.weights_fingerprint}) == 3
    assert torch.equal(first.model(images()), again.model(images()))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the seed did not leak into the caller's RNG


def test_loaded_model_is_frozen_with_geometry_and_data_config() -> None:
    # Execute
    loaded = load_backbone(NAME, model_kwargs=TINY_VIT)

    # Assert
    assert loaded.model.training is False
    assert not any(parameter.requires_grad for parameter in loaded.model.parameters())
    assert loaded.device == "cpu" and loaded.autocast_dtype is None
    assert (loaded.geometry.num_blocks, loaded.geometry.tokens, loaded.geometry.dims) == (4, 17, 32)
    assert loaded.geometry.num_prefix_tokens == 1
    assert tuple(loaded.data_config["input_size"]) == (3, 32, 32)
    assert loaded.data_config["interpolation"] == "bicubic"
    with pytest.raises(TypeError):
        loaded.data_config["input_size"] = (3, 64, 64)  # type: ignore[index]


def test_safetensors_weights_load_exactly(tmp_path) -> None:
    # Prepare
    reference = reference_model(seed=5)
    path = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(reference.state_dict(), str(path))

    # Execute
    loaded = load_backbone(NAME, weights=path, seed=0, model_kwargs=TINY_VIT)

    # Assert
    assert loaded.pretrained is True and loaded.warning == ""
    assert loaded.weights_fingerprint == sha256_of(path) == weights_fingerprint(path)
    assert loaded.weights_source == str(path)
    assert torch.equal(loaded.model(images()), reference(images()))


@pytest.mark.parametrize("layout", ["state_dict", "wrapped", "ddp_model", "training_checkpoint", "legacy_format"])
def test_pytorch_checkpoints_load_exactly(tmp_path, layout: str) -> None:
    # Prepare
    reference = reference_model(seed=6)
    state = reference.state_dict()
    payload = {
        "state_dict": state,
        "legacy_format": state,
        "wrapped": {"state_dict": state, "epoch": 3},
        "ddp_model": {"model": {f"module.{key}": value for key, value in state.items()}},
        # what timm's train.py writes: args is an argparse.Namespace
        "training_checkpoint": {"arch": NAME, "state_dict": state, "args": argparse.Namespace(lr=0.1), "version": 2},
    }[layout]
    path = tmp_path / "tiny.pth"
    torch.save(payload, path, _use_new_zipfile_serialization=layout != "legacy_format")

    # Execute
    loaded = load_backbone(NAME, weights=path, model_kwargs=TINY_VIT)

    # Assert
    assert loaded.pretrained is True
    assert loaded.weights_fingerprint == sha256_of(path)
    assert torch.equal(loaded.model(images()), reference(images()))


def test_ema_weights_are_preferred_like_timm_does(tmp_path) -> None:
    # Prepare
    plain, ema = reference_model(seed=7), reference_model(seed=8)
    path = tmp_path / "with-ema.pth.tar"
    torch.save({"state_dict": plain.state_dict(), "state_dict_ema": ema.state_dict()}, path)

    # Execute
    loaded = load_backbone(NAME, weights=path, model_kwargs=TINY_VIT)

    # Assert
    assert torch.equal(loaded.model(images()), ema(images()))


def test_checkpoint_of_another_depth_names_the_missing_keys(tmp_path) -> None:
    # Prepare
    path = tmp_path / "depth2.safetensors"
    safetensors.torch.save_file(reference_model(seed=0, depth=2).state_dict(), str(path))

    # Execute
    with pytest.raises(FailedPreconditionError) as caught:
        load_backbone(NAME, weights=path, model_kwargs=TINY_VIT)

    # Assert
    message = str(caught.value)
    assert "missing keys (24)" in message
    assert "blocks.2.norm1.weight" in message
    assert str(path) in message


def test_checkpoint_of_another_width_names_the_shape_mismatch(tmp_path) -> None:
    # Prepare
    path = tmp_path / "wide.pth"
    torch.save(reference_model(seed=0, embed_dim=48).state_dict(), path)

    # Execute
    with pytest.raises(FailedPreconditionError) as caught:
        load_backbone(NAME, weights=path, model_kwargs=TINY_VIT)

    # Assert
    assert "shape mismatches" in str(caught.value)
    assert "cls_token (1, 1, 48) (model: (1, 1, 32))" in str(caught.value)


def _pwned(marker: str) -> None:
    Path(marker).write_text("arbitrary code ran")


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_pwned, (str(self.marker),))


def test_pickle_with_arbitrary_objects_is_refused_without_running_them(tmp_path) -> None:
    # Prepare: a checkpoint whose unpickling would call _pwned and write a file.
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": reference_model(seed=0).state_dict(), "extra": Payload(marker)}, path)

    # Execute
    with pytest.raises(InvalidArgumentError) as caught:
        load_backbone(NAME, weights=path, model_kwargs=TINY_VIT)

    # Assert
    assert "refused" in str(caught.value)
    assert not marker.exists()


def test_non_tensor_entries_are_refused(tmp_path) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"blocks.0.norm1.weight": [1.0, 2.0]}, path)
    with pytest.raises(InvalidArgumentError, match="not a tensor"):
        load_backbone(NAME, weights=path, model_kwargs=TINY_VIT)


def test_a_checkpoint_that_is_not_a_state_dict_is_refused(tmp_path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(InvalidArgumentError, match="does not contain a state dict"):
        load_backbone(NAME, weights=path, model_kwargs=TINY_VIT)


def test_a_checkpoint_named_safetensors_is_refused_with_a_hint(tmp_path) -> None:
    # timm picks its loader by the suffix; the content says PyTorch, so the user is told to rename the file.
    path = tmp_path / "tiny.safetensors"
    torch.save(reference_model(seed=0).state_dict(), path)
    with pytest.raises(InvalidArgumentError, match=r"named \.safetensors but holds a PyTorch checkpoint: rename it"):
        load_backbone(NAME, weights=path, model_kwargs=TINY_VIT)


def test_loading_a_checkpoint_logs_no_host_path(tmp_path, caplog) -> None:
    # Prepare
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": reference_model(seed=0).state_dict()}, path)

    # Execute
    with caplog.at_level("DEBUG"):
        load_backbone(NAME, weights=path, model_kwargs=TINY_VIT)

    # Assert: timm names the file it read; the log shows its name only
    assert "tiny.pth" in caplog.text
    assert str(tmp_path) not in caplog.text


def test_nan_weights_are_refused(tmp_path) -> None:
    # Prepare
    state = reference_model(seed=0).state_dict()
    state["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    safetensors.torch.save_file(state, str(path))

    # Execute / Assert
    with pytest.raises(InvalidArgumentError, match="blocks.1.mlp.fc1.weight contains NaN"):
        load_backbone(NAME, weights=path, model_kwargs=TINY_VIT)


@pytest.mark.parametrize(
    ("content", "error", "text"),
    [
        (b"this is not a checkpoint", InvalidArgumentError, "neither a safetensors file nor a PyTorch checkpoint"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{broken", InvalidArgumentError, "looks like safetensors"),
        (b"PK\x03\x04" + b"\x00" * 40, InvalidArgumentError, "not a readable PyTorch checkpoint"),
    ],
    ids=["text", "bad-safetensors", "bad-zip"],
)
def test_unreadable_weights_files_are_refused(tmp_path, content: bytes, error: type, text: str) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(content)
    with pytest.raises(error, match=text):
        load_backbone(NAME, weights=path, model_kwargs=TINY_VIT)


def test_missing_weights_file_is_not_found(tmp_path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        load_backbone(NAME, weights=tmp_path / "nope.safetensors", model_kwargs=TINY_VIT)


def test_unknown_model_name_is_not_found_with_a_hint() -> None:
    with pytest.raises(NotFoundError) as caught:
        load_backbone("vit_tiny_patch16_22")
    assert "timm.list_models('vit_*')" in str(caught.value)
    assert "Did you mean vit_tiny_patch16_224" in str(caught.value)


def test_unknown_pretrained_tag_is_not_found() -> None:
    with pytest.raises(NotFoundError, match="Invalid pretrained tag"):
        load_backbone(f"{NAME}.no_such_tag", model_kwargs=TINY_VIT)


def test_non_vit_model_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="neither a ViT-family model nor a hierarchical pvt_v2"):
        load_backbone("resnet18")


def test_a_pvt_v2_is_served_squashed_at_512_px_by_default() -> None:
    loaded = load_backbone("pvt_v2_b0", model_kwargs={"depths": (1, 1, 1, 1)})

    assert loaded.architecture == "hierarchical" and load_backbone(NAME, model_kwargs=TINY_VIT).architecture == "vit"
    assert (loaded.data_config["input_size"], loaded.data_config["crop_pct"], loaded.data_config["crop_mode"]) == (
        (3, 512, 512), 1.0, "squash")  # fmt: skip
    assert [(stage.height, stage.dims) for stage in loaded.geometry.stages] == [(128, 32), (64, 64), (32, 160),
                                                                                (16, 256)]  # fmt: skip


@pytest.mark.parametrize("size", [16, 48, 500])
def test_an_input_size_off_the_32_grid_is_refused(size: int) -> None:
    with pytest.raises(InvalidArgumentError, match=f"--input-size must be a multiple of 32.*got {size}"):
        load_backbone("pvt_v2_b0", input_size=size)


def test_an_unknown_name_suggests_pvt_v2_backbones_too() -> None:
    with pytest.raises(NotFoundError, match=r"Did you mean .*pvt_v2_b2_li.*timm.list_models\('pvt_v2_\*'\)"):
        load_backbone("pvt_v2_b2_lin")


def test_bad_model_kwargs_are_invalid() -> None:
    with pytest.raises(InvalidArgumentError, match="model_kwargs"):
        load_backbone(NAME, model_kwargs={**TINY_VIT, "no_such_option": 1})


def test_bf16_precision_on_cpu_computes_in_bfloat16() -> None:
    # Prepare
    loaded = load_backbone(NAME, precision="bf16", model_kwargs=TINY_VIT)

    # Execute
    with loaded.autocast():
        output = loaded.model(images())

    # Assert
    assert loaded.autocast_dtype is torch.bfloat16
    assert output.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        (dict(device="cpu", precision="fp16"), InvalidArgumentError),
        (dict(device="tpu"), InvalidArgumentError),
        (dict(precision="int8"), InvalidArgumentError),
    ],
)
def test_bad_runtime_settings_are_refused(settings: dict, error: type) -> None:
    with pytest.raises(error):
        load_backbone(NAME, model_kwargs=TINY_VIT, **settings)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_failed_precondition() -> None:
    with pytest.raises(FailedPreconditionError, match="CUDA is not available"):
        load_backbone(NAME, device="cuda", model_kwargs=TINY_VIT)


def _populate_hf_cache(cache_dir: Path, state: dict[str, torch.Tensor]) -> Path:
    """Lay a file out the way huggingface_hub caches `model.safetensors` of the model's default weights repo."""
    repo_id = get_pretrained_cfg(NAME).hf_hub_id
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    path = snapshot / "model.safetensors"
    safetensors.torch.save_file(state, str(path))
    return path


def test_weights_already_in_the_hf_cache_are_used_offline() -> None:
    # Prepare
    reference = reference_model(seed=9)
    cached = _populate_hf_cache(Path(huggingface_hub.constants.HF_HUB_CACHE), reference.state_dict())

    # Execute
    found = find_cached_weights(NAME)
    loaded = load_backbone(NAME, model_kwargs=TINY_VIT)

    # Assert
    assert found is not None and found.path == cached and found.origin == "hf-hub"
    assert loaded.pretrained is True and loaded.warning == ""
    assert loaded.weights_fingerprint == sha256_of(cached)
    assert loaded.weights_source == str(cached)
    assert torch.equal(loaded.model(images()), reference(images()))


def test_cached_weights_that_do_not_fit_are_a_failed_precondition() -> None:
    # Prepare
    _populate_hf_cache(Path(huggingface_hub.constants.HF_HUB_CACHE), reference_model(seed=0, depth=2).state_dict())

    # Execute / Assert
    with pytest.raises(FailedPreconditionError, match="cached weights .* do not load"):
        load_backbone(NAME, model_kwargs=TINY_VIT)


def test_empty_cache_finds_nothing_and_falls_back_to_random_init(offline) -> None:
    # Execute
    found = find_cached_weights(NAME)
    loaded = load_backbone(NAME, model_kwargs=TINY_VIT)

    # Assert: nothing found, random init, and (checked by the fixture) no network attempt on the way.
    assert found is None
    assert loaded.pretrained is False
    assert offline == []


def test_the_offline_guard_would_catch_a_download(offline) -> None:
    # The control for the fixture: timm's own pretrained download path does hit a guarded entry point.
    with pytest.raises(NetworkAttempt):
        timm.create_model(NAME, pretrained=True, **TINY_VIT)
    assert offline != []
    offline.clear()  # expected here; the fixture fails any other test that records an attempt


def test_a_model_that_does_not_take_rgb_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="takes 1 input channels"):
        load_backbone(NAME, model_kwargs={**TINY_VIT, "in_chans": 1})
