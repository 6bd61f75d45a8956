"""Image towers read into one structure: what :mod:`.decompose` needs to know about a model family.

A supported tower is a pre-LN ViT read at its class token (CLS): ``s = emb + Σ_l mlp_l +
Σ_{l,h} head_{l,h}``, then ``out = norm(s) @ proj + proj_bias``. Each family names these parts
differently; :func:`read_tower` maps a model onto a :class:`Tower` (embedding, blocks, final
norm, read-out) so that the decomposition, its read-out maps and its checks are written once.

Families, with the representation each one's decomposition sums to (the authors' encoders,
``src/residual/nn/encoder.py`` of Flegyas/ResiDual):

- ``open_clip``: a ``CLIP`` model or its ``VisionTransformer`` (``encode_image``).
- ``hf-clip``: ``CLIPModel`` / ``CLIPVisionModelWithProjection`` (``visual_projection`` of the
  ``post_layernorm``-ed CLS) and ``CLIPVisionModel`` (its ``pooler_output``, no projection).
- ``hf-blip``: ``BlipForImageTextRetrieval`` (``vision_proj`` of the CLS of the vision model's
  ``last_hidden_state``, bias included) and ``BlipVisionModel`` (that CLS, no projection). BLIP's
  own ``pooler_output`` applies ``post_layernorm`` twice; the authors read ``last_hidden_state``.
- ``hf-vit`` / ``hf-dinov2``: ``ViTModel`` / ``Dinov2Model``, the CLS of ``last_hidden_state``
  (after the final layernorm), no projection (a ``ViTModel`` pooler is not part of it).
  DINOv2's LayerScale (``layer_scale1/2``) sits inside each unit.

The attention is recomputed from each module's own weights (so the per-head output at CLS is
visible); everything else runs the model's own submodules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from residual_core.errors import UnsupportedModelError

__all__ = ["SUPPORTED_KINDS", "Block", "HFImageEncoder", "Tower", "image_encoder", "read_tower"]

QKV = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

SUPPORTED_KINDS = (
    "open_clip ViT (CLIP or its .visual)",
    "CLIPModel", "CLIPVisionModel", "CLIPVisionModelWithProjection",
    "BlipForImageTextRetrieval", "BlipVisionModel",
    "ViTModel", "Dinov2Model",
)


@dataclass(frozen=True)
class Block:
    """One pre-LN residual block, as the tracer needs it.

    ``qkv(ln_1(x))`` gives ``q, k, v [B, H, N, dh]``; the attention output is
    ``ls_1 ⊙ (z_cat @ out_weight.T + out_bias)`` with ``out_weight [D, H·dh]``; ``mlp(x)`` is the
    block's whole MLP branch on the residual stream (its norm, MLP and LayerScale).
    """

    ln_1: nn.Module
    qkv: QKV
    n_heads: int
    head_dim: int
    scale: float | None
    out_weight: torch.Tensor
    out_bias: torch.Tensor | None
    ls_1: torch.Tensor | None
    mlp: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Tower:
    """A decomposable image tower.

    Attributes:
        family: ``open_clip``, ``hf-clip``, ``hf-blip``, ``hf-vit`` or ``hf-dinov2``.
        embed: images ``[B, C, H, W]`` -> residual stream input ``[B, N, D]`` (any pre-norm
            applied); its CLS row is the ``emb`` unit.
        blocks: the residual blocks, in order.
        norm: the final ``nn.LayerNorm`` (or ``nn.Identity``) applied to the CLS row.
        proj: ``[D, E]`` read-out (``out = norm(s) @ proj + proj_bias``), None for the identity.
        proj_bias: ``[E]`` or None.
        image_size: the input size the tower requires, or None when it interpolates its
            position embeddings to any size (DINOv2).
        in_channels: image channels.
        width: residual width ``D``.
        encode: the representation by the model's own forward (what the units sum to).
        anchor: a parameter of the tower (its device and dtype).
    """

    family: str
    embed: Callable[[torch.Tensor], torch.Tensor]
    blocks: tuple[Block, ...]
    norm: nn.Module
    proj: torch.Tensor | None
    proj_bias: torch.Tensor | None
    image_size: tuple[int, int] | None
    in_channels: int
    width: int
    encode: Callable[[torch.Tensor], torch.Tensor]
    anchor: torch.Tensor


def _fail(reason: str) -> None:
    raise UnsupportedModelError(f"cannot decompose this image tower: {reason}")


def read_tower(model: nn.Module) -> Tower:
    """The :class:`Tower` of ``model``; :class:`UnsupportedModelError` (naming the reason) when
    the model is of no supported kind or cannot be decomposed exactly as it is configured.
    A loaded ``hf:`` model (:class:`~.hf_models.HFImageModel`) is read as the model it wraps."""
    model = getattr(model, "hf_model", model)
    if type(model).__module__.startswith("transformers."):
        return _hf_tower(model)
    visual = model.visual if hasattr(model, "visual") else model
    if hasattr(visual, "transformer") and hasattr(visual, "conv1"):
        return _open_clip_tower(model, visual)
    _fail(f"{type(visual).__name__} is not a supported ViT (timm/ResNet towers have no residual "
          f"units of this kind); supported kinds: {', '.join(SUPPORTED_KINDS)}")


# -- open_clip -------------------------------------------------------------------------------

def _open_clip_tower(model: nn.Module, visual: nn.Module) -> Tower:
    if getattr(visual, "attn_pool", None) is not None:
        _fail("it pools with attention (attn_pool), so the output is not a sum over CLS units")
    if getattr(visual, "pool_type", "tok") != "tok":
        _fail(f"pool_type={visual.pool_type!r}: only class-token pooling ('tok') is decomposable "
              "at the class token")
    if visual.training and not isinstance(visual.patch_dropout, nn.Identity) and \
            visual.patch_dropout.prob > 0:
        _fail("patch dropout is active in train mode; call model.eval() first")
    if not isinstance(visual.ln_post, (nn.LayerNorm, nn.Identity)):
        _fail(f"ln_post is {type(visual.ln_post).__name__}, not a LayerNorm")
    blocks = []
    for i, blk in enumerate(visual.transformer.resblocks):
        where = f"block {i}"
        if not isinstance(getattr(blk, "attn", None), nn.MultiheadAttention):
            _fail(f"{where} is {type(blk).__name__} with custom attention (qk-norm, scaled cosine "
                  "or scaled heads); only nn.MultiheadAttention blocks are supported")
        attn = blk.attn
        if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
            _fail(f"{where}: attention with separate q/k/v projections")
        if attn.bias_k is not None or attn.add_zero_attn:
            _fail(f"{where}: attention with bias_k/bias_v or add_zero_attn")
        if hasattr(blk, "ln_1_kv"):
            _fail(f"{where}: cross-attention block")
        for name in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2"):
            if not hasattr(blk, name):
                _fail(f"{where} has no {name}")
        if visual.training and attn.dropout > 0:
            _fail(f"{where}: attention dropout is active in train mode; call model.eval() first")
        blocks.append(Block(
            ln_1=blk.ln_1, qkv=_fused_qkv(attn.in_proj_weight, attn.in_proj_bias, attn.num_heads),
            n_heads=attn.num_heads, head_dim=attn.embed_dim // attn.num_heads, scale=None,
            out_weight=attn.out_proj.weight, out_bias=attn.out_proj.bias,
            ls_1=getattr(blk.ls_1, "gamma", None),
            mlp=lambda x, b=blk: b.ls_2(b.mlp(b.ln_2(x)))))
    size = tuple(visual.image_size) if isinstance(visual.image_size, (tuple, list)) else \
        (visual.image_size, visual.image_size)
    encode = model.encode_image if hasattr(model, "encode_image") else visual
    return Tower(family="open_clip", embed=visual._embeds, blocks=tuple(blocks),
                 norm=visual.ln_post, proj=visual.proj, proj_bias=None, image_size=size,
                 in_channels=visual.conv1.in_channels, width=visual.class_embedding.shape[0],
                 encode=encode, anchor=visual.class_embedding)


def _fused_qkv(weight: torch.Tensor, bias: torch.Tensor | None, n_heads: int) -> QKV:
    """q, k, v of a fused ``[3D, D]`` projection laid out (q | k | v), each ``[B, H, N, dh]``."""
    def qkv(h: torch.Tensor):
        bsz, n_tok, _ = h.shape
        out = nn.functional.linear(h, weight, bias)
        return out.view(bsz, n_tok, 3, n_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return qkv


def _split_qkv(q: nn.Linear, k: nn.Linear, v: nn.Linear, n_heads: int) -> QKV:
    def qkv(h: torch.Tensor):
        bsz, n_tok, _ = h.shape
        return tuple(p(h).view(bsz, n_tok, n_heads, -1).transpose(1, 2) for p in (q, k, v))
    return qkv


# -- transformers ----------------------------------------------------------------------------

def _hf_tower(model: nn.Module) -> Tower:
    kind = type(model).__name__
    builder = _HF_KINDS.get(kind)
    if builder is None:
        _fail(f"transformers {kind} is not a supported kind; supported: "
              f"{', '.join(SUPPORTED_KINDS)}")
    _refuse_train_mode_dropout(model)
    return builder(model)


def _refuse_train_mode_dropout(model: nn.Module) -> None:
    """A module in train mode with any dropout or drop-path is not a fixed function of its input."""
    if not model.training:
        return
    config = getattr(model, "config", None)
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    rates += [getattr(m, "drop_prob", 0.0) for m in model.modules()]
    for cfg in (config, getattr(config, "vision_config", None)):
        rates += [getattr(cfg, key, 0.0) or 0.0 for key in
                  ("attention_dropout", "attention_probs_dropout_prob", "drop_path_rate")]
    if any(r > 0 for r in rates):
        _fail(f"{type(model).__name__} is in train mode with dropout active; call model.eval() "
              "first")


def _image_size(config) -> tuple[int, int]:
    size = config.image_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _hf_block(layer: nn.Module, attn: nn.Module, ln_1: nn.Module, ln_2: nn.Module,
              ls_1: nn.Module | None, ls_2: nn.Module | None, out: nn.Linear) -> Block:
    n_heads = getattr(attn, "num_heads", None) or attn.num_attention_heads
    if hasattr(attn, "qkv"):  # BLIP: one fused projection, (q | k | v) as open_clip
        qkv = _fused_qkv(attn.qkv.weight, attn.qkv.bias, n_heads)
        head_dim = attn.qkv.out_features // (3 * n_heads)
    else:
        qkv = _split_qkv(attn.q_proj, attn.k_proj, attn.v_proj, n_heads)
        head_dim = attn.q_proj.out_features // n_heads
    scale = getattr(attn, "scaling", None) or getattr(attn, "scale", None)
    scale_2 = (lambda x: x) if ls_2 is None else ls_2
    return Block(ln_1=ln_1, qkv=qkv, n_heads=n_heads, head_dim=head_dim, scale=float(scale),
                 out_weight=out.weight, out_bias=out.bias,
                 ls_1=None if ls_1 is None else ls_1.lambda1,
                 mlp=lambda x: scale_2(layer.mlp(ln_2(x))))


def _first_token(outputs) -> torch.Tensor:
    return outputs.last_hidden_state[:, 0]


def _clip_vision(vision: nn.Module, proj: nn.Linear | None, encode) -> Tower:
    blocks = tuple(_hf_block(lay, lay.self_attn, lay.layer_norm1, lay.layer_norm2, None, None,
                             lay.self_attn.out_proj) for lay in vision.encoder.layers)
    cfg = vision.config
    return Tower(family="hf-clip",
                 embed=lambda px: vision.pre_layrnorm(vision.embeddings(px)),
                 blocks=blocks, norm=vision.post_layernorm,
                 proj=None if proj is None else proj.weight.T, proj_bias=None,
                 image_size=_image_size(cfg),
                 in_channels=vision.embeddings.patch_embedding.in_channels,
                 width=cfg.hidden_size, encode=encode,
                 anchor=vision.embeddings.patch_embedding.weight)


def _clip_model(model: nn.Module) -> Tower:
    def encode(px):
        out = model.get_image_features(pixel_values=px)
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    return _clip_vision(model.vision_model, model.visual_projection, encode)


def _clip_vision_with_projection(model: nn.Module) -> Tower:
    return _clip_vision(model.vision_model, model.visual_projection,
                        lambda px: model(pixel_values=px).image_embeds)


def _clip_vision_model(model: nn.Module) -> Tower:
    return _clip_vision(model, None, lambda px: model(pixel_values=px).pooler_output)


def _blip_vision(vision: nn.Module, proj: nn.Linear | None, encode) -> Tower:
    blocks = tuple(_hf_block(lay, lay.self_attn, lay.layer_norm1, lay.layer_norm2, None, None,
                             lay.self_attn.projection) for lay in vision.encoder.layers)
    cfg = vision.config
    return Tower(family="hf-blip", embed=vision.embeddings, blocks=blocks,
                 norm=vision.post_layernorm,
                 proj=None if proj is None else proj.weight.T,
                 proj_bias=None if proj is None else proj.bias,
                 image_size=_image_size(cfg),
                 in_channels=vision.embeddings.patch_embedding.in_channels,
                 width=cfg.hidden_size, encode=encode,
                 anchor=vision.embeddings.patch_embedding.weight)


def _blip_retrieval(model: nn.Module) -> Tower:
    return _blip_vision(model.vision_model, model.vision_proj,
                        lambda px: model.vision_proj(_first_token(model.vision_model(px))))


def _blip_vision_model(model: nn.Module) -> Tower:
    return _blip_vision(model, None, lambda px: _first_token(model(px)))


def _vit_model(model: nn.Module) -> Tower:
    cfg = model.config
    blocks = tuple(_hf_block(lay, lay.attention, lay.layernorm_before, lay.layernorm_after, None,
                             None, lay.attention.o_proj) for lay in model.layers)
    return Tower(family="hf-vit", embed=model.embeddings, blocks=blocks, norm=model.layernorm,
                 proj=None, proj_bias=None, image_size=_image_size(cfg),
                 in_channels=model.embeddings.patch_embeddings.projection.in_channels,
                 width=cfg.hidden_size, encode=lambda px: _first_token(model(pixel_values=px)),
                 anchor=model.embeddings.cls_token)


def _dinov2_model(model: nn.Module) -> Tower:
    cfg = model.config
    blocks = tuple(_hf_block(lay, lay.attention, lay.norm1, lay.norm2, lay.layer_scale1,
                             lay.layer_scale2, lay.attention.o_proj) for lay in model.encoder.layer)
    return Tower(family="hf-dinov2", embed=model.embeddings, blocks=blocks, norm=model.layernorm,
                 proj=None, proj_bias=None, image_size=None,
                 in_channels=model.embeddings.patch_embeddings.projection.in_channels,
                 width=cfg.hidden_size, encode=lambda px: _first_token(model(pixel_values=px)),
                 anchor=model.embeddings.cls_token)


_HF_KINDS: dict[str, Callable[[nn.Module], Tower]] = {
    "CLIPModel": _clip_model,
    "CLIPVisionModelWithProjection": _clip_vision_with_projection,
    "CLIPVisionModel": _clip_vision_model,
    "BlipForImageTextRetrieval": _blip_retrieval,
    "BlipVisionModel": _blip_vision_model,
    "ViTModel": _vit_model,
    "Dinov2Model": _dinov2_model,
}


# -- the image tower as a trainable module (full fine-tuning) ---------------------------------

class HFImageEncoder(nn.Module):
    """The image half of a ``transformers`` model: ``forward(pixels)`` is the family's
    representation (:attr:`Tower.encode`) from ``vision`` (and ``proj``) only, so that a copy
    trains the image tower and nothing else."""

    def __init__(self, vision: nn.Module, proj: nn.Module | None, pooled: bool):
        super().__init__()
        self.vision, self.proj, self.pooled = vision, proj, pooled

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixel_values=images)
        rep = out.pooler_output if self.pooled else _first_token(out)
        return rep if self.proj is None else self.proj(rep)


def image_encoder(model: nn.Module) -> nn.Module:
    """The module of ``model``'s image tower whose output is the representation the units sum
    to: open_clip's ``.visual``, or an :class:`HFImageEncoder` over a transformers model's
    vision parts (refused as :func:`read_tower` refuses)."""
    model = getattr(model, "hf_model", model)
    tower = read_tower(model)
    if tower.family == "open_clip":
        return model.visual if hasattr(model, "visual") else model
    kind = type(model).__name__
    if kind in ("CLIPModel", "CLIPVisionModelWithProjection"):
        return HFImageEncoder(model.vision_model, model.visual_projection, pooled=True)
    if kind == "BlipForImageTextRetrieval":
        return HFImageEncoder(model.vision_model, model.vision_proj, pooled=False)
    return HFImageEncoder(model, None, pooled=kind == "CLIPVisionModel")
