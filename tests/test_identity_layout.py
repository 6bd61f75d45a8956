"""Identity and layout: one place names weights and datasets, one place makes paths; the layers
import what they should."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from builders import write_image_folder
from residual_core.errors import ResidualError, StoreError
from residual_core.identity import (
    EMBEDDED_MODEL,
    WeightsId,
    file_sha256,
    parse_dataset,
    parse_weights,
    slug,
)
from residual_core.layout import Layout, component, data_root

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, env={**os.environ, **env})


def test_core_imports_no_prefect():
    out = _python("""
        import importlib, pkgutil, sys
        import residual_core
        names = [m.name for m in pkgutil.walk_packages(residual_core.__path__, "residual_core.")]
        for name in names:
            importlib.import_module(name)
        leaked = sorted(m for m in sys.modules if m == "prefect" or m.startswith("prefect."))
        print(len(names), leaked[:3])
        assert not leaked, leaked
    """)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[0]) >= 20  # every core module was imported


def test_results_command_imports_no_torch(tmp_path):
    out = _python(f"""
        import sys
        from residual_core.tables import write_rows
        write_rows({str(tmp_path)!r}, "evaluations",
                   [{{"model": "m", "dataset": "d", "method": "zero-shot", "test_acc": 0.5}}],
                   key="k")
        from pipelines.cli import main
        assert main(["results", "--store-root", {str(tmp_path)!r}]) == 0
        heavy = sorted(m for m in ("torch", "zarr", "dask", "open_clip") if m in sys.modules)
        assert not heavy, heavy
    """)
    assert out.returncode == 0, out.stderr
    assert "zero-shot" in out.stdout


def test_parse_weights_names_a_checkpoint_by_its_content(tmp_path):
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"weights v1")
    weights = parse_weights(EMBEDDED_MODEL, os.path.relpath(ckpt))
    assert weights.pretrained == str(ckpt.resolve())
    assert weights.checkpoint_sha256 == file_sha256(ckpt)
    assert weights.slug == f"ckpt-{weights.checkpoint_sha256[:12]}"
    assert parse_weights(EMBEDDED_MODEL, "openai") == WeightsId(EMBEDDED_MODEL, "openai")
    assert parse_weights(EMBEDDED_MODEL, None).slug == "random"
    ckpt.write_bytes(b"weights v2")  # rewritten in place: another identity
    assert parse_weights(EMBEDDED_MODEL, str(ckpt)).checkpoint_sha256 != weights.checkpoint_sha256


@pytest.mark.parametrize("name", ["..", ".", "../..", "a/../../b", "/etc"])
def test_names_never_climb_out_of_the_root(tmp_path, name):
    layout = Layout.of(tmp_path)
    try:
        url = layout.feature_store(WeightsId(name, name), name, "train")
    except ResidualError:
        return  # refused with a message is fine
    resolved = Path(url).resolve()
    assert resolved.is_relative_to((tmp_path / "features").resolve())
    assert len(resolved.relative_to(tmp_path.resolve()).parts) == 5  # features/m/w/d/split


def test_component_refuses_empty_and_dot_names():
    for bad in ("", " ", "..", "."):
        with pytest.raises(ResidualError, match="invalid dataset name"):
            component(bad, "dataset")
    assert slug("..") != ".." and slug("world/color").startswith("world-color-")
    with pytest.raises(ResidualError, match="unknown split"):
        Layout.of("r").feature_store(WeightsId("m"), "d", "training")


def test_layout_parses_back_what_it_made(tmp_path):
    layout = Layout.of(tmp_path / "features" / "root")  # a root that itself holds /features/
    url = layout.feature_store(WeightsId("ViT-B-16", "openai"), "world/color", "val")
    where = Layout.parse_feature_store(url)
    assert where.layout == layout and where.split == "val" and where.weights == "openai"
    assert where.layout.sibling_feature_store(where, "world/color", "val") == url
    assert Layout.of_store(url) == layout
    assert Layout.spectral_store(url).endswith("val.spectral.zarr")
    assert Layout.align_weights(url) == url.rsplit("/", 1)[0] + "/align.zarr"
    assert Layout.parse_feature_store(str(tmp_path / "mine.zarr")) is None
    remote = Layout.of("memory://bucket/x").feature_store(WeightsId("m"), "d", "test")
    assert remote == "memory://bucket/x/features/m/random/d/test.zarr"


def test_stores_of_another_dtype_live_beside_the_default_ones(tmp_path):
    layout = Layout.of(tmp_path)
    weights = WeightsId("ViT-B-16", "openai")
    plain = layout.feature_store(weights, "cifar10", "train")
    half = layout.feature_store(weights, "cifar10", "train", "float16")
    assert plain.endswith("/train.zarr") and half.endswith("/train.float16.zarr")
    where = Layout.parse_feature_store(half)
    assert (where.split, where.dtype) == ("train", "float16")
    assert Layout.parse_feature_store(plain).dtype == "float32"
    assert where.layout.sibling_feature_store(where, "imagenet", "train") == \
        layout.feature_store(weights, "imagenet", "train", "float16")
    assert Layout.spectral_store(half).endswith("/train.float16.spectral.zarr")
    assert Layout.align_weights(half).endswith("/align.float16.zarr")
    assert Layout.align_weights(plain).endswith("/align.zarr")
    locations = {Layout.location(u) for u in (plain, half, Layout.spectral_store(half),
                                              Layout.align_weights(half),
                                              Layout.align_weights(plain))}
    assert len(locations) == 5  # rows of one dtype's stores never replace the other's
    assert Layout.of_store(Layout.align_weights(half)) == layout
    assert Layout.parse_feature_store(Layout.spectral_store(half)) is None
    with pytest.raises(ResidualError, match="unknown feature dtype 'float8'"):
        layout.feature_store(weights, "cifar10", "train", "float8")


def test_data_root_is_read_once_with_home_expanded(monkeypatch):
    monkeypatch.setenv("RESIDUAL_DATA_ROOT", "~/somewhere")
    assert data_root() == os.path.expanduser("~/somewhere")
    layout = Layout.of()
    assert layout.datasets == Path(os.path.expanduser("~/somewhere")) / "datasets"
    assert layout.checkpoints.parent == layout.datasets.parent
    monkeypatch.delenv("RESIDUAL_DATA_ROOT")
    assert Layout.of().root == "data"


def test_dataset_content_changes_when_an_image_is_edited_in_place(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", ["a", "b"], 3)
    ref = parse_dataset(f"imagefolder:{folder}")
    assert ref.is_files and parse_dataset("cifar10").content_identity() is None
    cache = tmp_path / "manifest.json"
    before = ref.content_identity(cache=cache)
    assert before["files"] == 6 and cache.is_file()
    assert ref.content_identity(cache=cache) == before  # reused from the manifest
    image = folder / "a" / "0000.png"
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    assert ref.content_identity(cache=cache) != before
    assert ref.content_identity() == ref.content_identity(cache=cache)  # the cache changes nothing


def test_edited_images_make_the_store_stale(tmp_path):
    from residual_core.engines.extract import extract
    from residual_core.method.models import load_model
    from residual_core.stages.extract import Params

    folder = write_image_folder(tmp_path / "imgs", ["a", "b"], 6)
    tiny = load_model(EMBEDDED_MODEL, None, device="cpu")
    params = Params(batch_size=8, rows_per_chunk=16, num_workers=0, device="cpu")
    kw = dict(store_root=tmp_path / "st", loaded=tiny, progress=False)
    name = f"imagefolder:{folder}"
    assert not extract(EMBEDDED_MODEL, None, name, "train", params, **kw).was_cached
    assert extract(EMBEDDED_MODEL, None, name, "train", params, **kw).was_cached
    for image in sorted(folder.rglob("*.png")):  # every image rewritten in place
        Image.fromarray(255 - np.asarray(Image.open(image))).save(image)
    with pytest.raises(StoreError, match="dataset_content"):
        extract(EMBEDDED_MODEL, None, name, "train", params, **kw)


def test_location_names_where_a_store_lives_not_its_root_or_content(tmp_path):
    weights = WeightsId("ViT-B-16", "openai")
    a, b = Layout.of(tmp_path / "a"), Layout.of("memory://bucket/b")
    train = a.feature_store(weights, "cifar10", "train")
    assert Layout.location(train) == Layout.location(b.feature_store(weights, "cifar10", "train"))
    assert Layout.location(train) == "ViT-B-16/openai/cifar10/train.zarr"
    assert Layout.location(Layout.spectral_store(train)) == "ViT-B-16/openai/cifar10/train.spectral.zarr"
    assert Layout.location(Layout.align_weights(train)) == "ViT-B-16/openai/cifar10/align.zarr"
    assert Layout.location(a.feature_store(weights, "cifar10", "val")) != Layout.location(train)
    assert Layout.location(str(tmp_path / "mine.zarr")) == str(tmp_path / "mine.zarr")
