"""Exact residual decomposition of a ViT image tower (METHOD §1): open_clip, and the
``transformers`` towers of :mod:`.towers` (HF CLIP, BLIP, ViT, DINOv2).

The tower computes, at the class token (CLS), ``s = emb + Σ_l mlp_l + Σ_{l,h} head_{l,h}`` and
then ``out = ln_post(s) @ proj`` (``+ proj_bias``, BLIP's ``vision_proj``, folded into ``β@proj``).
With the sample's own LayerNorm statistics, ``ln_post`` is affine
per sample, so every unit ``u`` gets an output-space contribution ``y_u`` with ``Σ_u y_u = out``:

    y_u = inv_std * (r_u @ diag(γ) @ proj) - (inv_std * μ * γ@proj - β@proj) / N_u

where the mean/bias term is shared equally (``N_u = 2L+1`` for ``emb`` and each MLP,
``(2L+1)·H`` for each head), as in the ResiDual authors' code.

A head's residual contribution is ``ls_1 ⊙ (W_O[:, h] z_{l,h} + b_O / H)``, so ``y_head`` is an
affine function of its raw ``dh``-dim output ``z_{l,h}``: the *compact raw form*
(:class:`RawContributions`: raw ``z``, MLP and emb outputs, LN statistics) plus the fixed
:class:`ReadoutMaps` reproduce every ``y_u`` exactly (:func:`project`). That is what the feature
cache stores.

Why the blocks are traced here instead of hooked: ``nn.MultiheadAttention`` (and the fused
attention kernels of ``transformers``) apply the output projection to all heads at once, so the
per-head output is never visible to a hook; recomputing it from the block input would cost an
extra K/V projection (~17% of a block). The tracer runs the block's own submodules (norms, MLP,
LayerScale) and the attention from the module's own weights with
``scaled_dot_product_attention``, at the cost of the plain forward. Each family's structure is
read once into a :class:`.towers.Tower`; structures it does not know are refused
(:class:`UnsupportedModelError`), and the tests check the sum against :func:`encode` for every
supported configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from residual_core.errors import ShapeError
from residual_core.method.towers import Block, Tower, read_tower
from residual_core.method.units import Unit, unit_table

__all__ = [
    "Decomposition",
    "RawContributions",
    "RAW_FIELDS",
    "ReadoutMaps",
    "decompose",
    "encode",
    "project",
    "project_heads",
    "project_residual",
    "affine_features",
    "affine_maps",
    "readout_maps",
    "check_supported",
]


@dataclass
class ReadoutMaps:
    """Fixed per-model maps from the raw form to output space (float32, float64 for a float64
    model; on one device).

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
        return {k: getattr(self, k).detach().cpu().float().numpy() for k in _MAP_FIELDS}

    @classmethod
    def from_numpy(cls, arrays: dict[str, np.ndarray]) -> "ReadoutMaps":
        return cls(**{k: torch.as_tensor(np.asarray(arrays[k])) for k in _MAP_FIELDS})


_MAP_FIELDS = ("head_maps", "head_bias", "resid_map", "gamma_proj", "beta_proj")
RAW_FIELDS = ("emb", "mlp", "heads", "ln_mean", "ln_inv_std")  # the compact raw form


@dataclass
class RawContributions:
    """Compact raw form of a batch of ``B`` images (float32; float64 for a float64 model).

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
    dt = maps.resid_map.dtype
    return ln_inv_std.to(dt)[:, None] * ln_mean.to(dt)[:, None] * maps.gamma_proj - maps.beta_proj


def project_residual(
    r: torch.Tensor, ln_mean: torch.Tensor, ln_inv_std: torch.Tensor, maps: ReadoutMaps
) -> torch.Tensor:
    """``y`` of residual-space units (emb, MLPs): ``r [B, k, D] -> [B, k, E]``."""
    n_resid = 2 * maps.n_layers + 1
    shared = _shared_term(ln_mean, ln_inv_std, maps)
    y = r.to(maps.resid_map.dtype) @ maps.resid_map
    return ln_inv_std.to(y.dtype)[:, None, None] * y - (shared / n_resid)[:, None]


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
    # k batched products [B, dh] @ [dh, E]: broadcasting z [B, k, 1, dh] against the maps
    # would expand them to [B, k, dh, E] (19 GB for 1024 rows of ViT-B/16's heads)
    y = torch.bmm(z.to(maps.head_maps.dtype).transpose(0, 1),
                  maps.head_maps[layers, heads]).transpose(0, 1)
    y = y + maps.head_bias[layers, heads]
    return ln_inv_std.to(y.dtype)[:, None, None] * y - (shared / (n_resid * maps.n_heads))[:, None]


def affine_features(x: np.ndarray, ln_mean: np.ndarray, ln_inv_std: np.ndarray) -> np.ndarray:
    """Features ``w = [inv_std·x, inv_std, inv_std·μ]`` of raw outputs ``x [B, k, d]``
    (a head's ``z`` or a residual unit's ``r``): ``[B, k, d + 2]`` float64, on which every
    ``y_u`` is affine (:func:`affine_maps`).
    """
    inv = np.asarray(ln_inv_std, dtype=np.float64)[:, None, None]
    b, k = x.shape[:2]
    w = np.empty((b, k, x.shape[2] + 2))
    np.multiply(x, inv, out=w[:, :, :-2])
    w[:, :, -2:-1] = inv
    w[:, :, -1:] = inv * np.asarray(ln_mean, dtype=np.float64)[:, None, None]
    return w


def affine_maps(maps: ReadoutMaps, layers: Sequence[int] | None = None,
                heads: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(A [k, d + 2, E], offset [E])`` float64 with ``y_u = affine_features(x_u) @ A[i] + offset``
    exactly (the projection of :func:`project_heads` / :func:`project_residual` regrouped):
    heads ``(layers[i], heads[i])`` when given (``d = dh``), else the one map shared by the
    residual units (``k = 1``, ``d = D``). What a PCA needs to accumulate the scatter of ``w``
    (``d + 2`` wide) instead of ``y`` (``E`` wide) and map it once.
    """
    n_resid = 2 * maps.n_layers + 1
    gamma_proj = maps.gamma_proj.double().cpu().numpy()
    beta_proj = maps.beta_proj.double().cpu().numpy()
    if layers is None:
        share = n_resid
        linear = maps.resid_map.double().cpu().numpy()[None]
        bias = np.zeros((1, maps.embed_dim))
    else:
        share = n_resid * maps.n_heads
        index = (torch.as_tensor(list(layers)), torch.as_tensor(list(heads)))
        linear = maps.head_maps[index].double().cpu().numpy()
        bias = maps.head_bias[index].double().cpu().numpy()
    k = linear.shape[0]
    shared = np.broadcast_to(-gamma_proj / share, (k, 1, maps.embed_dim))
    return np.concatenate([linear, bias[:, None], shared], axis=1), beta_proj / share


def project(
    raw: RawContributions, maps: ReadoutMaps, units: Sequence[int] | None = None
) -> torch.Tensor:
    """Output-space contributions ``y_u`` of the selected units.

    Args:
        raw: compact raw form of ``B`` samples.
        maps: the model's read-out maps.
        units: unit indices in canonical order numbering (default: all ``U`` units).

    Returns:
        ``[B, len(units), E]`` tensor in the maps' dtype, in the order of ``units``.
    """
    n_layers, n_heads = maps.n_layers, maps.n_heads
    n_units = 1 + n_layers + n_layers * n_heads
    sel = torch.arange(n_units) if units is None else torch.as_tensor(list(units), dtype=torch.long)
    if sel.numel() and (sel.min() < 0 or sel.max() >= n_units):
        raise IndexError(f"unit indices must lie in [0, {n_units}), got {sel.tolist()}")
    out = raw.emb.new_empty((len(raw), sel.numel(), maps.embed_dim), dtype=maps.resid_map.dtype)
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
        """``[B, U, E]``: output-space ``y_u``; ``.sum(1)`` equals :func:`encode`."""
        return project(self.raw, self.maps)

    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` (naming the reason) unless the tower is supported."""
    read_tower(model)


def _math_dtype(tower: Tower) -> torch.dtype:
    """float64 for a float64 tower (exactness to ~1e-12), float32 for everything else."""
    return torch.float64 if tower.anchor.dtype == torch.float64 else torch.float32


def readout_maps(model: nn.Module) -> ReadoutMaps:
    """The fixed read-out maps of a model's image tower (computed in float64, returned float32,
    or float64 for a float64 model)."""
    tower = read_tower(model)
    width, dev = tower.width, tower.anchor.device

    def f64(t: torch.Tensor | None, default: torch.Tensor | None) -> torch.Tensor:
        return default if t is None else t.detach().to(dev, torch.float64)

    ones = torch.ones(width, dtype=torch.float64, device=dev)
    zeros = torch.zeros(width, dtype=torch.float64, device=dev)
    gamma = f64(getattr(tower.norm, "weight", None), ones)
    beta = f64(getattr(tower.norm, "bias", None), zeros)
    proj = f64(tower.proj, torch.eye(width, dtype=torch.float64, device=dev))
    proj_bias = f64(tower.proj_bias, torch.zeros(proj.shape[1], dtype=torch.float64, device=dev))

    head_maps, head_bias = [], []
    for blk in tower.blocks:
        n_heads, dh = blk.n_heads, blk.head_dim
        w_o = f64(blk.out_weight, None)  # [D, H·dh]: out = z_cat @ w_o.T
        b_o = f64(blk.out_bias, zeros)
        scale = f64(blk.ls_1, ones) * gamma  # [D]
        # W_O[:, h] is [D, dh]; map = W_O[:, h]^T diag(scale) proj -> [dh, E]
        w_o_heads = w_o.T.reshape(n_heads, dh, width)  # [H, dh, D]
        head_maps.append((w_o_heads * scale) @ proj)
        head_bias.append(((scale * b_o / n_heads) @ proj).expand(n_heads, -1))
    dtype = _math_dtype(tower)
    return ReadoutMaps(
        head_maps=torch.stack(head_maps).to(dtype),
        head_bias=torch.stack(head_bias).to(dtype),
        resid_map=(gamma[:, None] * proj).to(dtype),
        gamma_proj=(gamma @ proj).to(dtype),
        # a read-out bias is a constant of the output, shared like the LN bias
        beta_proj=(beta @ proj + proj_bias).to(dtype),
    )


def _trace_block(blk: Block, x: torch.Tensor, last: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One residual block on ``x [B, N, D]``; returns (new x, heads at CLS [B, H, dh], mlp at CLS).

    ``last``: nothing reads the other tokens after this block, so only CLS queries and only
    CLS goes through the out projection and the MLP (the same values; the plain forward
    computes the whole block: ~1/L of it saved)."""
    q, k, v = blk.qkv(blk.ln_1(x))
    if last:
        q, x = q[:, :, :1], x[:, :1]
    bsz, n_tok, _ = x.shape
    z = F.scaled_dot_product_attention(q, k, v, scale=blk.scale)  # [B, H, N, dh]
    attn_out = F.linear(z.transpose(1, 2).reshape(bsz, n_tok, -1), blk.out_weight, blk.out_bias)
    if blk.ls_1 is not None:
        attn_out = attn_out * blk.ls_1
    x = x + attn_out
    m = blk.mlp(x)
    return x + m, z[:, :, 0], m[:, 0]


def _check_images(tower: Tower, images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != tower.in_channels:
        raise ShapeError(
            f"images must be [B, {tower.in_channels}, H, W], got {tuple(images.shape)}")
    expected = tower.image_size
    if expected is not None and tuple(images.shape[-2:]) != tuple(expected):
        raise ShapeError(f"images must be {expected[0]}x{expected[1]} for this model, got "
                         f"{images.shape[-2]}x{images.shape[-1]}; use the model's preprocess")


@torch.inference_mode()
def encode(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The representation :func:`decompose` sums to, by the model's own forward: ``[B, E]``
    (``encode_image`` for open_clip; the family's read-out for transformers towers, see
    :mod:`.towers`)."""
    tower = read_tower(model)
    _check_images(tower, images)
    return tower.encode(images.to(tower.anchor.device, tower.anchor.dtype))


@torch.inference_mode()
def decompose(
    model: nn.Module, images: torch.Tensor, maps: ReadoutMaps | None = None
) -> Decomposition:
    """Decompose a tower's representation of ``images`` into per-unit contributions.

    Args:
        model: an open_clip CLIP model (or its ``visual`` tower), ViT with class-token pooling,
            or a supported ``transformers`` tower (:data:`.towers.SUPPORTED_KINDS`).
        images: ``[B, 3, H, W]`` preprocessed images; moved to the model's device and dtype.
        maps: precomputed :func:`readout_maps` (saves recomputing them for every batch).

    Returns:
        A :class:`Decomposition`; ``.contributions`` is ``[B, U, E]`` with ``U = 1 + L + L·H``,
        and ``.contributions.sum(1)`` equals :func:`encode` (``encode_image`` for open_clip,
        unnormalised). The raw form is float32 (float64 for a float64 model).
    """
    tower = read_tower(model)
    _check_images(tower, images)
    if maps is None:
        maps = readout_maps(model)
    dtype = _math_dtype(tower)
    # non-blocking: a pinned batch (the extract DataLoader pins on CUDA) copies asynchronously
    x = tower.embed(images.to(tower.anchor.device, tower.anchor.dtype, non_blocking=True))
    emb = x[:, 0]
    heads, mlps = [], []
    for i, blk in enumerate(tower.blocks):
        x, z_cls, mlp_cls = _trace_block(blk, x, last=i == len(tower.blocks) - 1)
        heads.append(z_cls)
        mlps.append(mlp_cls)
    s = x[:, 0].to(dtype)
    if isinstance(tower.norm, nn.LayerNorm):
        mean = s.mean(-1)
        inv_std = torch.rsqrt(s.var(-1, unbiased=False) + tower.norm.eps)
    else:  # Identity: the read-out is already linear
        mean, inv_std = torch.zeros_like(s[:, 0]), torch.ones_like(s[:, 0])
    raw = RawContributions(
        emb=emb.to(dtype),
        mlp=torch.stack(mlps, 1).to(dtype),
        heads=torch.stack(heads, 1).to(dtype),
        ln_mean=mean,
        ln_inv_std=inv_std,
    )
    return Decomposition(raw=raw, maps=maps.__class__(**{
        k: getattr(maps, k).to(s.device) for k in _MAP_FIELDS}))
