"""Loading open_clip models, fully named by architecture name + pretrained tag or checkpoint file.

``load_model("ViT-B-16", "laion2b_s34b_b88k")`` resolves the tag through open_clip (downloaded and
cached by open_clip when online). ``load_model("ViT-B-16", "/path/ckpt.pt")`` loads a local
checkpoint through the same open_clip code path. ``pretrained=None`` gives random weights (seed
them with ``seed``), which is what the exactness tests and benchmarks use.

``load_model("hf:facebook/dinov2-large")`` / ``load_model("hf:/path/saved_dir")`` loads a
``transformers`` tower offline (:mod:`.hf_models`).

The embedded tiny CLIP config (``residual-tiny``: 32x32 images, patch 8, width 128, 4 layers,
4 heads of width 32, embed dim 64) ships in ``residual_core/model_configs`` and is registered
with open_clip on import.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

from residual_core.errors import ResidualError, UnknownModelError, WeightsUnavailableError
from residual_core.identity import WeightsId, file_sha256, is_hf_model, looks_like_path

_CONFIG_DIR = Path(str(resources.files("residual_core") / "model_configs"))
if _CONFIG_DIR not in [Path(p) for p in open_clip.factory._MODEL_CONFIG_PATHS]:
    open_clip.add_model_config(_CONFIG_DIR)


@dataclass
class LoadedModel:
    """A model with what a pipeline needs to name and use it: open_clip, or a ``transformers``
    tower wrapped with open_clip's ``encode_image`` (and ``encode_text``) API."""

    model: torch.nn.Module
    preprocess: Callable  # eval transform: PIL image -> [3, H, W] tensor
    tokenizer: Callable | None  # list[str] -> tokens for model.encode_text; None: vision only
    name: str
    pretrained: str | None  # tag, absolute checkpoint path, or None for random weights
    checkpoint_sha256: str | None  # content hash of a checkpoint file (provenance)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_text_tower(self) -> bool:
        """Whether the model embeds text (zero-shot classifiers, text explanations)."""
        return self.tokenizer is not None and hasattr(self.model, "encode_text")

    @property
    def weights(self) -> WeightsId:
        """What names the weights: used in store attributes, paths and config hashes."""
        return WeightsId(self.name, self.pretrained, self.checkpoint_sha256)


def list_models() -> list[str]:
    """Architecture names open_clip knows (built-in configs plus the embedded one)."""
    return open_clip.list_models()


_VISION_REFUSED = {  # vision_cfg keys whose set value means a tower decompose() refuses
    "timm_model_name": "a timm image tower",
    "attentional_pool": "attention pooling (attn_pool)",
    "attn_pooler_queries": "attention pooling (attn_pool)",
    "qk_norm": "qk-norm attention",
    "scaled_cosine_attn": "scaled cosine attention",
    "scale_heads": "scaled heads",
}


def decomposable(name: str) -> str | None:
    """Why the open_clip architecture ``name``'s image tower cannot be decomposed exactly, read
    from its config without building it, or None when it can (:func:`.decompose.check_supported`
    is the check on a built model)."""
    _check_name(name)
    vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
    for key, reason in _VISION_REFUSED.items():
        if vision.get(key):
            return reason
    if isinstance(vision.get("layers"), (list, tuple)):
        return "a ResNet image tower (no residual units of this kind)"
    if vision.get("pool_type", "tok") != "tok":
        return f"pool_type {vision['pool_type']!r} (only class-token pooling is decomposable)"
    return None


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _devices_here() -> str:
    """The devices of this machine, e.g. ``cpu, cuda:0, cuda:1`` (for error messages)."""
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = ["mps"] if torch.backends.mps.is_available() else []
    return ", ".join(["cpu", *(f"cuda:{i}" for i in range(cuda)), *mps])


def _check_device(device: str | torch.device) -> torch.device:
    """``device``, refused in one line when torch does not know it or this machine lacks it
    (open_clip would fail deep in torch, and the error would be blamed on a checkpoint)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ResidualError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps "
                            f"(devices here: {_devices_here()})") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ResidualError(f"device {str(device)!r}: CUDA is not available on this machine "
                                f"(devices here: {_devices_here()}); use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ResidualError(f"device {str(device)!r} does not exist: this machine has "
                                f"{count} CUDA device{'s' if count > 1 else ''} (devices here: "
                                f"{_devices_here()})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ResidualError(f"device {str(device)!r}: MPS is not available on this machine "
                            f"(devices here: {_devices_here()}); use --device cpu")
    return dev


def _check_name(name: str) -> None:
    known = list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} `residual models` lists the {len(known)} known names; "
            "a custom architecture needs an open_clip JSON config (open_clip.add_model_config)."
        )


def load_model(
    name: str,
    pretrained: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    seed: int | None = 0,
    cache_dir: str | None = None,
) -> LoadedModel:
    """Create an open_clip model (or load an ``hf:`` one) in eval mode.

    Args:
        name: open_clip architecture name, e.g. ``ViT-B-16`` or ``residual-tiny``; or
            ``hf:HUB_ID`` / ``hf:DIR`` for a ``transformers`` tower
            (:func:`.hf_models.load_hf_model`: offline, ``pretrained`` None or its folder).
        pretrained: a pretrained tag (``laion2b_s34b_b88k``, ``openai``, ...), a checkpoint file
            saved with ``torch.save(model.state_dict())``, or ``None`` for random weights.
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (default: CUDA when present); one this
            machine lacks is an error saying which devices it has.
        precision: open_clip precision string (``fp32``, ``fp16``, ``bf16``, ...).
        seed: seeds the random initialisation (only matters when ``pretrained`` is None).
        cache_dir: where open_clip caches downloads.

    QuickGELU follows the pretrained tag (OpenAI weights need it; open_clip only warns).
    Checkpoint files are read with ``torch.load(weights_only=True)`` (what open_clip does, asked
    for explicitly here): only tensors and plain containers are unpickled, so a checkpoint cannot
    run code; a file that is not a state dict is refused first (:func:`_check_checkpoint`).

    Raises:
        UnknownModelError: unknown architecture or tag.
        WeightsUnavailableError: the tag's weights are not cached and cannot be downloaded.
        ResidualError: a checkpoint path that does not exist, is not a state dict, or does not
            fit the architecture.
    """
    device = _check_device(device or default_device())
    if is_hf_model(name):
        from residual_core.method.hf_models import load_hf_model

        return load_hf_model(name, None if pretrained is None else str(pretrained),
                             device=device, precision=precision)
    _check_name(name)
    kwargs: dict[str, Any] = {"precision": precision, "device": device, "cache_dir": cache_dir,
                              "weights_only": True}
    checkpoint_sha = None
    resolved: str | None = None

    if pretrained is not None:
        pretrained = str(pretrained)
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if tag_cfg:
            resolved = pretrained
            kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        elif os.path.isfile(pretrained):
            resolved = str(Path(pretrained).resolve())
            _check_checkpoint(resolved)
            checkpoint_sha = file_sha256(resolved)
        elif looks_like_path(pretrained):
            raise ResidualError(
                f"checkpoint file not found: {pretrained!r}. Pass a file saved with "
                "torch.save(model.state_dict()) or a pretrained tag."
            )
        else:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise UnknownModelError(
                f"unknown pretrained tag {pretrained!r} for {name}. Known tags: "
                f"{', '.join(tags) if tags else 'none (use a local checkpoint file)'}."
            )

    if seed is not None:
        torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            # open_clip logs the failure at ERROR level before raising: ours is the message.
            logging.disable(logging.ERROR)
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=resolved, **kwargs
                )
            finally:
                logging.disable(logging.NOTSET)
    except (RuntimeError, AssertionError, KeyError, ValueError) as exc:
        text = str(exc) or type(exc).__name__
        if checkpoint_sha is not None:  # open_clip asserts or raises on a state dict that misfits
            raise ResidualError(
                f"checkpoint {resolved} does not fit architecture {name}: {_first_line(text)}"
            ) from None
        if resolved is not None and "download" in text.lower():
            raise WeightsUnavailableError(
                f"weights for {name} / {pretrained} are not cached and could not be downloaded "
                f"({_first_line(text)}). Run once with network access (open_clip caches them), or "
                "download the checkpoint elsewhere and pass its file path as --pretrained."
            ) from None
        raise
    model.eval()
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        name=name,
        pretrained=resolved,
        checkpoint_sha256=checkpoint_sha,
    )


_CHECKPOINT_FIX = "pass a file saved with torch.save(model.state_dict()) or a pretrained tag"


def _check_checkpoint(path: str) -> None:
    """Refuse, in one line naming it, a checkpoint file that is not a state dict: open_clip would
    fail deep inside (EOFError, AttributeError) or blame the architecture.

    Read as open_clip reads it, with ``torch.load(weights_only=True)`` (no code in the file runs);
    zip-format files are memory-mapped, so their tensors are not read twice. ``.safetensors``
    files (no pickle) and ``.npz``/``.npy`` weights are open_clip's to check.
    """
    if os.path.getsize(path) == 0:
        raise ResidualError(f"checkpoint {path} is empty (0 bytes): {_CHECKPOINT_FIX}")
    if path.endswith((".safetensors", ".npz", ".npy")):
        return
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True,
                         mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001  torch raises UnpicklingError, EOFError, RuntimeError...
        text = str(exc)
        if "Weights only load failed" in text:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            what = f"pickles {found.group(1)}, which" if found else "holds objects that"
            raise ResidualError(
                f"checkpoint {path} {what} torch.load(weights_only=True) refuses (unpickling "
                "objects can run code): save model.state_dict() and pass that file") from None
        raise ResidualError(f"checkpoint {path} is not a torch checkpoint file "
                            f"({type(exc).__name__}: {_first_line(text)}): {_CHECKPOINT_FIX}"
                            ) from None
    if isinstance(obj, torch.jit.ScriptModule):
        return  # open_clip takes a TorchScript model's state dict
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj  # as open_clip unwraps
    if not (isinstance(state, dict) and any(isinstance(v, torch.Tensor) for v in state.values())):
        what = (("an empty dict" if not state else "a dict without tensors")
                if isinstance(state, dict) else f"a {type(state).__name__}")
        raise ResidualError(f"checkpoint {path} holds {what}, not a state dict (names -> "
                            f"tensors): {_CHECKPOINT_FIX}")


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= limit else line[:limit] + "..."
