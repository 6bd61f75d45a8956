"""The paper datasets and ImageNet read from small copies in their real on-disk formats.

One data root holds every dataset as torchvision (and the official archives) lay it out: the
Stanford SVHN ``.mat`` files, GTSRB's ``.ppm`` folders and test CSV, DTD's split lists, the
Stanford Cars devkit ``.mat`` structs, SUN397's ``ClassName.txt`` and nested folders, ImageNet's
``meta.bin`` and wnid folders, and the CIFAR/MNIST/EuroSAT/RESISC45 layouts. Every class of the
prompt file is present with a few tiny images. The tests go through the public API only
(``dataset_info``/``load_dataset``) and compare with what the writers put on disk.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from builders import (
    pixel,
    sun397_path,
    write_cifar,
    write_dtd,
    write_gtsrb,
    write_image,
    write_imagenet,
    write_mnist,
    write_stanford_cars,
    write_sun397,
    write_svhn,
)
from residual_core import datasets as rds
from residual_core.datasets import (
    PAPER_DATASETS,
    SEED,
    SPLITS,
    dataset_info,
    load_dataset,
    paper,
    stratified_split,
)
from residual_core.errors import DatasetNotFoundError, ResidualError

NAMES = (*PAPER_DATASETS, "imagenet")

# Images per class in each official part of the fixture. Chosen so that every carve is exact:
# a 10% val (or 10% test) takes one image per class out of 10, a 20% val one out of 5.
PER_CLASS = {
    "cifar10": {"train": 10, "test": 2},
    "cifar100": {"train": 10, "test": 1},
    "mnist": {"train": 10, "test": 2},
    "svhn": {"train": 5, "test": 2},
    "gtsrb": {"train": 10, "test": 2},
    "dtd": {"train": 2, "val": 3, "test": 2},  # partition 1's list files
    "stanford_cars": {"train": 5, "test": 1},
    "imagenet": {"train": 5, "test": 1},
    "eurosat": {"all": 10},
    "resisc45": {"all": 10},
    "sun397": {"all": 10},
}

# The split protocol (datasets.py's docstring): the fraction of the official train part (DTD:
# of its train1 + val1 pool) carved as val; datasets without an official split are 80/10/10.
VAL_FRACTION = {"cifar10": 0.1, "cifar100": 0.1, "mnist": 0.1, "gtsrb": 0.1, "svhn": 0.2,
                "dtd": 0.2, "stanford_cars": 0.2, "imagenet": 0.2}


def _expected_per_class(name):
    """(train, val, test) images of each class: the protocol applied to PER_CLASS."""
    per = PER_CLASS[name]
    if "all" in per:
        tenth = round(0.1 * per["all"])
        return per["all"] - 2 * tenth, tenth, tenth
    pool = per["train"] + per.get("val", 0)
    val = round(VAL_FRACTION[name] * pool)
    return pool - val, val, per["test"]


def _classes(name):
    """The class list of the project's prompt file (what every fixture is built from)."""
    return list(paper._prompts()[name]["classes"])


def _write_folders(base: Path, folders, per_class, ext, fmt):
    """``base/<folder>/<folder>_<i>.<ext>``, the image of folder k coloured pixel(k, i)."""
    for label, folder in enumerate(folders):
        for i in range(per_class):
            write_image(base / folder / f"{folder}_{i:03d}.{ext}", fmt, label, i)


def _write_all(root: Path) -> dict:
    """Every dataset under one data root; returns what each writer reports (the ground truth)."""
    w = {}
    files10 = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    w["cifar10"] = write_cifar(root, "cifar-10-batches-py", files10, "labels", "batches.meta",
                               "label_names", n_classes=10, per_file=[20] * 5 + [20])
    w["cifar100"] = write_cifar(root, "cifar-100-python", ["train", "test"], "fine_labels",
                                "meta", "fine_label_names", n_classes=100, per_file=[1000, 100])
    w["mnist"] = write_mnist(root, PER_CLASS["mnist"])
    w["svhn"] = write_svhn(root, PER_CLASS["svhn"])
    w["gtsrb"] = write_gtsrb(root, len(_classes("gtsrb")), PER_CLASS["gtsrb"])
    w["dtd"] = write_dtd(root, _classes("dtd"), PER_CLASS["dtd"])
    w["stanford_cars"] = write_stanford_cars(root, _classes("stanford_cars"),
                                             PER_CLASS["stanford_cars"])
    w["sun397"] = write_sun397(root, _classes("sun397"), PER_CLASS["sun397"]["all"])
    w["imagenet"] = write_imagenet(root, _classes("imagenet"), PER_CLASS["imagenet"])
    eurosat_folders = paper._prompts()["eurosat"]["source_folder_names"]
    _write_folders(root / "eurosat" / "2750", eurosat_folders, 10, "jpg", "JPEG")
    resisc_folders = [c.replace(" ", "_") for c in _classes("resisc45")]
    _write_folders(root / "resisc45" / "NWPU-RESISC45", resisc_folders, 10, "jpg", "JPEG")
    return w


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(data root, writers' ground truth) of the whole fixture, written once for this module."""
    root = tmp_path_factory.mktemp("formats")
    return root, _write_all(root)


# ----------------------------------------------------------------------------------------------
# ground truth from the fixture (never from the loader)


def _source_paths(source):
    """File of each source position, or None for array-backed sources (CIFAR, MNIST, SVHN)."""
    if hasattr(source, "paths"):
        return list(source.paths)
    for attr in ("_samples", "samples"):
        if hasattr(source, attr):
            return [p for p, _ in getattr(source, attr)]
    return None


def _expected_labels(name, part, paths, root, w):
    """Label of each position of official part ``part`` as the fixture wrote it."""
    classes = _classes(name)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if part == "train" else ["test_batch"]
        return np.concatenate([w[name][f][1] for f in files])
    if name == "cifar100":
        return np.asarray(w[name][part][1])
    if name == "mnist":
        return w[name][part]
    if name == "svhn":  # digits; the prompt class of digit d is "d" (0 was stored as 10)
        return np.asarray([classes.index(str(d)) for d in w[name][part][1]])
    if name == "gtsrb":
        if part == "test":
            return np.asarray(w[name]["test"])
        return np.asarray([int(Path(p).parent.name) for p in paths])  # folder number = class id
    if name == "stanford_cars":
        return np.asarray(w[name][part])
    if name == "imagenet":
        return np.asarray([w[name].index(Path(p).parent.name) for p in paths])
    if name == "eurosat":
        folders = paper._prompts()["eurosat"]["source_folder_names"]
        return np.asarray([folders.index(Path(p).parent.name) for p in paths])
    if name == "resisc45":
        return np.asarray([classes.index(Path(p).parent.name.replace("_", " ")) for p in paths])
    if name == "dtd":
        return np.asarray([classes.index(Path(p).parent.name) for p in paths])
    if name == "sun397":
        base = root / "SUN397"
        return np.asarray([classes.index(w[name][Path(p).relative_to(base).as_posix()])
                           for p in paths])
    raise AssertionError(name)


def _part(name, split):
    if name in ("eurosat", "resisc45", "sun397"):
        return "all"
    return "test" if split == "test" else "train"


# ----------------------------------------------------------------------------------------------
# every dataset: classes, labels, split sizes, disjointness


@pytest.mark.parametrize("name", NAMES)
def test_classes_labels_and_splits(world, name):
    root, w = world
    info = dataset_info(name)
    classes = _classes(name)
    assert info.classnames == classes and info.num_classes == len(classes)

    splits = {s: load_dataset(name, s, data_root=root) for s in SPLITS}
    for split, d in splits.items():
        per_class = _expected_per_class(name)[SPLITS.index(split)]
        # every class present, in the expected number: the protocol applied to the fixture
        np.testing.assert_array_equal(np.bincount(d.labels, minlength=len(classes)),
                                      [per_class] * len(classes))
        assert len(d) == per_class * len(classes)
        assert d.indices.dtype == np.int64 and np.all(np.diff(d.indices) > 0)
        # labels are what the fixture wrote for these samples, mapped to the prompt order
        paths = _source_paths(d.source)
        truth = _expected_labels(name, _part(name, split), paths, root, w)
        np.testing.assert_array_equal(d.labels, truth[d.indices])
        # the image decodes and is the one the fixture wrote for that sample
        for i in (0, len(d) - 1):
            image, label = d[i]
            assert image.mode == "RGB" and label == d.labels[i]
            if paths is not None:
                assert abs(image.getpixel((4, 4))[0] - pixel(label, 0)[0]) <= 4
            elif name == "mnist":  # grayscale, written as 20 * digit
                assert image.getpixel((4, 4)) == (20 * label,) * 3

    # disjoint: train and val share one source, test is its own part (or a third slice of it)
    train, val, test = (set(splits[s].indices.tolist()) for s in SPLITS)
    assert not train & val
    if _part(name, "test") == "all":
        assert not (train | val) & test
        assert len(train | val | test) == len(_source_paths(splits["test"].source))
    else:
        assert len(train | val) == len(classes) * sum(_expected_per_class(name)[:2])
        assert sorted(test) == list(range(len(test)))  # the whole official test part


def test_svhn_pixels_and_digit_zero(world):
    """Images come out of the (32, 32, 3, N) array unchanged; digit 0 (stored 10) is label 0."""
    root, w = world
    images, digits = w["svhn"]["test"]
    test = load_dataset("svhn", "test", data_root=root)
    np.testing.assert_array_equal(test.labels, digits)  # classes "0".."9": label = digit
    assert (digits == 0).sum() == PER_CLASS["svhn"]["test"] and 10 not in test.labels
    for i in (0, 7, len(test) - 1):
        np.testing.assert_array_equal(np.asarray(test[i][0]), images[test.indices[i]])


def test_svhn_reader_matches_torchvision(world, monkeypatch):
    """Our SVHN reader (torchvision md5-checks the real files) decodes as torchvision does."""
    import torchvision.datasets.svhn as tv_svhn

    root, _ = world
    monkeypatch.setattr(tv_svhn, "check_integrity", lambda *a, **k: True)  # this test only
    for part in ("train", "test"):
        ours = rds.SvhnSource(root / "svhn", part)
        theirs = tv_svhn.SVHN(str(root / "svhn"), split=part)
        np.testing.assert_array_equal(ours.labels, theirs.labels)
        for i in (0, 3, len(theirs) - 1):
            np.testing.assert_array_equal(np.asarray(ours[i][0]), np.asarray(theirs[i][0]))


def test_sun397_classname_order_is_mapped_by_name(world):
    """ClassName.txt is sorted by path, which is not the prompt order: labels follow names."""
    root, _ = world
    classes = _classes("sun397")
    by_path = sorted(classes, key=sun397_path)
    assert by_path != classes  # the fixture does exercise the remapping
    test = load_dataset("sun397", "test", data_root=root)
    for i in range(len(test)):
        rel = Path(test.source.paths[test.indices[i]]).relative_to(root / "SUN397").parent
        assert f"/{rel.as_posix()}" == sun397_path(classes[test.labels[i]])
    nested = [c for c in classes if sun397_path(c).count("/") == 3]
    assert nested and set(nested) <= {classes[k] for k in test.labels}  # /a/<class>/<sub>/


def test_dtd_authors_protocol(world):
    """DTD: val is a stratified 20% (seed 42) of partition 1's train1 + val1 pool, train the
    rest of it, test is test1; no other partition is read."""
    root, w = world
    lists = w["dtd"]
    base = root / "dtd" / "dtd" / "images"
    splits = {s: load_dataset("dtd", s, data_root=root) for s in SPLITS}

    def files(d):
        return [Path(d.source.paths[j]).relative_to(base).as_posix() for j in d.indices]

    pool = lists["train"] + lists["val"]
    assert sorted(files(splits["train"]) + files(splits["val"])) == sorted(pool)
    assert sorted(files(splits["test"])) == sorted(lists["test"])
    classes = _classes("dtd")
    pool_labels = np.asarray([classes.index(line.split("/")[0]) for line in pool])
    kept, carved = stratified_split(pool_labels, 0.2, SEED)
    np.testing.assert_array_equal(splits["val"].indices, carved)
    np.testing.assert_array_equal(splits["train"].indices, kept)
    assert len(splits["val"]) == round(0.2 * len(pool))


def test_sample_ids_follow_a_filesystem_independent_order(world):
    """Positions (the stable ids) are sorted paths for folder layouts, and the order of the
    official list/CSV/annotation file otherwise, never the order a directory listing gives."""
    root, w = world

    def paths(name, split):
        return _source_paths(load_dataset(name, split, data_root=root).source)

    for name in ("eurosat", "resisc45", "sun397", "imagenet"):
        for split in ("train", "test"):
            p = paths(name, split)
            assert p == sorted(p), name
    gtsrb_train = paths("gtsrb", "train")
    assert gtsrb_train == sorted(gtsrb_train)
    csv = (root / "gtsrb" / "GT-final_test.csv").read_text().splitlines()[1:]
    assert [Path(p).name for p in paths("gtsrb", "test")] == [r.split(";")[0] for r in csv]
    cars = [Path(p).name for p in paths("stanford_cars", "train")]
    assert cars == [f"{j + 1:05d}.jpg" for j in range(len(cars))]  # annotation order
    dtd_lists = w["dtd"]
    dtd = [Path(p).relative_to(root / "dtd" / "dtd" / "images").as_posix()
           for p in paths("dtd", "train")]
    assert dtd == dtd_lists["train"] + dtd_lists["val"]


_CHILD = """
import json, sys
from pathlib import Path
from residual_core.datasets import SPLITS, load_dataset
root = Path(sys.argv[1])
out = {}
for name in sys.argv[2:]:
    for split in SPLITS:
        d = load_dataset(name, split, data_root=root)
        src = d.source
        paths = (list(src.paths) if hasattr(src, "paths") else
                 [p for p, _ in getattr(src, "_samples", getattr(src, "samples", []))])
        ids = [str(Path(paths[j]).relative_to(root)) if paths else int(j) for j in d.indices]
        out[f"{name}/{split}"] = [d.indices.tolist(), d.labels.tolist(), ids]
print(json.dumps(out))
"""


def test_splits_are_the_same_in_another_process(world):
    """A fresh interpreter (another hash seed) draws the same ids, labels and files."""
    root, _ = world
    env = {**os.environ, "PYTHONHASHSEED": "12345",
           "PYTHONPATH": os.pathsep.join([str(Path(rds.__file__).parents[2]),
                                          os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(root), *NAMES], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    theirs = json.loads(out.stdout)
    for name in NAMES:
        for split in SPLITS:
            d = load_dataset(name, split, data_root=root)
            paths = _source_paths(d.source)
            ids = [str(Path(paths[j]).relative_to(root)) if paths else int(j) for j in d.indices]
            assert theirs[f"{name}/{split}"] == [d.indices.tolist(), d.labels.tolist(), ids], \
                (name, split)


# ----------------------------------------------------------------------------------------------
# wrong layouts: one-line errors that say what is expected where


def _cli_options() -> set[str]:
    from pipelines.cli import build_parser

    opts: set[str] = set()

    def walk(parser):
        for action in parser._actions:
            opts.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    return opts


def _assert_names_the_fix(err, *expected):
    """One line, every expected fragment (file names, the folder) in it, and no option that the
    CLI does not have."""
    msg = str(err.value)
    assert "\n" not in msg
    for fragment in expected:
        assert str(fragment) in msg, (fragment, msg)
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", msg))
    assert flags <= _cli_options(), flags


def test_svhn_without_mat_files(tmp_path):
    (tmp_path / "svhn").mkdir()
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("svhn", "train", data_root=tmp_path)
    _assert_names_the_fix(e, "train_32x32.mat", "test_32x32.mat", tmp_path / "svhn",
                          "torchvision.datasets.SVHN", "download=True")
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(ResidualError) as e:
        load_dataset("svhn", "test", data_root=tmp_path)
    _assert_names_the_fix(e, "test_32x32.mat", "not a readable SVHN .mat file")


def test_gtsrb_test_images_without_the_csv(world, tmp_path):
    root, _ = world
    shutil.copytree(root / "gtsrb", tmp_path / "gtsrb")
    (tmp_path / "gtsrb" / "GT-final_test.csv").unlink()
    assert len(load_dataset("gtsrb", "train", data_root=tmp_path)) > 0  # train needs no CSV
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("gtsrb", "test", data_root=tmp_path)
    _assert_names_the_fix(e, "GT-final_test.csv", "GTSRB/Final_Test/Images", tmp_path / "gtsrb")


def test_sun397_without_classname_txt(tmp_path):
    write_image(tmp_path / "SUN397" / "a" / "abbey" / "sun_aaa.jpg", "JPEG", 0, 0)
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("sun397", "val", data_root=tmp_path)
    _assert_names_the_fix(e, "ClassName.txt", tmp_path / "SUN397")


def test_imagenet_without_meta_bin_or_devkit(tmp_path):
    write_image(tmp_path / "imagenet" / "train" / "n01440764" / "x.JPEG", "JPEG", 0, 0)
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("imagenet", "train", data_root=tmp_path)
    _assert_names_the_fix(e, "meta.bin", "ILSVRC2012_devkit_t12.tar.gz", tmp_path / "imagenet")
    assert "download=True" not in str(e.value)  # torchvision cannot download ImageNet


def test_dtd_and_cars_missing_lists(world, tmp_path):
    root, _ = world
    shutil.copytree(root / "dtd", tmp_path / "dtd")
    (tmp_path / "dtd" / "dtd" / "labels" / "val1.txt").unlink()
    assert len(load_dataset("dtd", "test", data_root=tmp_path)) > 0
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("dtd", "train", data_root=tmp_path)
    _assert_names_the_fix(e, "val1.txt", tmp_path / "dtd" / "dtd")

    shutil.copytree(root / "stanford_cars", tmp_path / "stanford_cars")
    (tmp_path / "stanford_cars" / "cars_test_annos_withlabels.mat").unlink()
    assert len(load_dataset("stanford_cars", "val", data_root=tmp_path)) > 0
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("stanford_cars", "test", data_root=tmp_path)
    _assert_names_the_fix(e, "cars_test_annos_withlabels.mat", tmp_path / "stanford_cars")
    assert "download=True" not in str(e.value)


@pytest.mark.parametrize("name", NAMES)
def test_missing_root_errors_are_one_line_without_unknown_options(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(name, "test", data_root=tmp_path / "nothing-here")
    _assert_names_the_fix(e, tmp_path / "nothing-here")


def test_gtsrb_csv_without_class_ids(world, tmp_path):
    """The test images archive's own GT-final_test.test.csv has no ClassId: say which file."""
    root, _ = world
    shutil.copytree(root / "gtsrb", tmp_path / "gtsrb")
    csv = tmp_path / "gtsrb" / "GT-final_test.csv"
    rows = [";".join(r.split(";")[:-1]) for r in csv.read_text().splitlines()]
    csv.write_text("\n".join(rows) + "\n")
    with pytest.raises(ResidualError) as e:
        load_dataset("gtsrb", "test", data_root=tmp_path)
    _assert_names_the_fix(e, csv, "ClassId", "GTSRB_Final_Test_GT.zip")


def test_sun397_folder_not_in_classname_txt(world, tmp_path):
    root, _ = world
    shutil.copytree(root / "SUN397", tmp_path / "SUN397")
    write_image(tmp_path / "SUN397" / "z" / "zzz_not_a_class" / "sun_q.jpg", "JPEG", 0, 0)
    with pytest.raises(ResidualError) as e:
        load_dataset("sun397", "train", data_root=tmp_path)
    _assert_names_the_fix(e, "zzz_not_a_class", "ClassName.txt")


def test_imagenet_val_not_sorted_or_unknown_wnid(world, tmp_path):
    root, _ = world
    base = tmp_path / "imagenet"
    base.mkdir()
    shutil.copy(root / "imagenet" / "meta.bin", base / "meta.bin")
    write_image(base / "val" / "ILSVRC2012_val_00000001.JPEG", "JPEG", 0, 0)  # flat, by hand
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("imagenet", "test", data_root=tmp_path)
    _assert_names_the_fix(e, base / "val", "<wnid>", "ILSVRC2012_img_val.tar")

    shutil.copytree(root / "imagenet" / "train", base / "train")
    write_image(base / "train" / "n99999999" / "x.JPEG", "JPEG", 0, 0)
    with pytest.raises(ResidualError) as e:
        load_dataset("imagenet", "val", data_root=tmp_path)
    _assert_names_the_fix(e, base / "train" / "n99999999", "meta.bin")


def test_stanford_cars_labels_follow_meta_names(tmp_path):
    """Labels index cars_meta.mat's class_names; a meta file in another order is mapped by name,
    one with names that are not the prompt file's is refused in one line."""
    import scipy.io

    classes = _classes("stanford_cars")
    permuted = classes[::-1]
    written = write_stanford_cars(tmp_path, permuted, {"train": 5, "test": 1})
    test = load_dataset("stanford_cars", "test", data_root=tmp_path)
    expected = [classes.index(permuted[k]) for k in written["test"]]
    np.testing.assert_array_equal(test.labels, expected)

    meta = tmp_path / "stanford_cars" / "devkit" / "cars_meta.mat"
    wrong = np.array(["Not A Car 1999"] + permuted[1:], dtype=object).reshape(1, -1)
    scipy.io.savemat(meta, {"class_names": wrong})
    with pytest.raises(ResidualError) as e:
        load_dataset("stanford_cars", "test", data_root=tmp_path)
    _assert_names_the_fix(e, "Not A Car 1999", meta)
