"""The paper's datasets on their real on-disk layouts (torchvision's wherever a torchvision class
exists; the table in :mod:`residual_core.datasets`), registered on import."""

from __future__ import annotations

import functools
import json
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image
from torchvision import datasets as tvd
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from residual_core.datasets.base import DatasetInfo, FileListSource
from residual_core.datasets.registry import _REGISTRY, _Entry, dataset_info
from residual_core.datasets.splits import _official_splits, _Opener, split_80_10_10
from residual_core.errors import DatasetNotFoundError, ResidualError
from residual_core.layout import SPLITS

PAPER_DATASETS = (
    "cifar10",
    "cifar100",
    "dtd",
    "eurosat",
    "gtsrb",
    "mnist",
    "resisc45",
    "stanford_cars",
    "sun397",
    "svhn",
)
"""The ten downstream datasets of the paper's grid (``imagenet`` is the default basis dataset)."""


# ----------------------------------------------------------------------------------------------
# Sources


class CifarSource:
    """CIFAR-10/100 read from the pickled batches in torchvision's layout.

    Why not ``torchvision.datasets.CIFAR10`` itself: it verifies the md5 of every batch file on
    each construction, so it accepts only the original files and no small test folder in the same
    format can exercise this code path. Files, keys and pixel layout are taken from torchvision's
    class attributes; ``download=True`` still goes through torchvision, which verifies the md5 of
    what it downloads.

    The batch files are unpickled with ``pickle.load``, as torchvision does: a crafted file can
    run code when read, so point it only at CIFAR folders you trust (the md5 of files not
    downloaded here is not checked).
    """

    def __init__(self, root: Path, tv_class: type[tvd.CIFAR10], train: bool) -> None:
        folder = Path(root) / tv_class.base_folder
        data, targets = [], []
        for file_name, _md5 in tv_class.train_list if train else tv_class.test_list:
            entry = _read_pickle(folder / file_name)
            data.append(np.asarray(entry["data"], dtype=np.uint8))
            targets.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        # rows are channel-major 3x32x32, as torchvision reshapes them
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.targets = np.asarray(targets, dtype=np.int64)
        if len(self.targets) != len(self.data):
            raise ResidualError(f"{folder}: {len(self.data)} images but {len(self.targets)} labels")
        self.classes = list(_read_pickle(folder / tv_class.meta["filename"])[tv_class.meta["key"]])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.data[index]), int(self.targets[index])


def _read_pickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")  # the batches are Python 2 pickles
    except (pickle.UnpicklingError, EOFError) as e:
        raise ResidualError(f"{path} is not a readable CIFAR batch ({e}); download it again") from e


class SvhnSource:
    """SVHN read from the Stanford ``{train,test}_32x32.mat`` files, decoded as torchvision does.

    Why not ``torchvision.datasets.SVHN`` itself: like CIFAR it verifies the md5 of the file on
    each construction, so it accepts only the original files and no small test file in the same
    format can exercise this path. ``X`` is uint8 ``(32, 32, 3, N)``, ``y`` ``(N, 1)`` with the
    digit 0 stored as 10 (mapped to label 0, as torchvision does). ``download=True`` still goes
    through torchvision, which verifies the md5 of what it downloads.
    """

    def __init__(self, folder: Path, part: str) -> None:
        import scipy.io  # optional dependency, as in torchvision

        path = Path(folder) / tvd.SVHN.split_list[part][1]
        if not path.is_file():
            raise FileNotFoundError(f"missing file {path}")
        try:
            mat = scipy.io.loadmat(path, variable_names=["X", "y"])
        except Exception as e:  # noqa: BLE001  scipy raises ValueError, TypeError, OSError, ...
            raise ResidualError(
                f"{path} is not a readable SVHN .mat file ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:200]}); download it again"
            ) from e
        x, y = mat.get("X"), mat.get("y")
        if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) \
                or y.size != x.shape[3]:
            raise ResidualError(
                f"{path}: expected 'X' of shape (32, 32, 3, N) and 'y' of N labels, got "
                f"{None if x is None else x.shape} and {None if y is None else y.shape}"
            )
        self.data = x  # indexed per sample: no copy of the whole array
        labels = np.asarray(y, dtype=np.int64).reshape(-1)
        labels[labels == 10] = 0
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image = np.ascontiguousarray(self.data[:, :, :, index], dtype=np.uint8)
        return Image.fromarray(image), int(self.labels[index])


def _source_labels(ds: Any) -> np.ndarray:
    """Labels of a torchvision dataset from its metadata, without decoding any image."""
    for attr in ("targets", "labels", "_labels"):  # ImageFolder/MNIST/CIFAR, SVHN, DTD/SUN397
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    for attr in ("_samples", "samples"):  # GTSRB, StanfordCars: (path, label) pairs
        if hasattr(ds, attr):
            return np.asarray([label for _, label in getattr(ds, attr)], dtype=np.int64)
    raise TypeError(f"no label attribute on {type(ds).__name__}")


def _remap_by_name(
    labels: np.ndarray, source_names: Sequence[str], target_names: Sequence[str], dataset: str,
    what: str = "class folders", fix: str = "rename them or use imagefolder:PATH",
) -> np.ndarray:
    """Map labels indexing ``source_names`` to indices into ``target_names`` (matched by name);
    ``what``/``fix`` say in the error what the source names are and what to do."""
    index = {n: i for i, n in enumerate(target_names)}
    unknown = [n for n in source_names if n not in index]
    if unknown:
        raise ResidualError(
            f"dataset '{dataset}': {what} {unknown[:5]} are not among its class names "
            f"{list(target_names)[:5]}...; {fix}"
        )
    return np.asarray([index[n] for n in source_names], dtype=np.int64)[labels]


# ----------------------------------------------------------------------------------------------
# The paper's datasets


@functools.lru_cache(maxsize=None)
def _prompts() -> dict[str, dict[str, Any]]:
    text = (resources.files("residual_core") / "resources" / "zeroshot_prompts.json").read_text(
        encoding="utf-8"
    )
    return json.loads(text)


def _prompt_info(name: str) -> DatasetInfo:
    entry = _prompts()[name]
    return DatasetInfo(name, list(entry["classes"]), list(entry["templates"]))


@dataclass(frozen=True)
class _Layout:
    """Where a paper dataset lives under the data root and how to get it (for error messages)."""

    folder: str  # relative to the data root
    expected: str
    how: str


def _torchvision_how(cls: str, root_hint: str = "DATA_ROOT") -> str:
    return (
        f"download it with torchvision.datasets.{cls}({root_hint!r}, download=True), "
        "or run residual extract with --download (grid: extract.download; "
        "residual_core.datasets.load_dataset(..., download=True))"
    )


_LAYOUTS: dict[str, _Layout] = {
    "cifar10": _Layout(
        "cifar-10-batches-py",
        "data_batch_1..data_batch_5, test_batch and batches.meta",
        _torchvision_how("CIFAR10"),
    ),
    "cifar100": _Layout("cifar-100-python", "train, test and meta", _torchvision_how("CIFAR100")),
    "mnist": _Layout(
        "MNIST/raw",
        "{train,t10k}-images-idx3-ubyte and {train,t10k}-labels-idx1-ubyte",
        _torchvision_how("MNIST"),
    ),
    "svhn": _Layout(
        "svhn", "train_32x32.mat and test_32x32.mat", _torchvision_how("SVHN", "DATA_ROOT/svhn")
    ),
    "gtsrb": _Layout(
        "gtsrb",
        "GTSRB/Training/<class>/*.ppm, GTSRB/Final_Test/Images/*.ppm and GT-final_test.csv",
        _torchvision_how("GTSRB"),
    ),
    "dtd": _Layout(
        "dtd/dtd", "images/<class>/*.jpg and labels/{train,val,test}1.txt", _torchvision_how("DTD")
    ),
    "eurosat": _Layout("eurosat/2750", "<ClassFolder>/*.jpg", _torchvision_how("EuroSAT")),
    "stanford_cars": _Layout(
        "stanford_cars",
        "cars_train/, cars_test/, devkit/ (cars_meta.mat, cars_train_annos.mat) and "
        "cars_test_annos_withlabels.mat",
        "torchvision can no longer download it (the original URL is dead): get the Stanford Cars "
        "images, devkit and test annotations from a mirror (e.g. Kaggle) and place them there",
    ),
    "sun397": _Layout(
        "SUN397", "ClassName.txt and <letter>/<class>/sun_*.jpg", _torchvision_how("SUN397")
    ),
    "resisc45": _Layout(
        "resisc45",
        "NWPU-RESISC45/<class>/*.jpg (or <class>/*.jpg), optionally resisc45-{train,val,test}.txt",
        "download NWPU-RESISC45 (no automatic download: see https://www.tensorflow.org/datasets/"
        "catalog/resisc45) and extract it there; the standard split lists are "
        "resisc45-{train,val,test}.txt at "
        "https://storage.googleapis.com/remote_sensing_representations/",
    ),
    "imagenet": _Layout(
        "imagenet",
        "meta.bin, train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, or the archives "
        "ILSVRC2012_devkit_t12.tar.gz, ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar",
        "download the ILSVRC2012 archives from https://image-net.org (no automatic download) "
        "into that folder; torchvision extracts them on first use",
    ),
}


def _download_failed(e: BaseException) -> bool:
    """Whether an error raised while torchvision downloads is the download failing: no network
    (``URLError``, ``ConnectionError``, a timeout: ``OSError``s), MNIST's "Error downloading"
    after its mirrors, or a download that is not what its md5 says (a proxy's error page)."""
    if isinstance(e, OSError):
        return not isinstance(e, FileNotFoundError)
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("download" in text or "corrupted" in text)


@contextmanager
def _missing_data(name: str, data_root: Path, download: bool = False) -> Iterator[None]:
    """Turn torchvision's 'Dataset not found' errors into a :class:`DatasetNotFoundError`, and
    (``download``) a failed download into one that says where to put the files instead."""
    try:
        yield
    except (RuntimeError, OSError) as e:
        layout = _LAYOUTS[name]
        detail = " ".join(str(e).split())  # one line, whatever torchvision's message looks like
        if download and _download_failed(e):
            raise DatasetNotFoundError(
                f"dataset '{name}' could not be downloaded by torchvision (no network access?): "
                f"place it yourself in {data_root / layout.folder} ({layout.expected}; data root "
                f"{data_root}), e.g. copied from a machine with network access (there: "
                f"{layout.how.replace('DATA_ROOT', str(data_root)).split(', or ')[0]}). "
                f"[{type(e).__name__}: {detail}]"
            ) from e
        if not isinstance(e, (RuntimeError, FileNotFoundError)):
            raise
        raise DatasetNotFoundError(
            f"dataset '{name}' not found: expected {layout.expected} in "
            f"{data_root / layout.folder} (data root {data_root}). To get it: "
            f"{layout.how.replace('DATA_ROOT', str(data_root))}. [{type(e).__name__}: {detail}]"
        ) from e


def _torchvision_source(name: str, ds: Any) -> tuple[Any, np.ndarray]:
    """A torchvision dataset and its labels, checked against the prompt file's class count."""
    info = dataset_info(name)
    classes = getattr(ds, "classes", None)
    if classes is not None and len(classes) != info.num_classes:
        raise ResidualError(
            f"dataset '{name}': the data has {len(classes)} classes, the prompt file "
            f"{info.num_classes}; is the folder the right dataset?"
        )
    return ds, _source_labels(ds)


def _open_cifar(tv_class: type[tvd.CIFAR10], name: str) -> _Opener:
    def opener(root: Path, part: str, download: bool):
        train = part == "train"
        with _missing_data(name, root, download):
            if download:  # fetch and md5-verify through torchvision, then read as usual
                tv_class(str(root), train=train, download=True)
            return _torchvision_source(name, CifarSource(root, tv_class, train))

    return opener


def _open_simple(name: str, build: Callable[[Path, str, bool], Any]) -> _Opener:
    """Opener around ``build(data_root, part, download) -> torchvision dataset``."""

    def opener(root: Path, part: str, download: bool):
        with _missing_data(name, root, download):
            return _torchvision_source(name, build(root, part, download))

    return opener


def _open_eurosat(root: Path, part: str, download: bool):
    with _missing_data("eurosat", root, download):
        ds = tvd.EuroSAT(str(root), download=download)
    ds, labels = _torchvision_source("eurosat", ds)
    # torchvision numbers the folders alphabetically; the prompt file has its own order
    folders = _prompts()["eurosat"]["source_folder_names"]
    return ds, _remap_by_name(labels, ds.classes, folders, "eurosat")


def _open_svhn(root: Path, part: str, download: bool):
    folder = root / "svhn"
    with _missing_data("svhn", root, download):
        if download:  # fetch and md5-verify through torchvision, then read as usual
            tvd.SVHN(str(folder), split=part, download=True)
        return _torchvision_source("svhn", SvhnSource(folder, part))


def _open_dtd(root: Path, part: str, download: bool):
    """DTD partition 1: ``test`` is test1.txt; ``train`` is the pool train1.txt + val1.txt, from
    which the factory carves the 20% val (the ResiDual authors' protocol: DTD's own val1 is part
    of the training pool, not the validation split)."""
    with _missing_data("dtd", root, download):
        parts = [tvd.DTD(str(root), split=s, partition=1, download=download)
                 for s in (["test"] if part == "test" else ["train", "val"])]
    classnames = dataset_info("dtd").classnames
    paths: list[Path] = []
    labels: list[np.ndarray] = []
    for ds in parts:
        ds, part_labels = _torchvision_source("dtd", ds)
        # torchvision numbers the classes of each list file on its own: map by name
        labels.append(_remap_by_name(part_labels, ds.classes, classnames, "dtd"))
        paths.extend(ds._image_files)
    all_labels = np.concatenate(labels)
    return FileListSource(paths, all_labels), all_labels


def _open_sun397(root: Path, part: str, download: bool):
    with _missing_data("sun397", root, download):
        try:
            ds = tvd.SUN397(str(root), download=download)
        except KeyError as e:  # an image folder that ClassName.txt does not list
            raise ResidualError(
                f"dataset 'sun397': {root / 'SUN397'} has sun_*.jpg images in a folder "
                f"'{e.args[0]}' that ClassName.txt does not list; remove it or use the "
                "archive's ClassName.txt"
            ) from e
    ds, labels = _torchvision_source("sun397", ds)
    # torchvision numbers the classes in ClassName.txt order, sorted by path, while the prompt
    # file is sorted by name: "/j/jail/indoor" comes before "/j/jail_cell" but "jail cell" before
    # "jail indoor", so index order would swap such classes. Map by name ("/" and "_" are " ").
    labels = _remap_by_name(
        labels, [c.replace("/", " ").replace("_", " ") for c in ds.classes],
        dataset_info("sun397").classnames, "sun397",
    )
    # torchvision lists files in filesystem (rglob) order, which differs across machines: sort
    # by path so that positions are stable sample ids
    order = sorted(range(len(labels)), key=lambda i: str(ds._image_files[i]))
    return FileListSource([ds._image_files[i] for i in order], labels[order]), labels[order]


def _refuse_download(name: str, root: Path, download: bool) -> None:
    """Datasets torchvision cannot download: say so instead of failing deep inside."""
    layout = _LAYOUTS[name]
    if download and not (root / layout.folder).exists():
        raise DatasetNotFoundError(
            f"dataset '{name}' cannot be downloaded by torchvision: place it in "
            f"{root / layout.folder} ({layout.expected}; data root {root}). To get it: "
            f"{layout.how}"
        )


def _build_cars(root: Path, part: str, download: bool) -> Any:
    _refuse_download("stanford_cars", root, download)
    return tvd.StanfordCars(str(root), split=part)


def _open_cars(root: Path, part: str, download: bool):
    with _missing_data("stanford_cars", root):
        ds = _build_cars(root, part, download)
    ds, labels = _torchvision_source("stanford_cars", ds)
    # labels index devkit/cars_meta.mat's class_names, which the prompt file lists verbatim and
    # in the same order: map by name, so that a meta file in another order cannot shift labels
    meta = root / "stanford_cars" / "devkit" / "cars_meta.mat"
    return ds, _remap_by_name(
        labels, [" ".join(str(c).split()) for c in ds.classes],
        dataset_info("stanford_cars").classnames, "stanford_cars",
        what=f"class names of {meta}", fix="is it the Stanford Cars devkit's cars_meta.mat?",
    )


def _build_gtsrb(root: Path, part: str, download: bool) -> Any:
    try:
        return tvd.GTSRB(str(root), split=part, download=download)
    except KeyError as e:  # csv.DictReader row without the column torchvision reads
        csv_file = root / "gtsrb" / "GT-final_test.csv"
        raise ResidualError(
            f"dataset 'gtsrb': {csv_file} has no {e.args[0]} column (the unlabelled "
            "GT-final_test.test.csv of the test images archive?); put there the file of "
            "GTSRB_Final_Test_GT.zip, ';'-separated with columns Filename and ClassId"
        ) from e


def _build_imagenet(root: Path, part: str, download: bool) -> Any:
    _refuse_download("imagenet", root, download)
    base = root / "imagenet"
    folder = base / {"train": "train", "test": "val"}[part]
    if folder.is_dir() and not any(entry.is_dir() for entry in os.scandir(folder)):
        # e.g. ILSVRC2012_img_val.tar extracted by hand: torchvision sorts val/ into wnid
        # folders only when it extracts the archive itself
        raise DatasetNotFoundError(
            f"dataset 'imagenet': {folder} has no <wnid> class folders; remove it and put "
            f"ILSVRC2012_img_{folder.name}.tar (and ILSVRC2012_devkit_t12.tar.gz) in {base} for "
            "torchvision to extract and sort on first use"
        )
    try:
        return tvd.ImageNet(str(base), split=folder.name)
    except KeyError as e:  # a class folder that meta.bin does not name
        raise ResidualError(
            f"dataset 'imagenet': {folder / str(e.args[0])} is not a class of {base / 'meta.bin'}; "
            "remove that folder, or delete meta.bin for torchvision to rebuild it from "
            "ILSVRC2012_devkit_t12.tar.gz"
        ) from e


def _resisc45(split: str, data_root: Path, download: bool):
    _refuse_download("resisc45", data_root, download)
    base = data_root / "resisc45"
    image_dir = base / "NWPU-RESISC45" if (base / "NWPU-RESISC45").is_dir() else base
    info = dataset_info("resisc45")
    with _missing_data("resisc45", data_root):
        folders, class_to_idx = find_classes(image_dir)
        samples = make_dataset(str(image_dir), class_to_idx, extensions=IMG_EXTENSIONS)
    # folders are named like the classes with "_" for " " (baseball_diamond)
    labels = _remap_by_name(
        np.asarray([label for _, label in samples], dtype=np.int64),
        [f.replace("_", " ") for f in folders],
        info.classnames,
        "resisc45",
    )
    source = FileListSource([path for path, _ in samples], labels)
    lists = [base / f"resisc45-{s}.txt" for s in SPLITS]
    if all(p.is_file() for p in lists):
        pos = _positions_of_listed(source.paths, base / f"resisc45-{split}.txt")
    else:
        pos = split_80_10_10(labels)[split]
    return source, labels[pos], pos


def _positions_of_listed(paths: Sequence[str], list_file: Path) -> np.ndarray:
    """Positions of the images a split list names (one file name a line, matched by base name)."""
    by_name = {Path(p).name: i for i, p in enumerate(paths)}
    names = [Path(line.strip()).name for line in list_file.read_text().splitlines() if line.strip()]
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DatasetNotFoundError(
            f"{list_file} names {len(missing)} images not found in the dataset folder, e.g. "
            f"{missing[:3]}"
        )
    return np.sort(np.asarray([by_name[n] for n in names], dtype=np.int64))


VAL_FRACTIONS: dict[str, float | None] = {
    "cifar10": 0.1, "cifar100": 0.1, "mnist": 0.1, "gtsrb": 0.1,
    "svhn": 0.2, "dtd": 0.2, "stanford_cars": 0.2, "imagenet": 0.2,
    "eurosat": None, "sun397": None,
}
"""The fraction of each paper dataset's official train split carved (stratified, seed 42) as its
validation split, as the ResiDual authors' ``data/dataset.py`` does; ``None``: no official split,
drawn 80/10/10 (resisc45: its split lists, else 80/10/10). DTD's 20% is of partition 1's train +
val pool. ``hf-dataset:`` sources named like one of these carve the same fraction."""


def _register_paper_datasets() -> None:
    mnist = _open_simple("mnist", lambda r, p, d: tvd.MNIST(str(r), train=p == "train", download=d))
    gtsrb = _open_simple("gtsrb", _build_gtsrb)
    openers: dict[str, _Opener] = {
        "cifar10": _open_cifar(tvd.CIFAR10, "cifar10"),
        "cifar100": _open_cifar(tvd.CIFAR100, "cifar100"),
        "mnist": mnist,
        "gtsrb": gtsrb,
        "svhn": _open_svhn,
        "dtd": _open_dtd,
        "stanford_cars": _open_cars,
        "imagenet": _open_simple("imagenet", _build_imagenet),
        "eurosat": _open_eurosat,
        "sun397": _open_sun397,
    }
    for name, opener in openers.items():
        info = functools.partial(_prompt_info, name)
        _REGISTRY[name] = _Entry(_official_splits(opener, VAL_FRACTIONS[name]), info)
    _REGISTRY["resisc45"] = _Entry(_resisc45, functools.partial(_prompt_info, "resisc45"))


_register_paper_datasets()
