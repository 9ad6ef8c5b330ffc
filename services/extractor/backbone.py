"""Loads the one frozen timm backbone the extractor serves, a ViT or a hierarchical pvt_v2; nothing here downloads.

    backbone = load_backbone("vit_base_patch16_224", weights="vit_b16.safetensors", device="cuda", precision="bf16")
    with backbone.autocast():
        features = gather(backbone.model, images, "mist", [3])     # services/extractor/gather.py
    backbone.weights_fingerprint, backbone.geometry, backbone.data_config

Weights come from, in order: the `weights` file (safetensors or a PyTorch/timm checkpoint, told apart by content
and loaded strictly; checkpoints never run pickled code), the timm / Hugging Face / torch.hub cache when it already
holds the model's default weights, or a random init seeded with `seed` (logged at WARNING and returned in
`LoadedBackbone.warning`).

A hierarchical backbone (timm's pvt_v2_*, services/extractor/hierarchical.py) is served at one square input size,
`input_size` (default 512 px, the paper's ADE20K size; a multiple of 32): every image is squashed to it whole
(crop_pct 1.0, crop_mode "squash"), so a segmentation mask can be squashed the same way. A ViT keeps the input size
it was built with (its img_size).

Errors: unknown model name -> NotFoundError; neither a timm VisionTransformer nor a pvt_v2, bad kwargs, an
input_size not a multiple of 32 or given for a ViT, unreadable weights file, NaN/Inf weights -> InvalidArgumentError; weights that do not fit the model, CUDA unavailable ->
FailedPreconditionError; missing weights file -> NotFoundError.

Precision: "fp32" (default), "bf16" or "fp16" for the forward pass, through torch.autocast: parameters stay float32
and only the compute inside `autocast()` is reduced. "bf16" works on CPU and CUDA (torch's CPU autocast supports
bfloat16; it pays off on CPUs with AVX512-BF16/AMX), "fp16" needs CUDA. What each costs in feature error against
fp32 is measured in docs/how-to/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import pickle
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import safetensors.torch
import timm
import torch
from timm.data import resolve_model_data_config
from timm.models import clean_state_dict, get_model_input_config, get_pretrained_cfg, load_state_dict

from services.common.errors import FailedPreconditionError, InvalidArgumentError, MistError, NotFoundError
from services.common.logging_setup import loggable_path
from services.common.wire.gather_modes import ArchitectureName, BackboneGeometry
from services.extractor.gather import backbone_geometry, check_supported, is_hierarchical

logger = logging.getLogger(__name__)

DeviceName = Literal["cpu", "cuda"]
PrecisionName = Literal["fp32", "bf16", "fp16"]

RANDOM_INIT_WARNING = (
    "features come from a RANDOMLY INITIALISED backbone; accuracy will be meaningless; "
    "pass --weights PATH (a .safetensors file or a timm checkpoint)"
)

_PRECISION_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The files timm reads from a Hugging Face repo, in its order (safetensors first).
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HASH_CHUNK_BYTES = 1 << 20
_KEYS_SHOWN = 5  # how many missing / unexpected keys an error message names
# Hierarchical backbones: the paper's ADE20K input size, and the stride of pvt_v2's last stage (whole token grids).
DEFAULT_HIERARCHICAL_INPUT_SIZE = 512
HIERARCHICAL_SIZE_MULTIPLE = 32
_FAMILIES = ("vit_*", "pvt_v2_*")  # what an unknown name is compared with


@dataclass(frozen=True)
class LoadedBackbone:
    """A frozen backbone ready to serve, and everything a client needs to know about where its weights came from."""

    model: torch.nn.Module  # a timm VisionTransformer or PyramidVisionTransformerV2; eval mode, on `device`, frozen
    name: str  # the timm model name as given (a pretrained tag included)
    weights_fingerprint: str  # sha256 hex of the weights file; "random-<seed>-<16 hex of the weights>" for random init
    pretrained: bool  # False: random init, features are meaningless
    warning: str  # "" when pretrained; RANDOM_INIT_WARNING otherwise
    weights_source: str  # the file the weights were read from, or "random init (seed N)"
    device: DeviceName  # where the model lives and runs
    autocast_dtype: torch.dtype | None  # compute dtype inside `autocast()`; None = plain float32
    data_config: Mapping[str, Any]  # timm's resolved data config (input_size: what is served), read-only
    geometry: BackboneGeometry  # N blocks, T tokens, D dims, prefix tokens; the stages of a hierarchical one
    architecture: ArchitectureName = "vit"  # "hierarchical" for pvt_v2 (k is then a stage)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context every forward pass should run in: torch.autocast with `autocast_dtype`, or a no-op."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=self.autocast_dtype)


@dataclass(frozen=True)
class CachedWeights:
    """A weights file already on local disk that timm would otherwise download for a model."""

    path: Path  # the file itself (in the HF cache: the snapshot symlink)
    origin: Literal["file", "hf-hub", "url"]  # which pretrained_cfg entry it stands for
    custom_load: bool  # True: a foreign format (e.g. original JAX .npz) loaded by the model's own loader


def weights_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks so a multi-GB checkpoint never sits in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def load_backbone(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    device: DeviceName = "cpu",
    precision: PrecisionName = "fp32",
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
    input_size: int = 0,
) -> LoadedBackbone:
    """Build timm model `name`, load its weights without any network access, freeze it and move it to `device`.

    `model_kwargs` go to timm.create_model (tests build tiny ViTs with img_size, patch_size, embed_dim, depth,
    num_heads). `input_size` is the square side a hierarchical backbone serves (0: 512); a ViT takes none. `seed` makes a random init reproducible; it is used under a forked RNG, so the caller's global
    torch RNG state is left as it was.
    """
    autocast_dtype = _check_runtime(device, precision)
    _check_name(name)
    check_input_size(input_size)
    kwargs = dict(model_kwargs or {})
    weights_path = _check_weights_path(weights) if weights is not None else None
    cached = find_cached_weights(name) if weights_path is None else None

    if weights_path is not None:
        model = _create_model(name, seed, kwargs)
        _load_state_dict_strict(model, read_state_dict(weights_path), weights_path)
        fingerprint, source, warning = weights_fingerprint(weights_path), str(weights_path), ""
    elif cached is not None:
        model = _create_from_cache(name, seed, kwargs, cached)
        fingerprint, source, warning = weights_fingerprint(cached.path), str(cached.path), ""
    else:
        model = _create_model(name, seed, kwargs)
        fingerprint, source, warning = (
            random_init_fingerprint(model, seed),
            f"random init (seed {seed})",
            RANDOM_INIT_WARNING,
        )
        logger.warning("backbone %s: %s (seed %d, fingerprint %s)", name, RANDOM_INIT_WARNING, seed, fingerprint)

    model.eval().requires_grad_(False).to(device)
    hierarchical = is_hierarchical(model)
    served_size = _served_input_size(name, input_size, hierarchical)
    loaded = LoadedBackbone(
        model=model,
        name=name,
        weights_fingerprint=fingerprint,
        pretrained=not warning,
        warning=warning,
        weights_source=source,
        device=device,
        autocast_dtype=autocast_dtype,
        data_config=types.MappingProxyType(_data_config(model, served_size)),
        geometry=backbone_geometry(model, served_size),
        architecture="hierarchical" if hierarchical else "vit",
    )
    logger.info("backbone %s loaded from %s on %s (fingerprint %s)", name, loggable_path(source), device, fingerprint)
    return loaded


def _check_runtime(device: str, precision: str) -> torch.dtype | None:
    if device not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"device must be 'cpu' or 'cuda'; got {device!r}")
    if precision not in _PRECISION_DTYPES:
        raise InvalidArgumentError(f"precision must be one of {', '.join(_PRECISION_DTYPES)}; got {precision!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise FailedPreconditionError(
            f"--device cuda was requested but CUDA is not available (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}); use --device cpu or install a CUDA build of torch"
        )
    if device == "cpu" and precision == "fp16":
        raise InvalidArgumentError("--precision fp16 needs --device cuda; on CPU use bf16 or fp32")
    if device == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise FailedPreconditionError("this GPU does not support bfloat16; use --precision fp16 or fp32")
    return _PRECISION_DTYPES[precision]


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(list(_FAMILIES)), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise NotFoundError(
            f"unknown timm model {name!r}.{hint} List the backbones served with timm.list_models('vit_*') "
            f"(ViTs) and timm.list_models('pvt_v2_*') (hierarchical)"
        )


def check_input_size(input_size: int) -> None:
    """InvalidArgumentError unless `input_size` is 0 (the default) or a multiple of 32 of at least 32."""
    if input_size and (input_size < HIERARCHICAL_SIZE_MULTIPLE or input_size % HIERARCHICAL_SIZE_MULTIPLE):
        raise InvalidArgumentError(
            f"--input-size must be a multiple of {HIERARCHICAL_SIZE_MULTIPLE} (the stride of the last stage), "
            f"at least {HIERARCHICAL_SIZE_MULTIPLE}, or 0 for {DEFAULT_HIERARCHICAL_INPUT_SIZE}; got {input_size}"
        )


def _served_input_size(name: str, input_size: int, hierarchical: bool) -> int:
    """The square side a hierarchical backbone serves (0 -> 512); 0 for a ViT, which must not be given one."""
    check_input_size(input_size)
    if not hierarchical:
        if input_size:
            raise InvalidArgumentError(
                f"--input-size is for hierarchical backbones (pvt_v2_*); {name!r} is a ViT: set its input size "
                f"when it is built, with --model-kwargs '{{\"img_size\": {input_size}}}'"
            )
        return 0
    return input_size or DEFAULT_HIERARCHICAL_INPUT_SIZE


def _check_weights_path(weights: str | os.PathLike[str]) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise NotFoundError(f"weights file {str(path)!r} does not exist (or is not a file)")
    return path


def _create_model(
    name: str, seed: int, kwargs: dict[str, Any], *, overlay: dict[str, Any] | None = None
) -> torch.nn.Module:
    """timm.create_model under a forked, seeded RNG; pretrained only when `overlay` names a local file."""
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=overlay is not None, pretrained_cfg_overlay=overlay, **kwargs)
    except TypeError as error:  # an unknown or ill-typed model kwarg
        raise InvalidArgumentError(f"cannot build {name!r} with model_kwargs {kwargs}: {error}") from error
    except RuntimeError as error:
        if "pretrained tag" in str(error):
            raise NotFoundError(
                f"{error} List the tags with timm.list_models({name.split('.')[0]!r}, pretrained=True)"
            ) from error
        raise
    if not is_hierarchical(model):
        try:
            check_supported(model)
        except InvalidArgumentError as error:
            raise InvalidArgumentError(
                f"backbone {name!r} is neither a ViT-family model nor a hierarchical pvt_v2: {error}"
            ) from None
    # From timm's record of the model's input, not patch_embed.proj: in hybrid ViTs that conv sees CNN features.
    in_chans = get_model_input_config(model)["input_size"][0]
    if in_chans != 3:
        raise InvalidArgumentError(f"backbone {name!r} takes {in_chans} input channels; images are RGB (3)")
    return model


def _create_from_cache(name: str, seed: int, kwargs: dict[str, Any], cached: CachedWeights) -> torch.nn.Module:
    # timm's own pretrained path, pointed at the local file: it applies the model's checkpoint filter (position
    # embedding resampling, foreign formats) and loads strictly, and a 'file' source never touches the network.
    overlay = {"file": str(cached.path), "custom_load": cached.custom_load}
    try:
        return _create_model(name, seed, kwargs, overlay=overlay)
    except MistError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError, pickle.UnpicklingError) as error:
        raise FailedPreconditionError(
            f"cached weights {cached.path} for {name!r} do not load into this model ({_first_line(error)}); "
            f"pass --weights PATH or remove that cache entry"
        ) from error


def find_cached_weights(name: str) -> CachedWeights | None:
    """The weights file timm would download for `name`, if a local cache already holds it; None otherwise.

    Looks, in timm's order, at the pretrained config's `file`, the Hugging Face hub cache (HF_HUB_CACHE) and the
    torch.hub checkpoint folder (TORCH_HOME). Only the file system is read.
    """
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as error:  # a tag the architecture does not have
        raise NotFoundError(str(error)) from error
    if cfg is None:
        return None
    if cfg.file and Path(cfg.file).is_file():
        return CachedWeights(Path(cfg.file), "file", bool(cfg.custom_load))
    if cfg.hf_hub_id:
        hit = _find_in_hf_cache(cfg.hf_hub_id, cfg.hf_hub_filename)
        if hit is not None:
            return CachedWeights(hit, "hf-hub", False)
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if candidate.is_file():
            return CachedWeights(candidate, "url", bool(cfg.custom_load))
    return None


def _find_in_hf_cache(hub_id: str, filename: str | None) -> Path | None:
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # timm works without huggingface_hub; then there is no HF cache to read
        return None
    repo_id, _, revision = hub_id.partition("@")
    for candidate in (filename,) if filename else _HF_WEIGHT_FILES:
        found = try_to_load_from_cache(repo_id, candidate, cache_dir=constants.HF_HUB_CACHE, revision=revision or None)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a PyTorch/timm checkpoint, on CPU, with wrapper prefixes removed.

    The format is read from the file's first bytes, not its suffix. Checkpoints are read by timm's own
    load_state_dict: torch.load(weights_only=True), so only tensors and plain containers (plus argparse.Namespace,
    which timm's training script stores as `args`) are accepted and a pickle that would construct other objects is
    refused before anything runs; a wrapped checkpoint is unwrapped the way timm does (state_dict_ema, model_ema,
    state_dict, model). Both formats lose DDP and torch.compile prefixes through timm's clean_state_dict.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then a JSON header
        try:
            raw: object = clean_state_dict(safetensors.torch.load_file(str(path), device="cpu"))
        except Exception as error:  # SafetensorError is not exported under a stable name
            raise InvalidArgumentError(
                f"{path} looks like safetensors but cannot be read: {_first_line(error)}"
            ) from error
    elif head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip archive, or its legacy raw pickle
        raw = _read_checkpoint(path)
    else:
        raise InvalidArgumentError(f"{path} is neither a safetensors file nor a PyTorch checkpoint")
    return _checked_tensors(raw, path)


def _read_checkpoint(path: Path) -> object:
    if path.name.endswith(".safetensors"):  # timm would pick its loader by this suffix
        raise InvalidArgumentError(
            f"{path} is named .safetensors but holds a PyTorch checkpoint: rename it (e.g. to .pth) and retry"
        )
    try:
        with _log_without_host_path(path):
            return load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except RuntimeError as error:
        if isinstance(error.__cause__, pickle.UnpicklingError):  # timm's wrapping of weights_only's refusal
            raise InvalidArgumentError(
                f"{path} holds objects other than tensors and plain containers, and loading it would run their "
                f"code; refused ({_first_line(error.__cause__)}). Save just the state_dict (or convert it to "
                f".safetensors) and retry"
            ) from error
        raise InvalidArgumentError(f"{path} is not a readable PyTorch checkpoint: {_first_line(error)}") from error
    except (EOFError, ValueError, OSError) as error:
        raise InvalidArgumentError(f"{path} is not a readable PyTorch checkpoint: {_first_line(error)}") from error
    except (AttributeError, TypeError) as error:  # clean_state_dict met something other than a str-keyed mapping
        raise InvalidArgumentError(
            f"{path} does not contain a state dict (a mapping of parameter names to tensors)"
        ) from error


@contextlib.contextmanager
def _log_without_host_path(path: Path) -> Iterator[None]:
    """timm logs the checkpoint's full path; logs name files, never the host's directory layout."""

    def shorten(record: logging.LogRecord) -> bool:
        record.msg = str(record.msg).replace(str(path), loggable_path(path))
        return True

    timm_logger = logging.getLogger(load_state_dict.__module__)
    timm_logger.addFilter(shorten)
    try:
        yield
    finally:
        timm_logger.removeFilter(shorten)


def _checked_tensors(raw: object, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(raw, Mapping) or not raw:
        raise InvalidArgumentError(f"{path} does not contain a state dict (a mapping of parameter names to tensors)")
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(raw)


def _load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load every parameter and buffer; any difference is named, so a user sees which model the file is for."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} {tuple(state[key].shape)} (model: {tuple(value.shape)})"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:_KEYS_SHOWN])}{', ...' if len(keys) > _KEYS_SHOWN else ''}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise FailedPreconditionError(f"weights {path} do not fit this backbone: {'; '.join(problems)}")
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise InvalidArgumentError(f"weights {path}: tensor {key} contains NaN or Inf")
    model.load_state_dict(state, strict=True)


def random_init_fingerprint(model: torch.nn.Module, seed: int) -> str:
    """ "random-<seed>-<first 16 hex of a sha256 over the weights>": never a 64-hex file digest, the same for the
    same seed, architecture and timm/torch versions, and different when any of those change the weights."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return f"random-{seed}-{digest.hexdigest()[:16]}"


def _data_config(model: torch.nn.Module, served_size: int = 0) -> dict[str, Any]:
    # The pretrained config describes the checkpoint's resolution; a model built with another img_size needs its
    # own, so the input size is taken from the model (timm's get_model_input_config) and the rest from timm.
    if served_size:  # hierarchical: the whole image squashed to the served square, as its mask will be
        args = {"input_size": (3, served_size, served_size), "crop_pct": 1.0, "crop_mode": "squash"}
        return resolve_model_data_config(model, args=args)
    input_size = tuple(get_model_input_config(model)["input_size"])
    return resolve_model_data_config(model, args={"input_size": input_size})


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
