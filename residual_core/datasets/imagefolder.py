"""``imagefolder:PATH`` datasets: a folder of class subfolders, or ``train/`` + ``test/`` (+ ``val/``)
folders of them; every image is decoded once before a split is drawn."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from residual_core.datasets.base import DEFAULT_TEMPLATES, DatasetInfo, Factory, FileListSource
from residual_core.datasets.splits import _carve_val, split_80_10_10
from residual_core.errors import DatasetNotFoundError, ResidualError
from residual_core.identity import parse_dataset

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
