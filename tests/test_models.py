"""Model loading: checkpoints through the users' code path, clear errors for bad names and files."""

import pytest
import torch

from residual_core.errors import ResidualError, UnknownModelError, WeightsUnavailableError
from residual_core.identity import EMBEDDED_MODEL, file_sha256
from residual_core.method.models import load_model


def test_embedded_config_is_registered_with_open_clip():
    import open_clip

    assert EMBEDDED_MODEL in open_clip.list_models()
    vis = load_model(EMBEDDED_MODEL, None, device="cpu").model.visual
    assert vis.image_size == (32, 32) and vis.patch_size == (8, 8)
    assert len(vis.transformer.resblocks) == 4 and vis.transformer.width == 128
    assert vis.transformer.resblocks[0].attn.num_heads == 4 and vis.output_dim == 64


def test_checkpoint_round_trip(tmp_path):
    original = load_model(EMBEDDED_MODEL, None, device="cpu", seed=11)
    path = tmp_path / "tiny.pt"
    torch.save(original.model.state_dict(), path)
    other_seed = load_model(EMBEDDED_MODEL, None, device="cpu", seed=12)
    loaded = load_model(EMBEDDED_MODEL, path, device="cpu", seed=12)
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref = original.model.encode_image(images)
        assert not torch.allclose(other_seed.model.encode_image(images), ref)
        assert torch.equal(loaded.model.encode_image(images), ref)
    assert loaded.pretrained == str(path.resolve())
    assert loaded.checkpoint_sha256 == file_sha256(path)
    assert loaded.weights.checkpoint_sha256 == loaded.checkpoint_sha256
    assert not loaded.model.training


def test_random_weights_are_seeded():
    a = load_model(EMBEDDED_MODEL, None, device="cpu", seed=3).model
    b = load_model(EMBEDDED_MODEL, None, device="cpu", seed=3).model
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(ResidualError, match="checkpoint file not found"):
        load_model(EMBEDDED_MODEL, tmp_path / "missing.pt", device="cpu")


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(load_model(EMBEDDED_MODEL, None, device="cpu").model.state_dict(), path)
    with pytest.raises(ResidualError, match="does not fit architecture ViT-B-32"):
        load_model("ViT-B-32", path, device="cpu")


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(UnknownModelError, match="Did you mean.*ViT-B-16"):
        load_model("ViT-B-61", None, device="cpu")


def test_unknown_tag_lists_known_tags():
    with pytest.raises(UnknownModelError, match="laion2b_s34b_b88k"):
        load_model("ViT-B-16", "no_such_tag", device="cpu")


def test_uncached_weights_offline_say_how_to_supply_them(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="pass its file path as --pretrained"):
        load_model("ViT-B-32", "laion2b_s34b_b79k", device="cpu", cache_dir=str(tmp_path))


def test_openai_tag_selects_quickgelu():
    import open_clip

    # The tag's config asks for QuickGELU; open_clip itself would only warn on a mismatch.
    assert open_clip.get_pretrained_cfg("ViT-B-16", "openai").get("quick_gelu") is True


def test_decomposable_from_the_config_agrees_with_the_built_tower(tmp_path, capsys):
    """``decomposable`` reads the config; ``check_supported`` checks the built model: on tiny
    configs of each kind (ViT, ResNet, attention pooling, average pooling) they agree."""
    import json

    import open_clip

    from pipelines.cli import main
    from residual_core.errors import UnsupportedModelError
    from residual_core.method.decompose import check_supported
    from residual_core.method.models import decomposable

    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    vit = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}
    configs = {
        "probe-vit": vit,
        "probe-rn": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
        "probe-attnpool": {**vit, "attentional_pool": True, "attn_pooler_queries": 4,
                           "attn_pooler_heads": 2},
        "probe-avg": {**vit, "pool_type": "avg"},
    }
    for name, vision in configs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"embed_dim": 32, "vision_cfg": vision, "text_cfg": text}))
    open_clip.add_model_config(tmp_path)
    verdicts = {}
    for name in configs:
        model = open_clip.create_model(name).eval()
        try:
            check_supported(model)
            built = None
        except UnsupportedModelError as exc:
            built = str(exc)
        verdicts[name] = decomposable(name)
        assert (verdicts[name] is None) == (built is None), (name, verdicts[name], built)
    assert verdicts["probe-rn"].startswith("a ResNet") and "avg" in verdicts["probe-avg"]
    assert main(["models"]) == 0
    listed = capsys.readouterr().out.split()
    assert "probe-vit" in listed and "probe-rn" not in listed and EMBEDDED_MODEL in listed
    assert main(["models", "--all"]) == 0
    out = capsys.readouterr().out
    assert "probe-rn  [not decomposable: a ResNet image tower" in out
