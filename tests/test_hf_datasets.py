"""``hf-dataset:`` datasets: save_to_disk folders and the local Hub cache (offline), their splits,
columns, prompts and identity, a real extraction, and one-line errors for bad inputs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import datasets  # a project dependency: imported, never skipped

from PIL import Image  # noqa: E402

from residual_core.datasets import dataset_info, load_dataset  # noqa: E402
from residual_core.datasets.paper import _prompts  # noqa: E402
from residual_core.errors import DatasetNotFoundError, ResidualError, StoreError  # noqa: E402
from residual_core.identity import EMBEDDED_MODEL, parse_dataset  # noqa: E402

CLASSES = ["ant", "bee", "cow"]
DEFAULT = ["a photo of a {}."]


def images(n: int, seed: int, mode: str = "RGB") -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    shape = (24, 24, 3) if mode == "RGB" else (24, 24)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(n)]


def make(n: int, seed: int = 0, features: dict | None = None, columns: dict | None = None,
         mode: str = "RGB"):
    """A Dataset of ``n`` images, labels cycling through the classes (``seed``: the pixels)."""
    features = features or {"image": datasets.Image(),
                            "label": datasets.ClassLabel(names=CLASSES)}
    labels = [i % len(CLASSES) for i in range(n)]
    columns = columns or {"image": images(n, seed, mode), "label": labels}
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def save(obj, path: Path) -> Path:
    datasets.disable_progress_bars()
    obj.save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DatasetDict folder: train (60 rows) and test (15 rows, grayscale images)."""
    root = tmp_path_factory.mktemp("hf") / "saved"
    return save(datasets.DatasetDict(train=make(60), test=make(15, seed=1, mode="L")), root)


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt is recorded and refused."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(101, "Network is unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


# ----------------------------------------------------------------------------------------------
# save_to_disk folders


def test_saved_dataset_dict_splits_labels_and_classes(saved):
    name = f"hf-dataset:{saved}"
    info = dataset_info(name)
    assert info.classnames == CLASSES and info.templates == DEFAULT
    source_train = np.arange(60) % 3
    train, val, test = (load_dataset(name, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (54, 6, 15)  # val: a stratified 10% of train
    assert not set(train.indices) & set(val.indices)
    assert sorted([*train.indices, *val.indices]) == list(range(60))
    for part in (train, val):  # ids are row positions within the source split
        np.testing.assert_array_equal(part.labels, source_train[part.indices])
    assert np.bincount(val.labels).tolist() == [2, 2, 2]
    np.testing.assert_array_equal(test.indices, np.arange(15))
    np.testing.assert_array_equal(test.labels, np.arange(15) % 3)
    image, label = test[4]
    assert image.mode == "RGB" and image.size == (24, 24) and label == 1  # grayscale converted
    saved_rows = datasets.load_from_disk(str(saved))["train"]
    row = int(train.indices[7])
    assert np.array_equal(np.asarray(train[7][0]), np.asarray(saved_rows[row]["image"]))


def test_own_validation_split_and_a_single_split(tmp_path):
    with_val = save(datasets.DatasetDict(train=make(30), validation=make(9, 1), test=make(6, 2)),
                    tmp_path / "with_val")
    val = load_dataset(f"hf-dataset:{with_val}", "val")
    np.testing.assert_array_equal(val.indices, np.arange(9))
    assert len(load_dataset(f"hf-dataset:{with_val}", "train")) == 30  # nothing carved
    single = save(make(60), tmp_path / "single")  # a plain Dataset: drawn 80/10/10
    sizes = [len(load_dataset(f"hf-dataset:{single}", s)) for s in ("train", "val", "test")]
    assert sizes == [48, 6, 6]
    parts = [set(load_dataset(f"hf-dataset:{single}", s).indices) for s in ("train", "val", "test")]
    assert set().union(*parts) == set(range(60)) and sum(map(len, parts)) == 60


def test_val_carve_follows_the_authors_fraction_for_a_known_name(tmp_path):
    """svhn, dtd and stanford_cars carve 20% of train as val (the authors' split), others 10%."""
    for name, n_val in (("svhn", 12), ("stanford_cars", 12), ("cifar10", 6), ("mystuff", 6)):
        folder = save(datasets.DatasetDict(train=make(60), test=make(6, 1)), tmp_path / name)
        val, train = (load_dataset(f"hf-dataset:{folder}", s) for s in ("val", "train"))
        assert (len(val), len(train)) == (n_val, 60 - n_val), name
        assert np.bincount(val.labels).tolist() == [n_val // 3] * 3  # stratified


def test_templates_follow_a_known_dataset_name(tmp_path, saved):
    eurosat = save(make(30), tmp_path / "eurosat")
    assert dataset_info(f"hf-dataset:{eurosat}").templates == _prompts()["eurosat"]["templates"]
    assert dataset_info(f"hf-dataset:{eurosat}?templates=default").templates == DEFAULT
    assert (dataset_info(f"hf-dataset:{saved}?templates=gtsrb").templates
            == _prompts()["gtsrb"]["templates"])
    with pytest.raises(ResidualError, match="templates='nope'.*default or one of"):
        dataset_info(f"hf-dataset:{saved}?templates=nope")


def test_split_is_the_same_in_another_process(saved):
    name = f"hf-dataset:{saved}"
    code = ("import json, sys; from residual_core.datasets import load_dataset; "
            "print(json.dumps({s: load_dataset(sys.argv[1], s).indices.tolist() "
            "for s in ('train', 'val')}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, name], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    there = json.loads(out.strip().splitlines()[-1])
    for split in ("train", "val"):
        assert there[split] == load_dataset(name, split).indices.tolist()


def test_explicit_columns(tmp_path):
    two = make(30, features={"photo": datasets.Image(), "thumb": datasets.Image(),
                             "label": datasets.ClassLabel(names=CLASSES)},
               columns={"photo": images(30, 0), "thumb": images(30, 1, "L"),
                        "label": [i % 3 for i in range(30)]})
    folder = save(two, tmp_path / "two")
    with pytest.raises(ResidualError) as e:
        dataset_info(f"hf-dataset:{folder}")
    assert "2 Image columns (photo, thumb)" in str(e.value) and "?image=" in str(e.value)
    data = load_dataset(f"hf-dataset:{folder}?image=thumb&label=label", "test")
    expected = np.asarray(datasets.load_from_disk(str(folder))["thumb"][int(data.indices[0])])
    assert np.array_equal(np.asarray(data[0][0].convert("L")), expected)


# ----------------------------------------------------------------------------------------------
# the local Hub cache, offline


def write_hub_cache(cache: Path, repo: str, seed: int = 0, config: str = "default") -> Path:
    """What ``datasets.load_dataset(repo)`` leaves in the cache: ``<ns>___<name>/<config>/0.0.0/
    <hash>/`` with ``dataset_info.json`` and one Arrow stream file per split."""
    from datasets.arrow_writer import ArrowWriter

    namespace, name = repo.split("/")
    folder = cache / f"{namespace}___{name}" / config / "0.0.0" / f"hash{seed}"
    folder.mkdir(parents=True)
    features = make(1).features
    splits = datasets.SplitDict(dataset_name=name)
    for split, n in (("train", 30), ("test", 9), ("contrast", 9)):
        with ArrowWriter(features=features, path=str(folder / f"{name}-{split}.arrow")) as w:
            w.write_table(make(n, seed).data.table)
            w.finalize()
        splits.add(datasets.SplitInfo(split, num_examples=n, dataset_name=name))
    datasets.DatasetInfo(features=features, splits=splits, config_name=config,
                         dataset_name=name).write_to_directory(str(folder))
    return folder


def test_hub_id_is_read_from_the_cache_without_network(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as if online: still offline
    folder = write_hub_cache(tmp_path / "cache", "tanganke/eurosat")
    name = "hf-dataset:tanganke/eurosat"
    info = dataset_info(name)
    assert info.classnames == CLASSES  # the ClassLabel's names
    assert info.templates == _prompts()["eurosat"]["templates"]  # known by name
    sizes = [len(load_dataset(name, s)) for s in ("train", "val", "test")]
    assert sizes == [27, 3, 9]  # extra splits (contrast) are not used
    identity = parse_dataset(name).content_identity()
    assert set(identity["hf_fingerprints"]) == {"train", "test"} and identity["files"] == 3
    assert no_network == [] and datasets.config.HF_HUB_OFFLINE is False  # restored

    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("hf-dataset:tanganke/dtd", "train")
    msg = str(e.value)
    assert "\n" not in msg and "never downloads" in msg and "load_dataset('tanganke/dtd')" in msg
    assert no_network == []

    # a newer download (another hash folder) is another content: the stores become stale
    os.utime(folder, (1, 1))
    write_hub_cache(tmp_path / "cache", "tanganke/eurosat", seed=1)
    assert parse_dataset(name).content_identity() != identity

    write_hub_cache(tmp_path / "cache", "tanganke/eurosat", seed=2, config="rgb")
    with pytest.raises(DatasetNotFoundError) as e:
        dataset_info(name)
    assert "2 configurations of 'tanganke/eurosat' (default, rgb)" in one_line(e)
    assert "?config=NAME" in one_line(e)
    assert len(load_dataset(f"{name}?config=rgb", "test")) == 9
    assert no_network == []


# ----------------------------------------------------------------------------------------------
# a real extraction and the store's identity


def test_extract_writes_a_complete_store_that_a_resave_makes_stale(tmp_path):
    from residual_core.engines.extract import extract
    from residual_core.formats.feature_store import FeatureStore
    from residual_core.method.models import load_model
    from residual_core.stages.extract import Inputs, Params, is_current

    folder = save(datasets.DatasetDict(train=make(30), test=make(12, seed=1)), tmp_path / "ds")
    name = f"hf-dataset:{folder}"
    params = Params(batch_size=8, rows_per_chunk=8, num_workers=0, device="cpu")
    tiny = load_model(EMBEDDED_MODEL, None, device="cpu", seed=0)
    result = extract(EMBEDDED_MODEL, None, name, "test", params, store_root=tmp_path / "st",
                     loaded=tiny, progress=False)
    assert result.computed_chunks == result.total_chunks == 2
    store = FeatureStore.open(result.url)
    assert store.complete and store.pending_chunks().size == 0
    data = load_dataset(name, "test")
    np.testing.assert_array_equal(store.labels, data.labels)
    np.testing.assert_array_equal(store.indices, np.arange(12))
    assert store.classnames == CLASSES
    content = store.attrs["config"]["dataset_content"]
    assert set(content["hf_fingerprints"]) == {"train", "test"}

    inputs = Inputs(model=EMBEDDED_MODEL, dataset=name, split="test",
                    store_root=str(tmp_path / "st"))
    assert is_current(inputs, params)
    del data, store
    # the same labels and sizes, other pixels: saved again into the same folder
    save(datasets.DatasetDict(train=make(30), test=make(12, seed=2)), folder)
    assert not is_current(inputs, params)
    with pytest.raises(StoreError, match="dataset_content"):
        extract(EMBEDDED_MODEL, None, name, "test", params, store_root=tmp_path / "st",
                loaded=tiny, progress=False)


# ----------------------------------------------------------------------------------------------
# bad inputs: one line naming the fix


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.startswith("dataset "), msg
    return msg


def test_bad_folders_and_columns(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(f"hf-dataset:{tmp_path / 'missing'}", "train")
    assert "does not exist" in one_line(e) and "save_to_disk" in one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(f"hf-dataset:{tmp_path / 'empty'}", "train")
    assert "is not a folder written by Dataset.save_to_disk" in one_line(e)

    labels = [i % 3 for i in range(30)]
    no_image = save(make(30, features={"path": datasets.Value("string"),
                                       "label": datasets.ClassLabel(names=CLASSES)},
                         columns={"path": ["x.png"] * 30, "label": labels}), tmp_path / "a")
    with pytest.raises(ResidualError) as e:
        load_dataset(f"hf-dataset:{no_image}", "train")
    msg = one_line(e)
    assert "no Image column" in msg and "path (Value(string))" in msg and "cast_column" in msg

    no_label = save(make(30, features={"image": datasets.Image(), "label": datasets.Value("int64")},
                         columns={"image": images(30, 0), "label": labels}), tmp_path / "b")
    with pytest.raises(ResidualError) as e:
        load_dataset(f"hf-dataset:{no_label}", "train")
    msg = one_line(e)
    assert "no ClassLabel column" in msg and "class_encode_column" in msg
    with pytest.raises(ResidualError) as e:
        load_dataset(f"hf-dataset:{no_label}?label=label", "train")
    assert "column 'label' is a Value(int64), not an ClassLabel" in one_line(e)
    with pytest.raises(ResidualError) as e:
        load_dataset(f"hf-dataset:{no_label}?image=img", "train")
    assert "no column 'img'" in one_line(e) and "image (Image)" in one_line(e)

    two_labels = save(make(30, features={"image": datasets.Image(),
                                         "coarse": datasets.ClassLabel(names=["x", "y", "z"]),
                                         "fine": datasets.ClassLabel(names=CLASSES)},
                           columns={"image": images(30, 0), "coarse": labels, "fine": labels}),
                      tmp_path / "c")
    with pytest.raises(ResidualError) as e:
        load_dataset(f"hf-dataset:{two_labels}", "train")
    assert "2 ClassLabel columns (coarse, fine)" in one_line(e) and "?label=coarse" in one_line(e)
    assert dataset_info(f"hf-dataset:{two_labels}?label=fine").classnames == CLASSES

    odd_splits = save(datasets.DatasetDict(train=make(30), holdout=make(9)), tmp_path / "d")
    with pytest.raises(ResidualError) as e:
        load_dataset(f"hf-dataset:{odd_splits}", "train")
    assert "splits ['holdout', 'train']" in one_line(e)


@pytest.mark.parametrize("name, fragment", [
    ("hf-dataset:", "names no dataset"),
    ("hf-dataset:org/set?colour=red", "unknown option 'colour'"),
    ("hf-dataset:org/set?image", "option 'image' needs a value"),
    ("hf-dataset:org/set?image=a&image=b", "given twice"),
    ("hf-dataset:not a name", "neither a Hub id"),
    ("hf-dataset:/some/folder?config=x", "config= selects a configuration of a Hub dataset"),
])
def test_malformed_names(name, fragment):
    with pytest.raises(ResidualError) as e:
        parse_dataset(name)
    assert fragment in one_line(e)
    with pytest.raises(ResidualError, match="dataset "):  # refused before anything is read
        dataset_info(name)


def test_parse_hf_names():
    ref = parse_dataset("hf-dataset:tanganke/eurosat?image=img&config=full")
    assert ref.hf.path is None and ref.path is None and ref.is_files
    assert (ref.hf.source, ref.hf.image, ref.hf.label, ref.hf.config) == (
        "tanganke/eurosat", "img", None, "full")
    assert ref.hf.short_name == "eurosat"
    home = parse_dataset("hf-dataset:~/data/Stanford-Cars")
    assert home.path == Path("~/data/Stanford-Cars").expanduser() and home.hf.short_name == (
        "stanford_cars")
    assert parse_dataset("hf-dataset:./local").path == Path("local")
    assert parse_dataset("hf-dataset:a/b/c").path == Path("a/b/c")  # two slashes: a folder
