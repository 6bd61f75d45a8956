"""Exact decomposition of transformers towers (HF CLIP, BLIP, ViT, DINOv2), per head and in sum.

Random-init models from small configs, norms and LayerScale moved away from the identity; the
reference is each model's own forward (``encode``) and, per head, its own attention
probabilities (``output_attentions``) times its own value projection.
"""

import pytest
import torch
from hf_builders import build, perturb

from residual_core.errors import ShapeError, UnsupportedModelError
from residual_core.method.decompose import decompose, encode, readout_maps

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def rel_err(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def images_for(model, n=3, seed=0, size=None):
    cfg = getattr(model.config, "vision_config", model.config)
    side = cfg.image_size if size is None else size
    hw = tuple(side) if isinstance(side, (tuple, list)) else (side, side)
    return torch.randn(n, 3, *hw, generator=torch.Generator().manual_seed(seed))


CASES = [  # (kind, config overrides, image size or None for the config's)
    ("Dinov2Model", dict(layers=3, heads=3, layerscale_value=0.4), (32, 48)),  # head width 16
    ("Dinov2Model", dict(layers=1, width=64, heads=1, use_swiglu_ffn=True), None),  # width 64
    ("ViTModel", dict(layers=1, width=64, heads=1, image_size=(32, 48)), None),  # non-square grid
    ("ViTModel", dict(layers=3, heads=3, qkv_bias=False), None),
    ("CLIPModel", dict(layers=3, heads=3), None),
    ("CLIPVisionModel", dict(layers=1, width=64, heads=4), None),
    ("CLIPVisionModelWithProjection", dict(layers=3, heads=3), None),
    ("BlipForImageTextRetrieval", dict(layers=3, width=64, heads=4), None),
    ("BlipVisionModel", dict(layers=1, heads=3), None),
]
IDS = [f"{k}-{i}" for i, (k, _, _) in enumerate(CASES)]


@pytest.mark.parametrize("kind, overrides, size", CASES, ids=IDS)
def test_units_sum_to_the_representation(kind, overrides, size):
    model = perturb(build(kind, **overrides), seed=1)
    images = images_for(model, size=size)
    dec = decompose(model, images)
    n_layers, n_heads = overrides["layers"], overrides["heads"]
    assert len(dec.units) == 1 + n_layers + n_layers * n_heads
    rep = encode(model, images)
    assert rel_err(dec.contributions.sum(1), rep) < 1e-4
    # not vacuous: the heads carry a real share of it (BLIP's default init is 1e-10)
    heads = dec.contributions[:, [u.index for u in dec.units if u.kind == "head"]].sum(1)
    assert heads.norm(dim=-1).min() > 0.1 * rep.norm(dim=-1).max()
    model64 = model.double()
    dec64 = decompose(model64, images.double())
    assert dec64.contributions.dtype == torch.float64
    rep64 = encode(model64, images.double())
    assert rel_err(dec64.contributions.sum(1), rep64) < 1e-10
    # what differs between images (a random-init CLS varies ~1e-3 of its norm) is exact too
    total64 = dec64.contributions.sum(1)
    assert rel_err(total64 - total64.mean(0), rep64 - rep64.mean(0)) < 1e-8


def _layers(model):
    """(vision module, its blocks, and per block: ln_1, value projection, out projection, ls_1)."""
    kind = type(model).__name__
    vision = model.vision_model if hasattr(model, "vision_model") else model
    if kind == "Dinov2Model":
        return vision, [(b.norm1, b.attention.v_proj, b.attention.o_proj, b.layer_scale1.lambda1)
                        for b in vision.encoder.layer]
    if kind == "ViTModel":
        return vision, [(b.layernorm_before, b.attention.v_proj, b.attention.o_proj, None)
                        for b in vision.layers]
    if kind.startswith("Blip"):
        def value(qkv):
            return lambda h: qkv(h).chunk(3, dim=-1)[2]  # (q | k | v) along the output
        return vision, [(b.layer_norm1, value(b.self_attn.qkv), b.self_attn.projection, None)
                        for b in vision.encoder.layers]
    return vision, [(b.layer_norm1, b.self_attn.v_proj, b.self_attn.out_proj, None)
                    for b in vision.encoder.layers]


@pytest.mark.parametrize("kind, overrides, size", CASES, ids=IDS)
def test_each_head_and_mlp_match_the_models_own_attention(kind, overrides, size):
    model = perturb(build(kind, attn="eager", **overrides), seed=2)
    images = images_for(model, size=size)
    raw = decompose(model, images).raw
    vision, blocks = _layers(model)
    with torch.inference_mode():
        out = vision(pixel_values=images, output_attentions=True, output_hidden_states=True)
        hidden, probs = out.hidden_states, out.attentions
        assert len(probs) == len(blocks)
        assert rel_err(raw.emb, hidden[0][:, 0]) < 1e-5
        for layer, (ln_1, v_proj, o_proj, ls_1) in enumerate(blocks):
            bsz, n_tok, _ = hidden[layer].shape
            n_heads = probs[layer].shape[1]
            v = v_proj(ln_1(hidden[layer])).view(bsz, n_tok, n_heads, -1).transpose(1, 2)
            z_ref = (probs[layer][:, :, 0, None, :] @ v)[:, :, 0]  # [B, H, dh] at CLS
            for h in range(n_heads):
                assert rel_err(raw.heads[:, layer, h], z_ref[:, h]) < 1e-4, (layer, h)
            attn_out = o_proj(z_ref.reshape(bsz, -1))
            attn_out = attn_out if ls_1 is None else attn_out * ls_1
            mlp_ref = hidden[layer + 1][:, 0] - hidden[layer][:, 0] - attn_out
            assert rel_err(raw.mlp[:, layer], mlp_ref) < 1e-3, layer


def test_layerscale_and_projection_bias_are_inside_the_units():
    """A read-out bias (BLIP's vision_proj) and LayerScale change the units, not only the sum."""
    model = perturb(build("BlipForImageTextRetrieval", layers=1), seed=3)
    maps = readout_maps(model)
    with torch.no_grad():
        model.vision_proj.bias.add_(1.0)
    shifted = readout_maps(model)
    assert torch.allclose(shifted.beta_proj - maps.beta_proj,
                          torch.ones_like(maps.beta_proj), atol=1e-5)
    dino = perturb(build("Dinov2Model", layers=1, layerscale_value=0.25), seed=4)
    images = images_for(dino)
    before = decompose(dino, images).contributions
    with torch.no_grad():
        dino.encoder.layer[0].layer_scale2.lambda1.mul_(2.0)
    after = decompose(dino, images).contributions
    assert rel_err(after.sum(1), encode(dino, images)) < 1e-4
    assert not torch.allclose(after[:, 1], before[:, 1], atol=1e-4)  # the MLP unit moved


def test_an_unsupported_kind_is_refused_naming_the_supported_ones():
    from transformers import SwinConfig, SwinModel

    swin = SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                num_heads=[1, 2], window_size=2)).eval()
    with pytest.raises(UnsupportedModelError, match="SwinModel is not a supported kind.*"
                                                    "Dinov2Model"):
        decompose(swin, torch.randn(1, 3, 32, 32))


def test_train_mode_with_dropout_is_refused_and_eval_mode_is_not():
    model = build("ViTModel", layers=1, hidden_dropout_prob=0.1)
    images = images_for(model)
    model.train()
    with pytest.raises(UnsupportedModelError, match="train mode with dropout"):
        decompose(model, images)
    model.eval()
    assert rel_err(decompose(model, images).contributions.sum(1), encode(model, images)) < 1e-4


def test_image_sizes_follow_the_tower():
    vit = build("ViTModel", layers=1)
    with pytest.raises(ShapeError, match="32x32 for this model"):
        decompose(vit, torch.randn(1, 3, 48, 48))
    with pytest.raises(ShapeError, match=r"\[B, 3, H, W\]"):
        decompose(vit, torch.randn(1, 1, 32, 32))
    dino = perturb(build("Dinov2Model", layers=1), seed=5)  # interpolates to any size
    images = torch.randn(2, 3, 40, 24)
    assert rel_err(decompose(dino, images).contributions.sum(1), encode(dino, images)) < 1e-4
