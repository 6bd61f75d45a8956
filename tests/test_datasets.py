"""Dataset registry, local loading and splits, on small folders in the torchvision layouts."""

import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from builders import write_cifar, write_idx
from residual_core import datasets as rds
from residual_core.datasets import (
    PAPER_DATASETS,
    SPLITS,
    DatasetInfo,
    dataset_info,
    list_datasets,
    load_dataset,
    register_dataset,
    registry,
    split_80_10_10,
    stratified_split,
)
from residual_core.errors import DatasetNotFoundError, ResidualError

# ----------------------------------------------------------------------------------------------
# helpers


def _colour(label: int, i: int) -> tuple[int, int, int]:
    """A colour that encodes (class, sample) so that a decoded image tells where it came from."""
    return (40 * label + 5, 3 * i, 200)


def _write_class_folders(root, classes, per_class, ext="png"):
    """``root/<class>/<class>_<i>.<ext>`` images of 8x8 pixels in the colour _colour(label, i)."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), _colour(label, i)).save(root / name / f"{name}_{i:03d}.{ext}")


def _all_splits(name, **kwargs):
    return {s: load_dataset(name, s, **kwargs) for s in SPLITS}


def _assert_partition(splits, n):
    """Splits are disjoint and together cover positions 0..n-1 of one source."""
    idx = [splits[s].indices for s in SPLITS]
    joined = np.concatenate(idx)
    assert len(joined) == len(set(joined.tolist())) == n
    assert set(joined.tolist()) == set(range(n))
    for a in idx:
        assert a.dtype == np.int64 and np.all(np.diff(a) > 0)  # sorted, unique


def _assert_stratified(part_labels, all_labels, tol):
    n_classes = int(all_labels.max()) + 1
    whole = np.bincount(all_labels, minlength=n_classes) / len(all_labels)
    part = np.bincount(part_labels, minlength=n_classes) / len(part_labels)
    assert np.abs(part - whole).max() <= tol


# ----------------------------------------------------------------------------------------------
# (a) imagefolder:PATH


CLASSES = ["cat", "dog", "zebra"]


@pytest.fixture
def folder_tree(tmp_path):
    root = tmp_path / "tree"
    _write_class_folders(root, CLASSES, per_class=20)
    return root


def test_imagefolder_labels_splits_and_reproducibility(folder_tree):
    name = f"imagefolder:{folder_tree}"
    info = dataset_info(name)
    assert info.classnames == CLASSES and info.num_classes == 3
    assert all("{}" in t for t in info.templates)

    splits = _all_splits(name)
    assert {s: len(d) for s, d in splits.items()} == {"train": 48, "val": 6, "test": 6}
    _assert_partition(splits, 60)
    all_labels = np.concatenate([d.labels for d in splits.values()])
    for d in splits.values():
        assert d.info == info and d.labels.dtype == np.int64
        # exact stratification: every class in proportion 1/3 in every split
        np.testing.assert_array_equal(np.bincount(d.labels), [len(d) // 3] * 3)
        _assert_stratified(d.labels, all_labels, tol=0.0)
        # labels agree with the folder each image came from, and with its pixels
        for i in range(len(d)):
            image, label = d[i]
            assert label == d.labels[i]
            assert Path(d.source.paths[d.indices[i]]).parent.name == CLASSES[label]
            assert image.mode == "RGB" and image.getpixel((0, 0))[0] == _colour(label, 0)[0]

    again = _all_splits(name)
    for s in SPLITS:
        np.testing.assert_array_equal(splits[s].indices, again[s].indices)
        np.testing.assert_array_equal(splits[s].labels, again[s].labels)


def test_imagefolder_train_test_layout_and_transform(tmp_path):
    _write_class_folders(tmp_path / "train", CLASSES, per_class=10)
    _write_class_folders(tmp_path / "test", ["dog", "zebra"], per_class=3)  # a subset of classes
    name = f"imagefolder:{tmp_path}"
    assert dataset_info(name).classnames == CLASSES

    to_tensor = lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1)  # noqa: E731
    test = load_dataset(name, "test", transform=to_tensor)
    np.testing.assert_array_equal(test.labels, [1, 1, 1, 2, 2, 2])  # mapped by folder name
    image, label = test[4]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 8, 8) and label == 2
    assert image[0, 0, 0].item() == _colour(1, 1)[0]  # zebra_001, 2nd folder written in test/

    train, val = load_dataset(name, "train"), load_dataset(name, "val")
    assert (len(train), len(val)) == (27, 3)  # val = 10% of train/, one per class
    assert np.bincount(val.labels).tolist() == [1, 1, 1]
    assert not set(train.indices.tolist()) & set(val.indices.tolist())

    (tmp_path / "test" / "horse").mkdir()  # a test class unknown to train/: refused
    with pytest.raises(ResidualError, match="horse"):
        load_dataset(name, "test")


def test_stratified_split_is_pinned():
    """Golden values: the seed-42 split must not change between runs, processes or versions."""
    labels = np.repeat(np.arange(3), 10)
    kept, carved = stratified_split(labels, 0.2)
    np.testing.assert_array_equal(carved, [3, 6, 12, 16, 21, 24])
    assert len(kept) == 24 and not set(kept.tolist()) & set(carved.tolist())
    parts = split_80_10_10(np.repeat(np.arange(4), 25))
    assert [len(parts[s]) for s in SPLITS] == [80, 10, 10]
    with pytest.raises(ResidualError, match="stratified"):
        stratified_split(np.array([0, 1, 2]), 0.1)  # one sample per class cannot be stratified


# ----------------------------------------------------------------------------------------------
# (b) CIFAR in torchvision's on-disk format


@pytest.fixture
def cifar10_root(tmp_path):
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = write_cifar(
        tmp_path, "cifar-10-batches-py", files, "labels", "batches.meta", "label_names",
        n_classes=10, per_file=[40] * 5 + [20],
    )
    return tmp_path, written


def test_cifar10_round_trip_and_val_split(cifar10_root):
    root, written = cifar10_root
    train_data = np.vstack([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)])

    splits = _all_splits("cifar10", data_root=root)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (180, 20, 20)
    # val is 10% of the official train split, two per class, disjoint from train
    assert np.bincount(splits["val"].labels).tolist() == [2] * 10
    both = np.concatenate([splits["train"].indices, splits["val"].indices])
    assert sorted(both.tolist()) == list(range(200))
    _assert_stratified(splits["train"].labels, train_labels, tol=0.01)

    def hwc(row):  # rows are channel-major 3x32x32
        return row.reshape(3, 32, 32).transpose(1, 2, 0)

    for split, data, labels in [
        ("train", train_data, train_labels),
        ("val", train_data, train_labels),
        ("test", *map(np.asarray, written["test_batch"])),
    ]:
        d = splits[split]
        np.testing.assert_array_equal(d.labels, labels[d.indices])
        for i in (0, len(d) // 2, len(d) - 1):
            image, label = d[i]
            assert label == labels[d.indices[i]]
            np.testing.assert_array_equal(np.asarray(image), hwc(data[d.indices[i]]))


def test_cifar_reader_matches_torchvision(cifar10_root, monkeypatch):
    """Our CIFAR reader (torchvision md5-checks the real files) decodes as torchvision does."""
    import torchvision.datasets.cifar as tv_cifar

    root, _ = cifar10_root
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # this test only
    for train in (True, False):
        ours = rds.CifarSource(root, tv_cifar.CIFAR10, train=train)
        theirs = tv_cifar.CIFAR10(str(root), train=train)
        assert ours.classes == theirs.classes
        np.testing.assert_array_equal(ours.targets, theirs.targets)
        for i in (0, 7, len(theirs) - 1):
            np.testing.assert_array_equal(np.asarray(ours[i][0]), np.asarray(theirs[i][0]))


def test_cifar100_fine_labels(tmp_path):
    write_cifar(
        tmp_path, "cifar-100-python", ["train", "test"], "fine_labels", "meta", "fine_label_names",
        n_classes=100, per_file=[1000, 100],
    )
    val = load_dataset("cifar100", "val", data_root=tmp_path)
    assert len(val) == 100 and np.bincount(val.labels).tolist() == [1] * 100
    assert val.info.num_classes == 100 and val.info.classnames[0] == "apple"


# ----------------------------------------------------------------------------------------------
# Other torchvision layouts: MNIST (grayscale), EuroSAT (labels mapped by name), RESISC45


def test_mnist_layout_and_rgb_conversion(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 100), ("t10k", 10)):
        labels = np.arange(n) % 10
        images = np.broadcast_to((labels * 20)[:, None, None], (n, 28, 28))
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    val = load_dataset("mnist", "val", data_root=tmp_path)
    assert len(val) == 10 and len(load_dataset("mnist", "test", data_root=tmp_path)) == 10
    image, label = val[0]
    assert image.mode == "RGB" and image.getpixel((3, 3)) == (label * 20,) * 3


def test_eurosat_labels_follow_the_prompt_file(tmp_path):
    folders = json.loads(
        (resources.files("residual_core") / "resources" / "zeroshot_prompts.json").read_text()
    )["eurosat"]["source_folder_names"]
    _write_class_folders(tmp_path / "eurosat" / "2750", folders, per_class=10, ext="jpg")
    info = dataset_info("eurosat")
    splits = _all_splits("eurosat", data_root=tmp_path)
    assert [len(splits[s]) for s in SPLITS] == [80, 10, 10]
    _assert_partition(splits, 100)
    d = splits["test"]
    for i in range(len(d)):
        folder = Path(d.source.samples[d.indices[i]][0]).parent.name
        assert d.labels[i] == folders.index(folder)  # prompt-file order, not torchvision's
    highway = d.labels[[Path(d.source.samples[j][0]).parent.name == "Highway" for j in d.indices]]
    assert {info.classnames[k] for k in highway} == {"highway or road"}


def test_resisc45_split_lists(tmp_path):
    base = tmp_path / "resisc45"
    _write_class_folders(base / "NWPU-RESISC45", ["airplane", "baseball_diamond"], 10, ext="jpg")
    info = dataset_info("resisc45")
    no_lists = _all_splits("resisc45", data_root=tmp_path)  # no split lists: 80/10/10
    assert [len(no_lists[s]) for s in SPLITS] == [16, 2, 2]
    train_classes = {info.classnames[k] for k in no_lists["train"].labels}
    assert train_classes == {"airplane", "baseball diamond"}  # folder "_" matched to " "

    names = {s: [] for s in SPLITS}
    for c in ("airplane", "baseball_diamond"):
        for i in range(10):
            names[SPLITS[min(i // 4, 2)]].append(f"{c}_{i:03d}.jpg")  # 4 train, 4 val, 2 test
    for s in SPLITS:
        (base / f"resisc45-{s}.txt").write_text("\n".join(names[s]) + "\n")
    listed = _all_splits("resisc45", data_root=tmp_path)
    _assert_partition(listed, 20)
    for s in SPLITS:
        got = sorted(Path(listed[s].source.paths[j]).name for j in listed[s].indices)
        assert got == sorted(names[s])


# ----------------------------------------------------------------------------------------------
# (c) missing data, (d) unknown names


def test_missing_data_root_says_where_and_how(tmp_path):
    missing = tmp_path / "no-such-root"
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10", "train", data_root=missing)
    msg = str(e.value)
    assert str(missing / "cifar-10-batches-py") in msg
    assert "torchvision.datasets.CIFAR10" in msg and "download=True" in msg
    assert not missing.exists()  # nothing was downloaded or created

    with pytest.raises(DatasetNotFoundError, match="no longer download"):
        load_dataset("stanford_cars", "test", data_root=missing)
    with pytest.raises(DatasetNotFoundError, match="no-such-root"):
        load_dataset(f"imagefolder:{missing}", "train")


def test_unknown_names_and_splits():
    with pytest.raises(DatasetNotFoundError) as e:
        dataset_info("cifar_10")
    assert "Did you mean 'cifar10'" in str(e.value) and "stanford_cars" in str(e.value)
    with pytest.raises(DatasetNotFoundError):
        load_dataset("not-a-dataset", "train")
    with pytest.raises(ResidualError, match="unknown split 'training'.*train, val, test"):
        load_dataset("cifar10", "training")


# ----------------------------------------------------------------------------------------------
# (e) prompt file, registry


def test_world_tasks_are_built_in():
    import subprocess
    import sys

    code = ("from residual_core.datasets import load_dataset; "
            "print(len(load_dataset('world/size', 'val')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "600"


def test_prompt_file_covers_the_paper_datasets():
    assert set(PAPER_DATASETS) | {"imagenet"} <= set(list_datasets())
    for name in (*PAPER_DATASETS, "imagenet"):
        info = dataset_info(name)
        assert info.name == name and info.num_classes == len(info.classnames) > 1
        assert info.templates and all("{}" in t for t in info.templates)
    assert dataset_info("cifar10").num_classes == 10
    assert dataset_info("imagenet").num_classes == 1000
    assert dataset_info("eurosat").classnames[0] == "highway or road"


def test_register_dataset_and_label_validation(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # registrations stay in this test
    images = torch.arange(12, dtype=torch.float32).reshape(12, 1, 1, 1)
    labels = np.arange(12) % 2

    def factory(split, data_root, download):  # a self-contained dataset ignores data_root
        pos = {"train": np.arange(8), "val": np.arange(8, 10), "test": np.arange(10, 12)}[split]
        return list(zip(images, labels)), labels[pos], pos

    info = DatasetInfo("toy", ["even", "odd"], ["a {}."])
    register_dataset("toy", factory, info)
    assert "toy" in list_datasets() and dataset_info("toy") == info
    test = load_dataset("toy", "test", data_root="/nonexistent")
    image, label = test[1]
    assert torch.equal(image, images[11]) and label == 1
    with pytest.raises(ResidualError, match="already registered"):
        register_dataset("toy", factory, info)

    register_dataset("toy3", lambda s, r, d: (None, np.array([0, 3]), np.arange(2)),
                     DatasetInfo("toy3", ["a", "b"], ["{}"]))
    with pytest.raises(ResidualError, match=r"labels \[3\] are outside its 2 classes"):
        load_dataset("toy3", "train")
    with pytest.raises(ResidualError, match="containing"):
        DatasetInfo("bad", ["a"], ["no placeholder"])


def test_imagefolder_options_file_names_classes_templates_and_splits(tmp_path):
    """``PATH/dataset.json``: prompt names per folder, templates, split fractions and seed;
    the file is part of the folder's content identity; bad files are one-line errors."""
    from builders import write_image_folder
    from residual_core.identity import parse_dataset

    folder = write_image_folder(tmp_path / "pets", ["cat_tabby", "dog", "golden_retriever"], 20,
                                size=8)
    name = f"imagefolder:{folder}"
    before = parse_dataset(name).content_identity()
    sizes = [len(rds.load_dataset(name, s)) for s in ("train", "val", "test")]
    assert sizes == [48, 6, 6] and rds.dataset_info(name).classnames[0] == "cat_tabby"
    options = {"classnames": {"cat_tabby": "tabby cat", "golden_retriever": "golden retriever"},
               "templates": ["a photo of a {}, a pet.", "a {}."], "val_fraction": 0.2,
               "test_fraction": 0.25, "seed": 7}
    (folder / "dataset.json").write_text(json.dumps(options))
    info = rds.dataset_info(name)
    assert info.classnames == ["tabby cat", "dog", "golden retriever"]
    assert info.templates == options["templates"]
    parts = {s: rds.load_dataset(name, s) for s in ("train", "val", "test")}
    assert [len(p) for p in parts.values()] == [33, 12, 15]  # 60 x (0.55, 0.2, 0.25)
    for p in parts.values():  # stratified, labels still by folder
        assert np.bincount(p.labels).tolist() == [len(p) // 3] * 3
    assert set().union(*(set(p.indices) for p in parts.values())) == set(range(60))
    assert parse_dataset(name).content_identity() != before  # stores become stale
    (folder / "dataset.json").write_text(json.dumps({**options, "seed": 8}))
    assert list(rds.load_dataset(name, "val").indices) != list(parts["val"].indices)

    for bad, says in (({"classes": []}, "classes: Extra inputs are not permitted"),
                      ({"classnames": ["a", "b"]}, "lists 2 names for 3 class folders"),
                      ({"classnames": {"cow": "a cow"}}, "names folders ['cow']"),
                      ({"templates": ["no slot"]}, "templates containing '{}'"),
                      ({"val_fraction": 0.6, "test_fraction": 0.5}, "leave room for train"),
                      ({"seed": "x"}, "seed: Input should be a valid integer")):
        (folder / "dataset.json").write_text(json.dumps(bad))
        with pytest.raises(ResidualError, match=re.escape(says)) as e:
            rds.load_dataset(name, "train")
        assert "\n" not in str(e.value)
    (folder / "dataset.json").write_text("{not json")
    with pytest.raises(ResidualError, match="cannot read .*dataset.json as JSON"):
        rds.dataset_info(name)


def test_a_bare_imagefolder_name_is_a_folder_under_the_data_root(tmp_path, monkeypatch):
    """``imagefolder:pets`` is ``<data root>/pets`` everywhere (API, grid files, the CLI),
    spelled with its absolute path so that every command and worker reads the same folder;
    ``imagefolder:./pets`` stays relative to the current directory."""
    from builders import write_image_folder
    from pipelines.cli import main
    from pipelines.grid import load_grid
    from residual_core.formats.feature_store import FeatureStore
    from residual_core.identity import EMBEDDED_MODEL, canonical_dataset
    from residual_core.layout import Layout

    data = tmp_path / "elsewhere"
    folder = write_image_folder(data / "pets", ["cat", "dog"], 10, size=8)
    monkeypatch.chdir(tmp_path)  # no ./pets here
    absolute = f"imagefolder:{folder.resolve()}"
    assert canonical_dataset("imagefolder:pets", data) == absolute
    for name in ("imagefolder:./pets", "imagefolder:~/pets", absolute, "cifar10",
                 "hf-dataset:org/name"):
        assert canonical_dataset(name, data) == name
    assert len(rds.load_dataset("imagefolder:pets", "train", data_root=data)) == 16
    with pytest.raises(DatasetNotFoundError, match="pets"):  # ./pets: the current directory
        rds.load_dataset("imagefolder:./pets", "train", data_root=data)

    grid = {"name": "pets", "sweeps": [{"models": [{"name": EMBEDDED_MODEL}],
                                        "datasets": ["imagefolder:pets"]}]}
    (cell,) = load_grid(grid, data_root=data).cells()
    assert cell.dataset == absolute
    monkeypatch.setenv("RESIDUAL_DATA_ROOT", str(tmp_path / "root"))  # the default data root
    (tmp_path / "root" / "datasets").mkdir(parents=True)
    (tmp_path / "root" / "datasets" / "pets").symlink_to(folder)
    (cell,) = load_grid(grid).cells()
    assert cell.dataset == absolute  # the link's target: one folder, one name

    store_root = tmp_path / "store"
    assert main(["extract", "--model", EMBEDDED_MODEL, "--dataset", "imagefolder:pets",
                 "--split", "train", "--data-root", str(data), "--store-root", str(store_root),
                 "--rows-per-chunk", "8", "--num-workers", "0", "--quiet"]) == 0
    (url,) = Layout.of(str(store_root)).feature_stores()
    assert FeatureStore.open(url).attrs["dataset"] == absolute
