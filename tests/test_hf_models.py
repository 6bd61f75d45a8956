"""``hf:`` models: transformers towers saved with ``save_pretrained`` (random weights, small
configs) and loaded back offline by ``load_model``, named, preprocessed, tokenised, decomposed and
fine-tuned like open_clip models; a Hub id that is not cached is refused with the way out."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from hf_builders import save_hf
from pipelines.cli import main
from residual_core.errors import ResidualError, UnsupportedModelError, WeightsUnavailableError
from residual_core.identity import parse_weights
from residual_core.method.decompose import decompose, encode
from residual_core.method.models import load_model
from residual_core.method.towers import image_encoder

KINDS = ("Dinov2Model", "ViTModel", "CLIPModel", "BlipForImageTextRetrieval",
         "CLIPVisionModelWithProjection")


def rel_err(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each kind saved into its own folder: ``{kind: (folder, in-memory reference model)}``."""
    root = tmp_path_factory.mktemp("hf")
    return {kind: (root / kind, save_hf(kind, root / kind)) for kind in KINDS}


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 52, 3), dtype=np.uint8))
            for i in range(3)]


def _reference(kind, model, pixels):
    """The representation by the reference model's own API (the authors' encoders)."""
    if kind == "CLIPModel":
        out = model.get_image_features(pixel_values=pixels)
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    if kind == "CLIPVisionModelWithProjection":
        return model(pixel_values=pixels).image_embeds
    if kind == "BlipForImageTextRetrieval":
        return model.vision_proj(model.vision_model(pixel_values=pixels).last_hidden_state[:, 0])
    return model(pixel_values=pixels).last_hidden_state[:, 0]


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_a_saved_tower_loads_back_and_decomposes_exactly(saved, photos, kind):
    folder, reference = saved[kind]
    loaded = load_model(f"hf:{folder}", device="cpu")
    pixels = torch.stack([loaded.preprocess(p) for p in photos])
    assert pixels.shape == (3, 3, 32, 32)
    want = _reference(kind, reference, pixels)
    assert rel_err(loaded.model.encode_image(pixels), want) < 1e-6
    assert rel_err(decompose(loaded.model, pixels).contributions.sum(1), want) < 1e-4
    assert rel_err(image_encoder(loaded.model)(pixels), encode(loaded.model, pixels)) < 1e-6
    assert loaded.has_text_tower == (kind in ("CLIPModel", "BlipForImageTextRetrieval"))
    assert loaded.name == f"hf:{folder.resolve()}" and loaded.pretrained == str(folder.resolve())


@torch.no_grad()
def test_text_towers_embed_as_the_authors(saved):
    texts = ["a photo of the digit", "a"]
    folder, clip = saved["CLIPModel"]
    loaded = load_model(f"hf:{folder}", device="cpu")
    tokens = loaded.tokenizer(texts)
    out = clip.get_text_features(**tokens)
    want = out if isinstance(out, torch.Tensor) else out.pooler_output
    assert rel_err(loaded.model.encode_text(tokens), want) < 1e-6
    folder, blip = saved["BlipForImageTextRetrieval"]
    loaded = load_model(f"hf:{folder}", device="cpu")
    tokens = loaded.tokenizer(texts)
    assert tokens["input_ids"][0, 0] == 2  # [CLS], as BLIP's processor gives it
    hidden = blip.text_encoder(input_ids=tokens["input_ids"],
                               attention_mask=tokens["attention_mask"]).last_hidden_state
    assert rel_err(loaded.model.encode_text(tokens), blip.text_proj(hidden[:, 0])) < 1e-6


def test_the_weights_are_named_by_the_folders_content(saved, tmp_path):
    folder, _ = saved["ViTModel"]
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    a, b = parse_weights(f"hf:{folder}", None), parse_weights(f"hf:{copy}", None)
    assert a.checkpoint_sha256 == b.checkpoint_sha256 and a.slug.startswith("ckpt-")
    assert a.model != b.model  # the folder is part of the name, its content of the weights
    save_hf("ViTModel", copy, seed=5)  # other weights in the same folder
    assert parse_weights(f"hf:{copy}", None).checkpoint_sha256 != a.checkpoint_sha256
    with pytest.raises(ResidualError, match="--pretrained is not used"):
        parse_weights(f"hf:{folder}", "laion2b_s34b_b88k")
    assert parse_weights(f"hf:{folder}", str(folder)) == a  # what a store records


def test_a_task_head_checkpoint_loads_its_tower(tmp_path, photos):
    """google/vit-large-patch16-224 is a ViTForImageClassification: its ViTModel is read."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    head = ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        patch_size=8, image_size=32, num_labels=5)).eval()
    head.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    loaded = load_model(f"hf:{tmp_path}", device="cpu")
    pixels = loaded.preprocess(photos[0])[None]
    with torch.no_grad():
        want = head.vit(pixel_values=pixels).last_hidden_state[:, 0]
        assert rel_err(loaded.model.encode_image(pixels), want) < 1e-6


def test_unsupported_and_incomplete_folders_are_refused_clearly(saved, tmp_path):
    from transformers import SwinConfig, SwinModel

    SwinModel(SwinConfig(embed_dim=8, depths=[1], num_heads=[1], image_size=32)).save_pretrained(
        tmp_path / "swin")
    with pytest.raises(UnsupportedModelError, match="supported model types: dinov2, vit"):
        load_model(f"hf:{tmp_path / 'swin'}", device="cpu")
    bare = tmp_path / "bare"
    shutil.copytree(saved["Dinov2Model"][0], bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(ResidualError, match=r"processor.save_pretrained\(DIR\)"):
        load_model(f"hf:{bare}", device="cpu")
    with pytest.raises(ResidualError, match="no such folder"):
        load_model(f"hf:{tmp_path / 'missing'}", device="cpu")
    with pytest.raises(ResidualError, match="has no config.json"):
        load_model(f"hf:{tmp_path}", device="cpu")


def test_an_uncached_hub_id_says_how_to_supply_a_folder(capsys, monkeypatch, tmp_path):
    import huggingface_hub.constants

    # an empty cache, whatever this machine's holds
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="--model hf:DIR"):
        load_model("hf:facebook/dinov2-large", device="cpu")
    assert main(["units", "--model", "hf:facebook/dinov2-large"]) == 2
    err = capsys.readouterr().err
    assert "not in the local cache" in err and "save_pretrained(DIR)" in err
    assert "Traceback" not in err


def test_units_command_and_finetune_on_an_hf_tower(saved, photos, capsys):
    from residual_core.method.training import finetune

    folder, reference = saved["Dinov2Model"]
    assert main(["units", "--model", f"hf:{folder}"]) == 0
    out = capsys.readouterr().out
    assert "L=3 layers, H=3 heads of dh=16" in out and "U=13 units" in out
    loaded = load_model(f"hf:{folder}", device="cpu")

    class Images(torch.utils.data.Dataset):
        labels = np.array([0, 1, 0])

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return loaded.preprocess(photos[i]), int(self.labels[i])

    weights = torch.randn(2, 48)
    result = finetune(loaded, Images(), Images(), class_weights=weights, epochs=1, batch_size=2,
                      progress=False)
    assert result.trainable_parameters == sum(p.numel() for p in reference.parameters())
    assert set(result.state) == {f"vision.{k}" for k in reference.state_dict()}


def test_a_cached_hub_id_is_read_from_its_snapshot(saved, monkeypatch, tmp_path, photos):
    """The Hugging Face cache layout (refs/main -> snapshots/COMMIT/FILE -> ../../blobs/SHA256):
    the id names the model, the snapshot folder its weights, the blobs their hash."""
    import hashlib
    import os

    import huggingface_hub.constants

    folder, reference = saved["Dinov2Model"]
    repo = tmp_path / "models--acme--tiny-dino"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    weights = parse_weights("hf:acme/tiny-dino", None)
    assert weights.model == "hf:acme/tiny-dino" and weights.pretrained == str(snapshot)
    assert weights.checkpoint_sha256 == parse_weights(f"hf:{folder}", None).checkpoint_sha256
    loaded = load_model("hf:acme/tiny-dino", device="cpu")
    pixels = loaded.preprocess(photos[0])[None]
    with torch.no_grad():
        assert rel_err(loaded.model.encode_image(pixels), _reference(
            "Dinov2Model", reference, pixels)) < 1e-6
