"""Datasets of the ResiDual grid: class names, prompts, local loading and the train/val/test splits.

Every dataset is read from a local *data root* (``data_root`` argument, else
``$RESIDUAL_DATA_ROOT/datasets``, else ``./data/datasets``). Nothing is ever downloaded unless
``download=True`` is passed, and then only through torchvision's own downloaders. Expected layout
under the data root (torchvision's conventions wherever a torchvision class exists):

============== ================================================================================
cifar10        ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``
cifar100       ``cifar-100-python/{train, test, meta}``
mnist          ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
svhn           ``svhn/{train,test}_32x32.mat``
gtsrb          ``gtsrb/GTSRB/Training/<class>/*.ppm``, ``gtsrb/GTSRB/Final_Test/Images/*.ppm``,
               ``gtsrb/GT-final_test.csv``
dtd            ``dtd/dtd/images/<class>/*.jpg``, ``dtd/dtd/labels/{train,val,test}1.txt``
               (the split lists of partition 1)
eurosat        ``eurosat/2750/<ClassFolder>/*.jpg``
stanford_cars  ``stanford_cars/{cars_train/, cars_test/, devkit/, cars_test_annos_withlabels.mat}``
sun397         ``SUN397/{ClassName.txt, <letter>/<class>[/<sub>]/sun_*.jpg}`` (classes mapped to
               the prompt names by name: ``/a/apartment_building/outdoor`` is "apartment
               building outdoor")
resisc45       ``resisc45/NWPU-RESISC45/<class>/*.jpg`` (or ``resisc45/<class>/*.jpg``), optional
               split lists ``resisc45/resisc45-{train,val,test}.txt`` (one image file name a line)
imagenet       ``imagenet/{meta.bin, train/<wnid>/*.JPEG, val/<wnid>/*.JPEG}``, or the ILSVRC2012
               archives in ``imagenet/`` (torchvision extracts them on first use)
============== ================================================================================

Splits (METHOD §4), all stratified with seed 42 and deterministic across runs and processes:

- cifar10, cifar100, mnist, gtsrb: ``val`` = 10% of the official train split, ``train`` = the rest,
  ``test`` = the official test split. svhn, stanford_cars: the same with 20%.
- dtd (the ResiDual authors' protocol): ``val`` = a stratified 20% of partition 1's train + val
  lists together, ``train`` = the rest of that pool, ``test`` = partition 1's test list.
- eurosat, sun397 (no official split): ``test`` = 10% of the whole set, ``val`` = another 10%,
  ``train`` = the remaining 80%.
- resisc45: the standard split lists when all three are present, else 80/10/10 as above.
- imagenet: ``train`` = 80% of the official train split (the bases' fitting set), ``val`` = the
  other 20%, ``test`` = the official validation split.
- ``imagefolder:PATH``: ``PATH/train`` + ``PATH/test`` (+ ``PATH/val`` if present, else 10% of
  train) when ``PATH`` has ``train/`` and ``test/``, else 80/10/10 of ``PATH/<class>/*``. Every
  image of the folders a split is drawn from is decoded once first: a file PIL cannot decode
  is an error naming it, or with ``skip_bad_images`` is left out before the split is drawn
  (:attr:`SplitDataset.skipped`), so that the split never depends on when a file failed.

Labels are indices into :attr:`DatasetInfo.classnames`, the prompt-file order (EuroSAT, RESISC45,
DTD and SUN397 classes are mapped to it by name). :attr:`SplitDataset.indices` are positions in
the source dataset of that official part (official train for ``train``/``val``, official test
for ``test``; the whole set where there is no official split; DTD's train1 then val1 lists):
the stable sample ids that feature stores keep.

Trust: CIFAR batches are Python pickles, unpickled as torchvision does (``pickle.load``), and
unpickling can run code, so read only dataset folders you trust (downloaded through
torchvision, which checks their md5, or from a source you trust).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, find_classes, make_dataset

from residual_core.errors import DatasetNotFoundError, ResidualError
from residual_core.identity import IMAGEFOLDER_PREFIX, parse_dataset
from residual_core.layout import SPLITS, Layout

__all__ = [
    "DEFAULT_TEMPLATES",
    "IMAGEFOLDER_PREFIX",
    "PAPER_DATASETS",
    "SEED",
    "SPLITS",
    "CifarSource",
    "DatasetInfo",
    "Factory",
    "FileListSource",
    "SplitDataset",
    "SplitSource",
    "SvhnSource",
    "dataset_info",
    "list_datasets",
    "load_dataset",
    "register_dataset",
    "split_80_10_10",
    "stratified_split",
    "validate_labels",
]

SEED = 42
"""Seed of every split."""

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


DEFAULT_TEMPLATES = ["a photo of a {}."]
"""Prompt templates of ``imagefolder:`` datasets."""


class SplitSource(Protocol):
    """What a factory returns as its source: ``source[i]`` is ``(image, anything)``."""

    def __getitem__(self, index: int) -> tuple[Any, Any]: ...


Factory = Callable[[str, Path, bool], tuple[SplitSource, np.ndarray, np.ndarray]]
"""``factory(split, data_root, download) -> (source, labels, indices)``: see register_dataset."""


@dataclass(frozen=True)
class DatasetInfo:
    """Name, class names (label order), prompt templates (with ``{}``) and number of classes.

    Class names may repeat (CLIP's ImageNet list has two "missile" and two "sunglasses").
    """

    name: str
    classnames: list[str]
    templates: list[str]
    num_classes: int = field(init=False)

    def __post_init__(self) -> None:
        if not self.classnames:
            raise ResidualError(f"dataset '{self.name}' has no class names")
        bad = [t for t in self.templates if "{}" not in t]
        if not self.templates or bad:
            raise ResidualError(
                f"dataset '{self.name}' needs prompt templates containing '{{}}', "
                f"got {self.templates!r}"
            )
        object.__setattr__(self, "num_classes", len(self.classnames))  # frozen: derived once


class SplitDataset(Dataset):
    """One split of a dataset: ``ds[i] -> (transform(image), label)``.

    Images are returned as RGB PIL images (grayscale ones, e.g. MNIST, are converted) before
    ``transform``; non-PIL images from registered sources are passed through unchanged.

    Attributes:
        info: the dataset's :class:`DatasetInfo`.
        split: ``"train"``, ``"val"`` or ``"test"``.
        indices: int64 ``[n]``, each sample's position in the source (its stable id).
        labels: int64 ``[n]``, each sample's label (known without decoding any image).
        source: the underlying dataset, indexed by ``indices``.
        skipped: the files left out as unreadable (``skip_bad_images``), relative to the
            dataset's folder.
    """

    def __init__(
        self,
        source: SplitSource,
        labels: np.ndarray,
        indices: np.ndarray,
        info: DatasetInfo,
        split: str,
        transform: Callable[[Any], Any] | None = None,
        skipped: Sequence[str] = (),
    ) -> None:
        self.source = source
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.labels.shape != self.indices.shape or self.labels.ndim != 1:
            raise ResidualError(
                f"dataset '{info.name}': labels {self.labels.shape} and indices "
                f"{self.indices.shape} must be 1-d arrays of the same length"
            )
        self.info = info
        self.split = split
        self.transform = transform
        self.skipped = tuple(skipped)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = self.source[int(self.indices[i])][0]
        if isinstance(image, Image.Image) and image.mode != "RGB":
            image = image.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])

    def __repr__(self) -> str:
        return f"SplitDataset({self.info.name!r}, split={self.split!r}, n={len(self)})"


def validate_labels(labels: np.ndarray, info: DatasetInfo) -> None:
    """Raise :class:`ResidualError` unless every label is an integer in ``[0, num_classes)``."""
    labels = np.asarray(labels)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ResidualError(f"dataset '{info.name}': labels must be integers, got {labels.dtype}")
    bad = labels[(labels < 0) | (labels >= info.num_classes)]
    if bad.size:
        raise ResidualError(
            f"dataset '{info.name}': labels {sorted(set(bad.tolist()))[:10]} are outside its "
            f"{info.num_classes} classes (0..{info.num_classes - 1})"
        )


# ----------------------------------------------------------------------------------------------
# Splits


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Carve a stratified ``fraction`` out of ``labels``: returns (kept, carved) positions, sorted.

    sklearn's ``train_test_split(stratify=labels, random_state=seed)``, so the result depends only
    on the labels and the seed (the same in every process and run).
    """
    from sklearn.model_selection import train_test_split  # slow import, only needed here

    labels = np.asarray(labels)
    try:
        kept, carved = train_test_split(
            np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed
        )
    except ValueError as e:  # too few samples per class for a stratified split
        n_classes = len(np.unique(labels))
        raise ResidualError(
            f"cannot carve a stratified {fraction:.0%} split from {len(labels)} samples of "
            f"{n_classes} classes: {e}"
        ) from e
    return np.sort(kept).astype(np.int64), np.sort(carved).astype(np.int64)


def split_80_10_10(labels: np.ndarray, seed: int = SEED) -> dict[str, np.ndarray]:
    """Stratified 80/10/10 positions: ``test`` and ``val`` 10% of all each, ``train`` the rest."""
    rest, test = stratified_split(labels, 0.1, seed)
    train, val = stratified_split(np.asarray(labels)[rest], 1 / 9, seed)
    return {"train": rest[train], "val": rest[val], "test": test}


def _carve_val(labels: np.ndarray, split: str, fraction: float) -> np.ndarray:
    """Positions of ``split`` (``train`` or ``val``) when val is ``fraction`` of official train."""
    train, val = stratified_split(labels, fraction)
    return val if split == "val" else train


# Opener of a dataset's official parts: opener(data_root, part, download) -> (source, labels),
# part "train"/"test" (or "all" for datasets without an official split).
_Opener = Callable[[Path, str, bool], tuple[SplitSource, np.ndarray]]


def _official_splits(opener: _Opener, val_fraction: float | None) -> Factory:
    """Factory from an opener: val carved from official train, or 80/10/10 if no official split."""

    def factory(split: str, data_root: Path, download: bool):
        if val_fraction is None:
            source, labels = opener(data_root, "all", download)
            pos = split_80_10_10(labels)[split]
        elif split == "test":
            source, labels = opener(data_root, "test", download)
            pos = np.arange(len(labels), dtype=np.int64)
        else:
            source, labels = opener(data_root, "train", download)
            pos = _carve_val(labels, split, val_fraction)
        return source, labels[pos], pos

    return factory


# ----------------------------------------------------------------------------------------------
# Sources


class FileListSource:
    """Images on disk listed as paths: ``source[i] -> (PIL image, label)``; sorted by the caller.

    ``skipped``: files left out of ``paths`` as unreadable (relative to the dataset's folder).
    """

    def __init__(self, paths: Sequence[str | Path], labels: np.ndarray,
                 skipped: Sequence[str] = ()) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.skipped = list(skipped)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return default_loader(self.paths[index]), int(self.labels[index])


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
        "or pass download=True to residual_core.datasets.load_dataset (the CLI never downloads)"
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


@contextmanager
def _missing_data(name: str, data_root: Path) -> Iterator[None]:
    """Turn torchvision's 'Dataset not found' errors into a :class:`DatasetNotFoundError`."""
    try:
        yield
    except (RuntimeError, FileNotFoundError) as e:
        layout = _LAYOUTS[name]
        detail = " ".join(str(e).split())  # one line, whatever torchvision's message looks like
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
        with _missing_data(name, root):
            if download:  # fetch and md5-verify through torchvision, then read as usual
                tv_class(str(root), train=train, download=True)
            return _torchvision_source(name, CifarSource(root, tv_class, train))

    return opener


def _open_simple(name: str, build: Callable[[Path, str, bool], Any]) -> _Opener:
    """Opener around ``build(data_root, part, download) -> torchvision dataset``."""

    def opener(root: Path, part: str, download: bool):
        with _missing_data(name, root):
            return _torchvision_source(name, build(root, part, download))

    return opener


def _open_eurosat(root: Path, part: str, download: bool):
    with _missing_data("eurosat", root):
        ds = tvd.EuroSAT(str(root), download=download)
    ds, labels = _torchvision_source("eurosat", ds)
    # torchvision numbers the folders alphabetically; the prompt file has its own order
    folders = _prompts()["eurosat"]["source_folder_names"]
    return ds, _remap_by_name(labels, ds.classes, folders, "eurosat")


def _open_svhn(root: Path, part: str, download: bool):
    folder = root / "svhn"
    with _missing_data("svhn", root):
        if download:  # fetch and md5-verify through torchvision, then read as usual
            tvd.SVHN(str(folder), split=part, download=True)
        return _torchvision_source("svhn", SvhnSource(folder, part))


def _open_dtd(root: Path, part: str, download: bool):
    """DTD partition 1: ``test`` is test1.txt; ``train`` is the pool train1.txt + val1.txt, from
    which the factory carves the 20% val (the ResiDual authors' protocol: DTD's own val1 is part
    of the training pool, not the validation split)."""
    with _missing_data("dtd", root):
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
    with _missing_data("sun397", root):
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
    if download and not (root / _LAYOUTS[name].folder).exists():
        with _missing_data(name, root):
            raise FileNotFoundError(f"'{name}' cannot be downloaded automatically")


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


# ----------------------------------------------------------------------------------------------
# imagefolder:PATH


def _imagefolder_path(name: str) -> Path:
    return parse_dataset(name).path


def _imagefolder_class_dir(path: Path) -> Path:
    """The folder whose subfolders are the classes: ``PATH/train`` in the train/test layout."""
    return path / "train" if (path / "train").is_dir() and (path / "test").is_dir() else path


def _imagefolder_info(name: str) -> DatasetInfo:
    path = _imagefolder_path(name)
    class_dir = _imagefolder_class_dir(path)
    if not class_dir.is_dir():
        raise DatasetNotFoundError(
            f"dataset '{name}': expected a folder {path} with one subfolder of images per class "
            f"(or train/ and test/ folders of that form); it does not exist"
        )
    classes = sorted(entry.name for entry in os.scandir(class_dir) if entry.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"dataset '{name}': no class subfolders in {class_dir}")
    return DatasetInfo(name, classes, list(DEFAULT_TEMPLATES))


def _decode_error(path: str) -> str | None:
    """Why PIL cannot decode the image at ``path`` (``None`` if it can), memoised on the file's
    path, size and mtime: a folder is decoded once per process, however often it is listed."""
    st = os.stat(path)
    return _decode_error_of(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1 << 20)
def _decode_error_of(path: str, size: int, mtime_ns: int) -> str | None:
    if size == 0:
        return "empty file"
    try:
        # A full decode, as extraction does: Image.verify() passes truncated JPEG/BMP/PPM files.
        with Image.open(path) as image:
            image.load()
    except Exception as e:  # noqa: BLE001  PIL raises OSError, SyntaxError, ValueError, ...
        if isinstance(e, UnidentifiedImageError):
            return "not an image file PIL can identify"
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0][:120]}" if text else type(e).__name__
    return None


def _drop_unreadable(
    samples: list[tuple[str, int]], info: DatasetInfo, base: Path, skip: bool
) -> tuple[list[tuple[str, int]], list[str]]:
    """``samples`` without the files PIL cannot decode, and those files relative to ``base``;
    unless ``skip``, such a file is an error naming it.

    Decodes every image (once per process, see :func:`_decode_error`): for a large folder this
    costs about one pass of image decoding before the split is drawn.
    """
    bad = [(path, why) for path, _ in samples if (why := _decode_error(path)) is not None]
    if not bad:
        return samples, []
    skipped = [Path(path).relative_to(base).as_posix() for path, _ in bad]
    if not skip:
        more = f", nor can {len(bad) - 1} more files" if len(bad) > 1 else ""
        raise ResidualError(
            f"dataset '{info.name}': {base / skipped[0]} cannot be read as an image "
            f"({bad[0][1]}){more}; replace or delete {'them' if more else 'it'}, or pass "
            "--skip-bad-images (grid: extract.skip_bad_images) to leave unreadable images out"
        )
    drop = {path for path, _ in bad}
    return [s for s in samples if s[0] not in drop], skipped


def _folder_source(
    folder: Path, info: DatasetInfo, complete: bool, base: Path, skip_bad_images: bool = False
) -> tuple[FileListSource, np.ndarray]:
    """All images of ``folder/<class>/``, labelled by ``info``'s classes; unknown folders fail.

    ``complete``: every class must have images (the folder the classes come from); a test or val
    folder may lack some. An image PIL cannot decode is an error, or left out with
    ``skip_bad_images`` (:func:`_drop_unreadable`; its path relative to ``base`` is recorded).
    """
    extra = sorted(set(find_classes(folder)[0]) - set(info.classnames))
    if extra:
        raise ResidualError(
            f"dataset '{info.name}': {folder} has class folders {extra} that are not among the "
            f"classes of its training folder {info.classnames}"
        )
    try:
        samples = make_dataset(
            str(folder),
            {c: i for i, c in enumerate(info.classnames)},
            extensions=IMG_EXTENSIONS,
            allow_empty=not complete,
        )
    except FileNotFoundError as e:  # a class folder with no images
        raise DatasetNotFoundError(f"dataset '{info.name}': {e} (in {folder})") from e
    samples, skipped = _drop_unreadable(samples, info, base, skip_bad_images)
    labels = np.asarray([label for _, label in samples], dtype=np.int64)
    return FileListSource([path for path, _ in samples], labels, skipped), labels


def _imagefolder(name: str, skip_bad_images: bool = False) -> Factory:
    def factory(split: str, data_root: Path, download: bool):
        path = _imagefolder_path(name)
        info = _imagefolder_info(name)
        folder = functools.partial(_folder_source, info=info, base=path,
                                   skip_bad_images=skip_bad_images)
        if _imagefolder_class_dir(path) == path:
            source, labels = folder(path, complete=True)
            pos = split_80_10_10(labels)[split]
        elif split == "test" or (split == "val" and (path / "val").is_dir()):
            source, labels = folder(path / split, complete=False)
            pos = np.arange(len(labels), dtype=np.int64)
        else:
            source, labels = folder(path / "train", complete=True)
            if (path / "val").is_dir():
                pos = np.arange(len(labels), dtype=np.int64)
            else:
                pos = _carve_val(labels, split, 0.1)
        return source, labels[pos], pos

    return factory


# ----------------------------------------------------------------------------------------------
# Registry and public entry points


@dataclass(frozen=True)
class _Entry:
    factory: Factory
    info: Callable[[], DatasetInfo]


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(
    name: str, factory: Factory, info: DatasetInfo, *, overwrite: bool = False
) -> None:
    """Add a dataset that :func:`load_dataset` and every stage then treat like the paper's ones.

    ``factory(split, data_root, download) -> (source, labels, indices)`` is called by
    :func:`load_dataset` with ``split`` one of ``"train"``, ``"val"``, ``"test"``, the resolved
    data root (a ``Path``; a self-contained dataset may ignore it) and the download flag. It
    returns

    - ``source``: any object with ``source[i] -> (image, anything)`` for each ``i`` in
      ``indices``; the image is a PIL image (converted to RGB) or a tensor, given to the transform;
    - ``labels``: int ``[n]``, the label of each sample of the split, in ``info.classnames`` order;
    - ``indices``: int ``[n]``, each sample's position in ``source``: its stable id (unique,
      sorted ascending by convention, the same in every run; train and val drawn from one source
      must be disjoint).

    Splits should be deterministic; :func:`stratified_split` and :func:`split_80_10_10` give the
    project's seed-42 stratified splits. A missing dataset should raise
    :class:`DatasetNotFoundError` saying where it was expected and how to get it.
    """
    key = name.strip().lower()
    if not key or key.startswith(IMAGEFOLDER_PREFIX):
        raise ResidualError(f"invalid dataset name {name!r} ('{IMAGEFOLDER_PREFIX}' is reserved)")
    if key in _REGISTRY and not overwrite:
        raise ResidualError(f"dataset '{key}' is already registered (pass overwrite=True)")
    if info.name != key:
        raise ResidualError(f"DatasetInfo.name {info.name!r} differs from the name {key!r}")
    _REGISTRY[key] = _Entry(factory, lambda: info)


def _register_world() -> None:
    """The embedded world's tasks are built in: registered on first lookup, because
    :mod:`residual_core.world` imports this module (a top-level import would be circular)."""
    from . import world  # noqa: F401  (registers world/* on import)


def list_datasets() -> list[str]:
    """Names of all registered datasets, sorted (``imagefolder:PATH`` is always available too)."""
    _register_world()
    return sorted(_REGISTRY)


def _entry(name: str, skip_bad_images: bool = False) -> tuple[str, _Entry]:
    if name.startswith(IMAGEFOLDER_PREFIX):
        return name, _Entry(_imagefolder(name, skip_bad_images), lambda: _imagefolder_info(name))
    key = name.strip().lower()
    _register_world()
    if key in _REGISTRY:
        return key, _REGISTRY[key]
    close = difflib.get_close_matches(key, list_datasets(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise DatasetNotFoundError(
        f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(list_datasets())}; "
        f"or use '{IMAGEFOLDER_PREFIX}PATH' for a folder of class subfolders."
    )


def dataset_info(name: str) -> DatasetInfo:
    """Class names and templates of a dataset, without reading its data.

    (``imagefolder:PATH`` lists the class folders of ``PATH``, but reads no image.)
    """
    return _entry(name)[1].info()


def load_dataset(
    name: str,
    split: str,
    data_root: str | Path | None = None,
    transform: Callable[[Any], Any] | None = None,
    download: bool = False,
    skip_bad_images: bool = False,
) -> SplitDataset:
    """One split (``"train"``, ``"val"`` or ``"test"``) of a dataset, read from ``data_root``.

    ``data_root`` defaults to ``Layout.of().datasets``; ``download=True`` lets torchvision fetch
    a missing dataset that it can download (nothing is downloaded otherwise).
    ``skip_bad_images``: an ``imagefolder:`` dataset leaves out the files PIL cannot decode
    (listed in :attr:`SplitDataset.skipped`) instead of refusing them; other datasets ignore it.

    Raises:
        DatasetNotFoundError: unknown name, or data not where it is expected (the message says
            what was expected, at which path, and how to get it).
        ResidualError: unknown split, labels outside the class list, malformed data, an image
            of an ``imagefolder:`` dataset that cannot be decoded.
    """
    key, entry = _entry(name, skip_bad_images)
    if split not in SPLITS:
        raise ResidualError(
            f"unknown split {split!r} for dataset '{key}': expected one of {', '.join(SPLITS)}"
        )
    info = entry.info()
    root = Path(data_root).expanduser() if data_root is not None else Layout.of().datasets
    source, labels, indices = entry.factory(split, root, download)
    validate_labels(labels, info)
    return SplitDataset(source, labels, indices, info, split, transform,
                        skipped=getattr(source, "skipped", ()))


def _register_paper_datasets() -> None:
    mnist = _open_simple("mnist", lambda r, p, d: tvd.MNIST(str(r), train=p == "train", download=d))
    gtsrb = _open_simple("gtsrb", _build_gtsrb)
    openers: dict[str, tuple[_Opener, float | None]] = {  # name: (opener, val fraction of train)
        "cifar10": (_open_cifar(tvd.CIFAR10, "cifar10"), 0.1),
        "cifar100": (_open_cifar(tvd.CIFAR100, "cifar100"), 0.1),
        "mnist": (mnist, 0.1),
        "gtsrb": (gtsrb, 0.1),
        "svhn": (_open_svhn, 0.2),
        "dtd": (_open_dtd, 0.2),  # val carved from partition 1's train + val pool
        "stanford_cars": (_open_cars, 0.2),
        "imagenet": (_open_simple("imagenet", _build_imagenet), 0.2),
        "eurosat": (_open_eurosat, None),  # no official split: 80/10/10
        "sun397": (_open_sun397, None),
    }
    for name, (opener, val_fraction) in openers.items():
        info = functools.partial(_prompt_info, name)
        _REGISTRY[name] = _Entry(_official_splits(opener, val_fraction), info)
    _REGISTRY["resisc45"] = _Entry(_resisc45, functools.partial(_prompt_info, "resisc45"))


_register_paper_datasets()
