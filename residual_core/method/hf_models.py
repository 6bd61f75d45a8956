"""Loading ``transformers`` towers named ``hf:HUB_ID`` or ``hf:DIR`` (offline, never downloaded).

The class is chosen from the folder's ``config.json`` (:data:`HF_CLASSES`), so a checkpoint
saved from a task head (``ViTForImageClassification``, as ``google/vit-large-patch16-224`` is)
loads the tower the authors encode with. The model is wrapped in :class:`HFImageModel` (vision
only: ViT, DINOv2, CLIP/BLIP vision models) or :class:`HFImageTextModel` (CLIP, BLIP
retrieval), which give it open_clip's ``encode_image`` / ``encode_text`` so the stages need no
special case; :func:`~residual_core.method.towers.read_tower` decomposes the wrapped model.

Preprocessing is the folder's own image processor (``preprocessor_config.json``), tokenising its
own tokenizer (padded, truncated to the text tower's positions).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from residual_core.errors import ResidualError, UnsupportedModelError
from residual_core.identity import WeightsId, hf_model_dir, parse_weights

__all__ = ["HF_CLASSES", "PAPER_HF_MODELS", "HFImageModel", "HFImageTextModel", "hf_cache_state",
           "load_hf_model"]

PAPER_HF_MODELS = ("hf:Salesforce/blip-itm-large-flickr", "hf:google/vit-large-patch16-224",
                   "hf:facebook/dinov2-large", "hf:openai/clip-vit-base-patch16")
"""The paper's three transformers towers (BLIP ViT-L, ViT-L/16, DINOv2-L) and HF CLIP."""

HF_CLASSES: dict[str, tuple[str, ...]] = {
    # config.model_type -> the transformers classes it loads as (first: the default; another
    # one is used when config.architectures names it)
    "dinov2": ("Dinov2Model",),
    "vit": ("ViTModel",),
    "clip": ("CLIPModel",),
    "clip_vision_model": ("CLIPVisionModel", "CLIPVisionModelWithProjection"),
    "blip": ("BlipForImageTextRetrieval",),
    "blip_vision_model": ("BlipVisionModel",),
}
"""The ``model_type`` values an ``hf:`` folder may have, and the classes they load as."""

_TEXT_CLASSES = ("CLIPModel", "BlipForImageTextRetrieval")
_BLIP_REFUSED = ("BlipForConditionalGeneration", "BlipForQuestionAnswering")


def hf_cache_state(name: str) -> str:
    """``cached (FOLDER)`` or ``not cached`` for an ``hf:`` name (looked up offline)."""
    from residual_core.errors import WeightsUnavailableError

    try:
        return f"cached ({hf_model_dir(name)})"
    except (WeightsUnavailableError, ResidualError):
        return "not cached"


class HFImageModel(nn.Module):
    """A ``transformers`` tower with open_clip's image API: ``encode_image(pixels)`` is the
    representation its decomposition sums to (:func:`~residual_core.method.towers.read_tower`
    of ``hf_model``)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        from residual_core.method.towers import read_tower

        return read_tower(self.hf_model).encode(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)


class HFImageTextModel(HFImageModel):
    """:class:`HFImageModel` with a text tower: ``encode_text(tokens)`` (tokens: the
    tokenizer's ``BatchEncoding``) is CLIP's ``get_text_features``, or for BLIP the authors'
    ``text_proj`` of the CLS of ``text_encoder``'s ``last_hidden_state``."""

    def encode_text(self, tokens) -> torch.Tensor:
        model = self.hf_model
        ids, mask = tokens["input_ids"], tokens.get("attention_mask")
        if hasattr(model, "text_proj"):  # BLIP
            hidden = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            return model.text_proj(hidden[:, 0])
        out = model.get_text_features(input_ids=ids, attention_mask=mask)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


class _Preprocess:
    """PIL image -> ``[3, H, W]`` with the folder's image processor (picklable for workers)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


class _Tokenize:
    """Texts -> a padded ``BatchEncoding`` (``.to(device)`` works) of at most ``max_length``."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, texts):
        return self.tokenizer(list(texts), padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt")


@contextlib.contextmanager
def _quiet():
    """transformers' load reports and progress bars off (unexpected keys such as a task head's
    are expected here; missing ones are refused by :func:`load_hf_model`)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        if bars:
            hf_logging.enable_progress_bar()


def _class_name(folder: Path, name: str) -> str:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ResidualError(f"{name}: {folder}/config.json is unreadable ({exc})") from None
    model_type, archs = config.get("model_type"), config.get("architectures") or []
    classes = HF_CLASSES.get(model_type)
    if classes is None:
        raise UnsupportedModelError(
            f"{name}: model_type {model_type!r} is not a decomposable tower; supported "
            f"model types: {', '.join(HF_CLASSES)} (ViT, DINOv2, CLIP, BLIP retrieval)")
    if model_type == "blip" and any(a in _BLIP_REFUSED for a in archs):
        raise UnsupportedModelError(
            f"{name}: a {'/'.join(archs)} checkpoint has no retrieval projections "
            "(vision_proj/text_proj); use a BlipForImageTextRetrieval checkpoint such as "
            "Salesforce/blip-itm-large-flickr")
    return next((a for a in archs if a in classes), classes[0])


def load_hf_model(name: str, pretrained: str | None = None, *, device: torch.device,
                  precision: str = "fp32"):
    """Load ``hf:HUB_ID`` / ``hf:DIR`` offline as a :class:`~.models.LoadedModel`.

    Raises:
        WeightsUnavailableError: a Hub id not in the local cache (says how to pass a folder).
        UnsupportedModelError: a model type that is not a decomposable tower.
        ResidualError: a folder without config, weights that do not fit the class, or without
            the image processor needed to preprocess images.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    from residual_core.method.models import LoadedModel

    weights: WeightsId = parse_weights(name, pretrained)
    folder = hf_model_dir(name)
    cls_name = _class_name(folder, name)
    cls = getattr(transformers, cls_name)
    kwargs = {"add_pooling_layer": False} if cls_name == "ViTModel" else {}
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
              "fp64": torch.float64}
    if precision not in dtypes:
        raise ResidualError(f"precision {precision!r} for {name}: use one of {', '.join(dtypes)}")
    with warnings.catch_warnings(), _quiet():  # our checks below report what matters
        warnings.simplefilter("ignore")
        try:
            model, info = cls.from_pretrained(folder, local_files_only=True,
                                              output_loading_info=True, **kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ResidualError(f"{name}: cannot load {cls_name} from {folder}: "
                                f"{str(exc).strip().splitlines()[0][:300]}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing or info.get("mismatched_keys"):
        what = missing or sorted(str(k) for k in info["mismatched_keys"])
        raise ResidualError(f"{name}: {folder} does not hold the weights of a {cls_name} "
                            f"({len(what)} missing or misfit, e.g. {', '.join(what[:3])})")
    model = model.to(device=device, dtype=dtypes[precision]).eval()
    try:
        with _quiet():
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ResidualError(
            f"{name}: {folder} has no usable image processor ({type(exc).__name__}); save it "
            "beside the model with processor.save_pretrained(DIR) (preprocessor_config.json)"
        ) from None
    tokenizer: Callable | None = None
    wrapper = HFImageModel
    if cls_name in _TEXT_CLASSES:
        wrapper = HFImageTextModel
        try:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ResidualError(
                f"{name}: {folder} has no tokenizer for its text tower ({type(exc).__name__}); "
                "save it beside the model with tokenizer.save_pretrained(DIR)") from None
        positions = model.config.text_config.max_position_embeddings
        tokenizer = _Tokenize(tok, min(positions, tok.model_max_length))
    return LoadedModel(model=wrapper(model), preprocess=_Preprocess(processor),
                       tokenizer=tokenizer, name=weights.model, pretrained=weights.pretrained,
                       checkpoint_sha256=weights.checkpoint_sha256)
