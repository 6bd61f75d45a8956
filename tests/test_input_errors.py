"""Bad user inputs give one line naming the file or option and the fix (CLI: exit status 2).

Every input here is a real file written by the test: broken images, checkpoints that are not
state dicts, a store root that is a file, a grid file of random bytes, devices this machine lacks.
"""

import argparse
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from builders import write_image_folder
from pipelines.cli import main
from pipelines.grid import GridError, load_grid
from residual_core.datasets import load_dataset
from residual_core.errors import ResidualError
from residual_core.formats.feature_store import FeatureStore
from residual_core.identity import EMBEDDED_MODEL, WeightsId
from residual_core.method.models import load_model
from residual_core.stages.extract import Params as ExtractParams

FAST = ["--device", "cpu", "--num-workers", "0", "--batch-size", "8", "--rows-per-chunk", "8",
        "--quiet"]


def error_line(capsys, argv) -> str:
    """Run the CLI: it must exit 2 with exactly one stderr line, which is returned."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("residual: error: "), err
    return err[0]


def extract_argv(dataset: str, store_root, *extra: str) -> list[str]:
    return ["extract", "--model", EMBEDDED_MODEL, "--dataset", dataset, "--split", "train",
            "--store-root", str(store_root), *FAST, *extra]


@pytest.fixture
def folder(tmp_path):
    return write_image_folder(tmp_path / "imgs", ["ant", "bee"], per_class=10)


# ----------------------------------------------------------------------------------------------
# 1. broken images in an imagefolder


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[:-100]  # PIL's verify() accepts it; decoding fails


BAD_IMAGES = {
    "text.png": b"this is not an image\n",
    "empty.png": b"",
    "truncated.png": _png_bytes()[:60],
    "truncated.jpg": _truncated_jpeg(),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_image_is_named_when_the_split_is_loaded(folder, name):
    (folder / "bee" / name).write_bytes(BAD_IMAGES[name])
    with pytest.raises(ResidualError) as exc:
        load_dataset(f"imagefolder:{folder}", "train")
    message = str(exc.value)
    assert len(message.splitlines()) == 1
    assert f"bee/{name}" in message and "skip_bad_images" in message


def test_bad_image_extract_is_one_line_naming_the_file(folder, tmp_path, capsys):
    (folder / "ant" / "x.png").write_text("not a png")
    line = error_line(capsys, extract_argv(f"imagefolder:{folder}", tmp_path / "stores"))
    assert "ant/x.png" in line and "--skip-bad-images" in line


def test_skip_bad_images_leaves_them_out_and_records_them(folder, tmp_path, capsys):
    clean = shutil.copytree(folder, tmp_path / "clean")
    (folder / "ant" / "x.png").write_text("not a png")
    (folder / "bee" / "0003.png").write_bytes(b"")  # an image emptied in place
    (clean / "bee" / "0003.png").unlink()
    root = tmp_path / "stores"
    assert main(extract_argv(f"imagefolder:{folder}", root, "--skip-bad-images")) == 0
    url = capsys.readouterr().out.split(":")[0]
    store = FeatureStore.open(url)
    assert store.attrs["skipped_images"] == ["ant/x.png", "bee/0003.png"]
    assert store.attrs["config"]["skip_bad_images"] is True
    # the split is that of the folder without the bad files
    expected = load_dataset(f"imagefolder:{clean}", "train")
    np.testing.assert_array_equal(store.indices, expected.indices)
    np.testing.assert_array_equal(store.labels, expected.labels)
    # the same command again: complete, nothing computed
    assert main(extract_argv(f"imagefolder:{folder}", root, "--skip-bad-images")) == 0
    assert "already complete" in capsys.readouterr().out


def test_skip_bad_images_keeps_the_splits_of_a_good_folder(folder):
    from residual_core.engines.extract import store_config

    name = f"imagefolder:{folder}"
    for split in ("train", "val", "test"):
        plain, skipping = load_dataset(name, split), load_dataset(name, split, skip_bad_images=True)
        np.testing.assert_array_equal(plain.indices, skipping.indices)
        np.testing.assert_array_equal(plain.labels, skipping.labels)
        assert skipping.skipped == ()
    # the default leaves the config of existing stores (and so their hash) as it was
    config = store_config(WeightsId(EMBEDDED_MODEL), name, "train", plain.indices,
                          plain.labels, ExtractParams())
    assert "skip_bad_images" not in config


def test_skip_bad_images_is_a_grid_field_and_part_of_the_stage_key():
    from residual_core.stages.extract import Params

    assert Params(skip_bad_images=True).identity()["skip_bad_images"] is True
    grid = load_grid({"sweeps": [{"models": [{"name": EMBEDDED_MODEL}],
                                  "datasets": ["world/color"]}],
                      "extract": {"skip_bad_images": True}})
    assert grid.extract.skip_bad_images is True


# ----------------------------------------------------------------------------------------------
# 2. checkpoint files that are not state dicts


def _write_checkpoint(path, kind: str) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello, not a checkpoint\n")
    else:
        torch.save({"list": [1, 2, 3], "tensor": torch.zeros(3), "empty-dict": {},
                    "dict-of-ints": {"a": 1}, "namespace": argparse.Namespace(a=1)}[kind], path)


CHECKPOINTS = {"empty": "empty", "text": "not a torch checkpoint", "list": "not a state dict",
               "tensor": "not a state dict", "empty-dict": "not a state dict",
               "dict-of-ints": "not a state dict", "namespace": "weights_only=True"}


@pytest.mark.parametrize("kind", list(CHECKPOINTS))
def test_bad_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, kind):
    path = tmp_path / f"{kind}.pt"
    _write_checkpoint(path, kind)
    line = error_line(capsys, ["units", "--model", EMBEDDED_MODEL, "--pretrained", str(path)])
    assert str(path) in line and CHECKPOINTS[kind] in line
    assert "does not fit" not in line


# ----------------------------------------------------------------------------------------------
# 3. devices


def test_unknown_device_option_lists_the_valid_ones(folder, tmp_path, capsys):
    line = error_line(capsys, extract_argv(f"imagefolder:{folder}", tmp_path, "--device", "tpu"))
    assert "--device" in line and "'tpu'" in line and "cuda:N" in line and "mps" in line


def test_unknown_device_in_a_grid_is_a_grid_error(tmp_path):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"sweeps": [{"models": [{"name": EMBEDDED_MODEL}],
                                            "datasets": ["world/color"]}],
                                "extract": {"device": "tpu"}}))
    with pytest.raises(GridError, match=r"extract.*device.*'tpu'") as exc:
        load_grid(str(path))
    assert len(str(exc.value).splitlines()) == 1


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1", "cpu"])
def test_valid_device_strings_are_accepted(device):
    assert ExtractParams(device=device).device == device


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_says_which_devices_exist(tmp_path, capsys):
    checkpoint = tmp_path / "tiny.pt"
    torch.save(load_model(EMBEDDED_MODEL, None, device="cpu").model.state_dict(), checkpoint)
    folder = write_image_folder(tmp_path / "imgs", ["ant", "bee"], per_class=10)
    for device in ("cuda", "cuda:1"):
        argv = extract_argv(f"imagefolder:{folder}", tmp_path / "stores", "--pretrained",
                            str(checkpoint), "--device", device)
        line = error_line(capsys, argv)
        assert f"'{device}'" in line and "CUDA is not available" in line and "cpu" in line
        assert "checkpoint" not in line


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_beyond_the_device_count():
    n = torch.cuda.device_count()
    with pytest.raises(ResidualError, match=f"cuda:{n}.*{n} CUDA device"):
        load_model(EMBEDDED_MODEL, None, device=f"cuda:{n}")


# ----------------------------------------------------------------------------------------------
# 4. a store root that is a file


def test_store_root_that_is_a_file(folder, tmp_path, capsys):
    root = tmp_path / "stores.txt"
    root.write_text("a file, not a folder")
    line = error_line(capsys, extract_argv(f"imagefolder:{folder}", root))
    assert str(root) in line and "--store-root" in line
    line = error_line(capsys, extract_argv(f"imagefolder:{folder}", root / "below"))
    assert str(root) in line
    assert root.read_text() == "a file, not a folder"


# ----------------------------------------------------------------------------------------------
# 5. a grid file that is not text


def test_binary_grid_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "grid.json"
    path.write_bytes(b"\x80" + np.random.default_rng(0).bytes(512))
    line = error_line(capsys, ["run", "--grid", str(path)])
    assert str(path) in line and "UTF-8" in line
    with pytest.raises(GridError):
        load_grid(str(path))
