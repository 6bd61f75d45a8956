"""The decomposition sums exactly to encode_image, per head and per term as METHOD §1 says."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from builders import sample_crops
from residual_core.errors import ShapeError, UnsupportedModelError
from residual_core.identity import EMBEDDED_MODEL
from residual_core.method.decompose import (
    RawContributions,
    ReadoutMaps,
    affine_features,
    affine_maps,
    decompose,
    project,
    readout_maps,
)
from residual_core.method.models import load_model


def photo_batch(loaded, n=3, seed=0):
    """Real photographs (sklearn's samples, cropped), preprocessed: not zeros, not constant."""
    size = loaded.model.visual.image_size[0]
    return torch.stack([loaded.preprocess(im) for im in sample_crops(n, size, seed)])


def rel_err(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def randomise_norms_and_scales(model, seed=0):
    """Random init leaves LN gamma=1, beta=0 and LayerScale constant; make them non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if name.endswith((".weight", ".bias", "gamma")) and p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def check_exact(model, images):
    dec = decompose(model, images)
    with torch.inference_mode():
        ref = model.encode_image(images)
    assert dec.contributions.shape[:2] == (images.shape[0], len(dec.units))
    assert rel_err(dec.contributions.sum(1), ref) < 1e-4
    return dec


@pytest.mark.parametrize("name", [EMBEDDED_MODEL, "ViT-B-32", "ViT-B-16", "ViT-B-32-quickgelu"])
def test_contributions_sum_to_encode_image(name):
    loaded = load_model(name, None, device="cpu", seed=1)
    randomise_norms_and_scales(loaded.model)
    images = torch.cat([photo_batch(loaded, 2), torch.randn(1, *photo_batch(loaded, 1).shape[1:])])
    dec = check_exact(loaded.model, images)
    vis = loaded.model.visual
    n_layers = len(vis.transformer.resblocks)
    n_heads = vis.transformer.resblocks[0].attn.num_heads
    assert len(dec.units) == 1 + n_layers + n_layers * n_heads
    assert dec.raw.heads.shape == (3, n_layers, n_heads, vis.transformer.width // n_heads)


@pytest.mark.parametrize("overrides", [
    {"ls_init_value": 0.5},  # LayerScale multiplies every unit
    {"final_ln_after_pool": True, "no_ln_pre": True},
])
def test_variants_sum_exactly(custom_config, overrides):
    loaded = load_model(custom_config(**overrides), None, device="cpu", seed=2)
    randomise_norms_and_scales(loaded.model, seed=3)
    check_exact(loaded.model, photo_batch(loaded, 4))


def test_raw_form_reconstructs_through_numpy_and_subsets():
    loaded = load_model(EMBEDDED_MODEL, None, device="cpu", seed=4)
    randomise_norms_and_scales(loaded.model)
    dec = decompose(loaded.model, photo_batch(loaded, 5))
    # Round trip through numpy, as the feature cache stores it.
    maps = ReadoutMaps.from_numpy(dec.maps.as_numpy())
    raw = RawContributions(**{k: torch.from_numpy(getattr(dec.raw, k).numpy().copy())
                              for k in ("emb", "mlp", "heads", "ln_mean", "ln_inv_std")})
    full = project(raw, maps)
    assert rel_err(full, dec.contributions) < 1e-6
    order = [17, 0, 3, 9, 2]  # head, emb, mlp, head, mlp: any order, any subset
    assert torch.allclose(project(raw, maps, order), dec.contributions[:, order], atol=1e-6)
    with pytest.raises(IndexError):
        project(raw, maps, [len(dec.units)])


def test_affine_form_of_every_unit_equals_its_projection():
    """``affine_features(x) @ A + offset`` (what the PCA accumulates) is ``project`` regrouped:
    equal in float64 for the embedding, every MLP and every head, in any head order."""
    loaded = load_model(EMBEDDED_MODEL, None, device="cpu", seed=5)
    randomise_norms_and_scales(loaded.model, seed=1)
    dec = decompose(loaded.model, photo_batch(loaded, 4))
    maps = ReadoutMaps(**{k: getattr(dec.maps, k).double() for k in
                          ("head_maps", "head_bias", "resid_map", "gamma_proj", "beta_proj")})
    raw = {k: getattr(dec.raw, k).double().numpy() for k in
           ("emb", "mlp", "heads", "ln_mean", "ln_inv_std")}
    y = project(RawContributions(**{k: torch.from_numpy(v) for k, v in raw.items()}), maps).numpy()
    stats = (raw["ln_mean"], raw["ln_inv_std"])
    n_layers, n_heads = maps.n_layers, maps.n_heads
    resid = np.concatenate([raw["emb"][:, None], raw["mlp"]], axis=1)
    linear, offset = affine_maps(maps)
    assert linear.shape == (1, maps.width + 2, maps.embed_dim)
    np.testing.assert_allclose(affine_features(resid, *stats) @ linear[0] + offset,
                               y[:, :1 + n_layers], rtol=0, atol=1e-12 * np.abs(y).max())
    layers, heads = np.array([3, 0, 2, 0]), np.array([1, 0, 3, 2])
    linear, offset = affine_maps(maps, layers, heads)
    w = affine_features(raw["heads"][:, layers, heads], *stats)
    got = np.einsum("bkd,kde->bke", w, linear) + offset
    units = 1 + n_layers + layers * n_heads + heads
    np.testing.assert_allclose(got, y[:, units], rtol=0, atol=1e-12 * np.abs(y).max())


_PEAK_SCRIPT = """
import sys, torch
from residual_core.method.decompose import ReadoutMaps, project_heads
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
b, layers, heads, dh, e = 256, 12, 12, 64, 512  # ViT-B/16's heads, 256 rows
maps = ReadoutMaps(head_maps=torch.randn(layers, heads, dh, e), head_bias=torch.randn(layers, heads, e),
                   resid_map=torch.randn(768, e), gamma_proj=torch.randn(e), beta_proj=torch.randn(e))
z = torch.randn(b, layers * heads, dh)
lay = torch.arange(layers).repeat_interleave(heads)
hd = torch.arange(heads).repeat(layers)
stats = (torch.randn(b), torch.rand(b) + 0.5)
before = hwm()
y = project_heads(z, lay, hd, *stats, maps)
print(hwm() - before, y.numel() * 4)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_projecting_many_heads_never_holds_a_copy_of_the_maps_per_row():
    """All 144 heads of ViT-B/16 on 256 rows: the output is 75 MB; broadcasting the rows
    against the head maps (``[B, k, 1, dh] @ [k, dh, E]``) would hold ``[B, k, dh, E]``,
    4.8 GB. A fresh process, so the peak is this call's."""
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True,
                         check=True, timeout=300)
    grown, output = map(int, out.stdout.split())
    assert grown < 4 * output, (grown, output)


def _independent_reference(model, images, layer, head):
    """Per-head z at CLS from nn.MultiheadAttention's own attention weights, and the LN input s."""
    vis = model.visual
    blk = vis.transformer.resblocks[layer]
    seen = {}
    h1 = blk.ln_1.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o.detach()))
    h2 = vis.ln_post.register_forward_hook(lambda m, i, o: seen.__setitem__("s", i[0].detach()))
    with torch.no_grad():
        out = vis(images)
    h1.remove(); h2.remove()
    x = seen["x"]
    with torch.no_grad():
        _, weights = blk.attn(x, x, x, need_weights=True, average_attn_weights=False)
    d = x.shape[-1]
    n_heads = blk.attn.num_heads
    dh = d // n_heads
    w_v = blk.attn.in_proj_weight[2 * d:]
    b_v = blk.attn.in_proj_bias[2 * d:]
    with torch.no_grad():
        v = (x @ w_v.T + b_v)[..., head * dh:(head + 1) * dh]  # [B, N, dh]
    z = weights[:, head, 0, :, None].mul(v).sum(1)  # [B, dh]
    return z, seen["s"][:, 0], out


@torch.no_grad()
def test_head_and_shared_terms_by_hand(custom_config):
    """Recompute y for a head, an MLP and emb from module weights by hand (METHOD §1)."""
    loaded = load_model(custom_config(ls_init_value=0.7), None, device="cpu", seed=5)
    model = loaded.model
    randomise_norms_and_scales(model, seed=6)
    images = photo_batch(loaded, 3)
    layer, head = 1, 2
    z_ref, s, out = _independent_reference(model, images, layer, head)
    dec = decompose(model, images)
    vis = model.visual
    n_layers = len(vis.transformer.resblocks)
    blk = vis.transformer.resblocks[layer]
    n_heads, d = blk.attn.num_heads, vis.transformer.width
    dh = d // n_heads
    assert torch.allclose(dec.raw.heads[:, layer, head], z_ref, atol=1e-5)
    # the last block is computed for CLS only: its heads still match the module's own
    z_last = _independent_reference(model, images, n_layers - 1, head)[0]
    assert n_layers - 1 != layer
    assert torch.allclose(dec.raw.heads[:, n_layers - 1, head], z_last, atol=1e-5)

    mu = s.mean(-1, keepdim=True)
    sigma2 = ((s - mu) ** 2).mean(-1, keepdim=True)
    c = vis.ln_post.weight / torch.sqrt(sigma2 + vis.ln_post.eps)  # [B, D]
    shared = c * mu - vis.ln_post.bias  # [B, D]
    w_o = blk.attn.out_proj.weight[:, head * dh:(head + 1) * dh]
    r_head = blk.ls_1.gamma * (z_ref @ w_o.T + blk.attn.out_proj.bias / n_heads)
    y_head = (c * r_head - shared / ((2 * n_layers + 1) * n_heads)) @ vis.proj
    u_head = next(u.index for u in dec.units if u.name == f"L{layer}H{head}")
    assert torch.allclose(dec.contributions[:, u_head], y_head, atol=1e-5)

    r_emb = dec.raw.emb  # ln_pre output at CLS: the same for every image
    assert torch.allclose(r_emb, r_emb[:1].expand_as(r_emb))
    y_emb = (c * r_emb - shared / (2 * n_layers + 1)) @ vis.proj
    assert torch.allclose(dec.contributions[:, 0], y_emb, atol=1e-5)
    # The units' sum is the tower output; hence the MLPs carry the rest.
    assert torch.allclose(dec.contributions.sum(1), out, atol=1e-5)
    mlp_total = out - dec.contributions[:, [0] + list(range(1 + n_layers, len(dec.units)))].sum(1)
    assert torch.allclose(dec.contributions[:, 1:1 + n_layers].sum(1), mlp_total, atol=1e-5)


def test_heads_are_not_split_equally():
    loaded = load_model(EMBEDDED_MODEL, None, device="cpu", seed=7)
    dec = decompose(loaded.model, photo_batch(loaded, 4))
    maps = dec.maps
    heads = dec.contributions[:, 1 + maps.n_layers:].reshape(4, maps.n_layers, maps.n_heads, -1)
    for layer in range(maps.n_layers):
        for h in range(1, maps.n_heads):
            diff = (heads[:, layer, h] - heads[:, layer, 0]).norm(dim=-1)
            assert (diff > 0.05 * heads[:, layer, 0].norm(dim=-1)).all()


def test_reduced_precision_follows_model_dtype():
    loaded = load_model(EMBEDDED_MODEL, None, device="cpu", seed=8)
    model = loaded.model.to(torch.bfloat16)
    images = photo_batch(loaded, 2)
    dec = decompose(model, images)
    assert dec.raw.heads.dtype == torch.float32  # raw form is upcast after the bf16 forward
    with torch.inference_mode():
        ref = model.encode_image(images.bfloat16()).float()
    assert rel_err(dec.contributions.sum(1), ref) < 5e-2


@pytest.mark.parametrize("overrides, reason", [
    ({"attentional_pool": True}, "attn_pool"),
    ({"pool_type": "avg"}, "pool_type"),
    ({"qk_norm": True}, "custom attention"),
])
def test_unsupported_towers_are_refused(custom_config, overrides, reason):
    loaded = load_model(custom_config(**overrides), None, device="cpu")
    with pytest.raises(UnsupportedModelError, match=reason):
        decompose(loaded.model, torch.randn(1, 3, 32, 32))


def test_patch_dropout_in_train_mode_is_refused(custom_config):
    loaded = load_model(custom_config(patch_dropout=0.5), None, device="cpu")
    loaded.model.train()
    with pytest.raises(UnsupportedModelError, match="patch dropout"):
        decompose(loaded.model, torch.randn(1, 3, 32, 32))
    loaded.model.eval()  # inactive in eval mode: then it is exact again
    check_exact(loaded.model, torch.randn(2, 3, 32, 32))


def test_wrong_image_shapes_are_clear_errors():
    model = load_model(EMBEDDED_MODEL, None, device="cpu").model
    with pytest.raises(ShapeError, match="32x32"):
        decompose(model, torch.randn(1, 3, 64, 64))
    with pytest.raises(ShapeError, match=r"\[B, 3, H, W\]"):
        decompose(model, torch.randn(3, 32, 32))


def test_readout_maps_shapes():
    model = load_model(EMBEDDED_MODEL, None, device="cpu").model
    maps = readout_maps(model)
    assert maps.head_maps.shape == (4, 4, 32, 64)
    assert maps.head_bias.shape == (4, 4, 64)
    assert maps.resid_map.shape == (128, 64)
    assert [u.name for u in maps.units[:3]] == ["emb", "L0.mlp", "L1.mlp"]
    assert maps.units[5].name == "L0H0" and maps.units[-1].name == "L3H3"
    assert np.all(np.isfinite(maps.as_numpy()["head_maps"]))
