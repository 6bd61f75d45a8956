"""Exact residual decomposition of an open_clip ViT image tower (METHOD §1).

The tower computes, at the class token (CLS), ``s = emb + Σ_l mlp_l + Σ_{l,h} head_{l,h}`` and
then ``out = ln_post(s) @ proj``. With the sample's own LayerNorm statistics, ``ln_post`` is affine
per sample, so every unit ``u`` gets an output-space contribution ``y_u`` with ``Σ_u y_u = out``:

    y_u = inv_std * (r_u @ diag(γ) @ proj) - (inv_std * μ * γ@proj - β@proj) / N_u

where the mean/bias term is shared equally (``N_u = 2L+1`` for ``emb`` and each MLP,
``(2L+1)·H`` for each head), as in the ResiDual authors' code.

A head's residual contribution is ``ls_1 ⊙ (W_O[:, h] z_{l,h} + b_O / H)``, so ``y_head`` is an
affine function of its raw ``dh``-dim output ``z_{l,h}``: the *compact raw form*
(:class:`RawContributions`: raw ``z``, MLP and emb outputs, LN statistics) plus the fixed
:class:`ReadoutMaps` reproduce every ``y_u`` exactly (:func:`project`). That is what the feature
cache stores.

Why the blocks are traced here instead of hooked: ``nn.MultiheadAttention`` applies its output
projection functionally, so the per-head output is never visible to a hook; recomputing it from the
block input would cost an extra K/V projection (~17% of a block). The tracer runs the block's own
submodules (``ln_1``, ``ln_2``, ``mlp``, ``ls_1``, ``ls_2``) and the attention from the module's own
weights with ``scaled_dot_product_attention``, at the cost of the plain forward. Structures it does
not know are refused (:class:`UnsupportedModelError`), and the tests check the sum against
``encode_image`` for every supported configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from residual_core.errors import ShapeError, UnsupportedModelError
from residual_core.method.units import Unit, unit_table

__all__ = [
    "Decomposition",
    "RawContributions",
    "RAW_FIELDS",
    "ReadoutMaps",
    "decompose",
    "project",
    "project_heads",
    "project_residual",
    "readout_maps",
    "check_supported",
]


@dataclass
class ReadoutMaps:
    """Fixed per-model maps from the raw form to output space (all float32, on one device).

    Shapes: ``head_maps [L, H, dh, E]`` (``W_O[:, h]ᵀ diag(ls_1·γ) proj``), ``head_bias [L, H, E]``
    (``(ls_1·γ·b_O/H) @ proj``), ``resid_map [D, E]`` (``diag(γ) proj``, for emb and MLP outputs),
    ``gamma_proj [E]`` (``γ @ proj``), ``beta_proj [E]`` (``β @ proj``).
    """

    head_maps: torch.Tensor
    head_bias: torch.Tensor
    resid_map: torch.Tensor
    gamma_proj: torch.Tensor
    beta_proj: torch.Tensor

    @property
    def n_layers(self) -> int:
        return self.head_maps.shape[0]

    @property
    def n_heads(self) -> int:
        return self.head_maps.shape[1]

    @property
    def head_dim(self) -> int:
        return self.head_maps.shape[2]

    @property
    def width(self) -> int:
        return self.resid_map.shape[0]

    @property
    def embed_dim(self) -> int:
        return self.resid_map.shape[1]

    @property
    def units(self) -> tuple[Unit, ...]:
        return unit_table(self.n_layers, self.n_heads)

    def as_numpy(self) -> dict[str, np.ndarray]:
        """The maps as float32 numpy arrays, keyed by field name."""
        return {k: getattr(self, k).detach().cpu().numpy() for k in _MAP_FIELDS}

    @classmethod
    def from_numpy(cls, arrays: dict[str, np.ndarray]) -> "ReadoutMaps":
        return cls(**{k: torch.as_tensor(np.asarray(arrays[k])) for k in _MAP_FIELDS})


_MAP_FIELDS = ("head_maps", "head_bias", "resid_map", "gamma_proj", "beta_proj")
RAW_FIELDS = ("emb", "mlp", "heads", "ln_mean", "ln_inv_std")  # the compact raw form


@dataclass
class RawContributions:
    """Compact raw form of a batch of ``B`` images (float32).

    ``emb [B, D]`` (``ln_pre`` output at CLS), ``mlp [B, L, D]`` (MLP outputs at CLS, after
    LayerScale), ``heads [B, L, H, dh]`` (per-head attention outputs at CLS before the output
    projection), ``ln_mean [B]`` and ``ln_inv_std [B]`` (``ln_post`` statistics of the residual
    stream at CLS; ``inv_std = 1/sqrt(var + eps)``, biased variance).
    """

    emb: torch.Tensor
    mlp: torch.Tensor
    heads: torch.Tensor
    ln_mean: torch.Tensor
    ln_inv_std: torch.Tensor

    def __len__(self) -> int:
        return self.emb.shape[0]


def _shared_term(ln_mean: torch.Tensor, ln_inv_std: torch.Tensor, maps: ReadoutMaps) -> torch.Tensor:
    """``[B, E]``: the LN mean/bias term ``(inv_std·μ·γ - β) @ proj`` before sharing by ``N_u``."""
    return ln_inv_std.float()[:, None] * ln_mean.float()[:, None] * maps.gamma_proj - maps.beta_proj


def project_residual(
    r: torch.Tensor, ln_mean: torch.Tensor, ln_inv_std: torch.Tensor, maps: ReadoutMaps
) -> torch.Tensor:
    """``y`` of residual-space units (emb, MLPs): ``r [B, k, D] -> [B, k, E]``."""
    n_resid = 2 * maps.n_layers + 1
    shared = _shared_term(ln_mean, ln_inv_std, maps)
    y = r.float() @ maps.resid_map
    return ln_inv_std.float()[:, None, None] * y - (shared / n_resid)[:, None]


def project_heads(
    z: torch.Tensor,
    layers: torch.Tensor,
    heads: torch.Tensor,
    ln_mean: torch.Tensor,
    ln_inv_std: torch.Tensor,
    maps: ReadoutMaps,
) -> torch.Tensor:
    """``y`` of heads ``(layers[i], heads[i])`` from their raw outputs ``z [B, k, dh] -> [B, k, E]``."""
    n_resid = 2 * maps.n_layers + 1
    shared = _shared_term(ln_mean, ln_inv_std, maps)
    y = (z.float()[:, :, None, :] @ maps.head_maps[layers, heads])[:, :, 0]
    y = y + maps.head_bias[layers, heads]
    return ln_inv_std.float()[:, None, None] * y - (shared / (n_resid * maps.n_heads))[:, None]


def project(
    raw: RawContributions, maps: ReadoutMaps, units: Sequence[int] | None = None
) -> torch.Tensor:
    """Output-space contributions ``y_u`` of the selected units.

    Args:
        raw: compact raw form of ``B`` samples.
        maps: the model's read-out maps.
        units: unit indices in canonical order numbering (default: all ``U`` units).

    Returns:
        ``[B, len(units), E]`` float32 tensor, in the order of ``units``.
    """
    n_layers, n_heads = maps.n_layers, maps.n_heads
    n_units = 1 + n_layers + n_layers * n_heads
    sel = torch.arange(n_units) if units is None else torch.as_tensor(list(units), dtype=torch.long)
    if sel.numel() and (sel.min() < 0 or sel.max() >= n_units):
        raise IndexError(f"unit indices must lie in [0, {n_units}), got {sel.tolist()}")
    out = raw.emb.new_empty((len(raw), sel.numel(), maps.embed_dim), dtype=torch.float32)
    is_emb = sel == 0
    is_mlp = (sel >= 1) & (sel <= n_layers)
    is_head = sel > n_layers
    stats = (raw.ln_mean, raw.ln_inv_std, maps)
    if is_emb.any():
        out[:, is_emb] = project_residual(raw.emb[:, None], *stats)
    if is_mlp.any():
        out[:, is_mlp] = project_residual(raw.mlp[:, sel[is_mlp] - 1], *stats)
    if is_head.any():
        flat = sel[is_head] - 1 - n_layers
        lay, hd = flat // n_heads, flat % n_heads
        out[:, is_head] = project_heads(raw.heads[:, lay, hd], lay, hd, *stats)
    return out


@dataclass
class Decomposition:
    """Per-unit decomposition of a batch of images.

    Attributes:
        raw: the compact raw form (what the feature cache stores).
        maps: the model's fixed read-out maps.
        units: the unit table, canonical order (``emb``, ``L{l}.mlp``, ``L{l}H{h}``).
    """

    raw: RawContributions
    maps: ReadoutMaps
    units: tuple[Unit, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.units = self.maps.units

    @cached_property
    def contributions(self) -> torch.Tensor:
        """``[B, U, E]`` float32: output-space ``y_u``; ``.sum(1)`` equals ``encode_image``."""
        return project(self.raw, self.maps)

    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]


def _fail(reason: str) -> None:
    raise UnsupportedModelError(f"cannot decompose this image tower: {reason}")


def _visual(model: nn.Module) -> nn.Module:
    return model.visual if hasattr(model, "visual") else model


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` (naming the reason) unless the tower is supported."""
    visual = _visual(model)
    if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
        _fail(f"{type(visual).__name__} is not an open_clip VisionTransformer (timm/ResNet towers "
              "have no residual units of this kind)")
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
        if visual.training and (attn.dropout > 0):
            _fail(f"{where}: attention dropout is active in train mode; call model.eval() first")


def readout_maps(model: nn.Module) -> ReadoutMaps:
    """The fixed read-out maps of a model's image tower (computed in float64, stored float32)."""
    check_supported(model)
    visual = _visual(model)
    blocks = list(visual.transformer.resblocks)
    width = visual.class_embedding.shape[0]
    dev = visual.class_embedding.device

    def f64(t: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
        return default if t is None else t.detach().to(dev, torch.float64)

    ones, zeros = torch.ones(width, dtype=torch.float64, device=dev), torch.zeros(
        width, dtype=torch.float64, device=dev)
    ln_post = visual.ln_post
    gamma = f64(getattr(ln_post, "weight", None), ones)
    beta = f64(getattr(ln_post, "bias", None), zeros)
    proj = f64(visual.proj, torch.eye(width, dtype=torch.float64, device=dev))

    head_maps, head_bias = [], []
    for blk in blocks:
        n_heads = blk.attn.num_heads
        dh = width // n_heads
        ls1 = f64(getattr(blk.ls_1, "gamma", None), ones)
        w_o = f64(blk.attn.out_proj.weight, None)  # [D, D]: out = z_cat @ w_o.T
        b_o = f64(blk.attn.out_proj.bias, zeros)
        scale = ls1 * gamma  # [D]
        # W_O[:, h] is [D, dh]; map = W_O[:, h]^T diag(scale) proj -> [dh, E]
        w_o_heads = w_o.T.reshape(n_heads, dh, width)  # [H, dh, D]
        head_maps.append((w_o_heads * scale) @ proj)
        head_bias.append(((scale * b_o / n_heads) @ proj).expand(n_heads, -1))
    return ReadoutMaps(
        head_maps=torch.stack(head_maps).float(),
        head_bias=torch.stack(head_bias).float(),
        resid_map=(gamma[:, None] * proj).float(),
        gamma_proj=(gamma @ proj).float(),
        beta_proj=(beta @ proj).float(),
    )


def _trace_block(blk: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One residual block on ``x [B, N, D]``; returns (new x, heads at CLS [B, H, dh], mlp at CLS)."""
    attn: nn.MultiheadAttention = blk.attn
    bsz, n_tok, width = x.shape
    n_heads = attn.num_heads
    h = blk.ln_1(x)
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(bsz, n_tok, 3, n_heads, width // n_heads).permute(2, 0, 3, 1, 4)
    z = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, dh]
    z_cls = z[:, :, 0]
    attn_out = F.linear(z.transpose(1, 2).reshape(bsz, n_tok, width),
                        attn.out_proj.weight, attn.out_proj.bias)
    x = x + blk.ls_1(attn_out)
    m = blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x + m, z_cls, m[:, 0]


@torch.inference_mode()
def decompose(
    model: nn.Module, images: torch.Tensor, maps: ReadoutMaps | None = None
) -> Decomposition:
    """Decompose ``encode_image(images)`` into per-unit contributions.

    Args:
        model: an open_clip CLIP model (or its ``visual`` tower), ViT with class-token pooling.
        images: ``[B, 3, H, W]`` preprocessed images; moved to the model's device and dtype.
        maps: precomputed :func:`readout_maps` (saves recomputing them for every batch).

    Returns:
        A :class:`Decomposition`; ``.contributions`` is ``[B, U, E]`` with ``U = 1 + L + L·H``,
        and ``.contributions.sum(1)`` equals ``model.encode_image(images)`` (unnormalised).
    """
    check_supported(model)
    visual = _visual(model)
    param = visual.class_embedding
    if images.ndim != 4 or images.shape[1] != visual.conv1.in_channels:
        raise ShapeError(
            f"images must be [B, {visual.conv1.in_channels}, H, W], got {tuple(images.shape)}")
    expected = tuple(visual.image_size)
    if tuple(images.shape[-2:]) != expected:
        raise ShapeError(f"images must be {expected[0]}x{expected[1]} for this model, got "
                         f"{images.shape[-2]}x{images.shape[-1]}; use the model's preprocess")
    if maps is None:
        maps = readout_maps(model)
    x = visual._embeds(images.to(param.device, param.dtype))  # [B, N, D], ln_pre applied
    emb = x[:, 0]
    heads, mlps = [], []
    for blk in visual.transformer.resblocks:
        x, z_cls, mlp_cls = _trace_block(blk, x)
        heads.append(z_cls)
        mlps.append(mlp_cls)
    s = x[:, 0].float()
    eps = visual.ln_post.eps if isinstance(visual.ln_post, nn.LayerNorm) else None
    if eps is None:  # Identity ln_post: the read-out is already linear
        mean, inv_std = torch.zeros_like(s[:, 0]), torch.ones_like(s[:, 0])
    else:
        mean = s.mean(-1)
        inv_std = torch.rsqrt(s.var(-1, unbiased=False) + eps)
    raw = RawContributions(
        emb=emb.float(),
        mlp=torch.stack(mlps, 1).float(),
        heads=torch.stack(heads, 1).float(),
        ln_mean=mean,
        ln_inv_std=inv_std,
    )
    return Decomposition(raw=raw, maps=maps.__class__(**{
        k: getattr(maps, k).to(s.device) for k in _MAP_FIELDS}))
