"""``imagefolder:PATH`` datasets: a folder of class subfolders, or ``train/`` + ``test/`` (+ ``val/``)
folders of them; every image is decoded once before a split is drawn.

An optional ``PATH/dataset.json`` (:class:`FolderOptions`) names the classes in prompts, gives
the prompt templates and the split fractions and seed::

    {"classnames": {"golden_retriever": "golden retriever"}, "templates": ["a photo of a {}."],
     "val_fraction": 0.1, "test_fraction": 0.1, "seed": 42}

It lies inside the folder, so it is part of the dataset's content identity: editing it makes the
feature stores stale like an edited image.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from residual_core.datasets.base import (
    DEFAULT_TEMPLATES,
    SEED,
    DatasetInfo,
    Factory,
    FileListSource,
)
from residual_core.datasets.splits import _carve_val, split_80_10_10
from residual_core.errors import DatasetNotFoundError, ResidualError
from residual_core.identity import parse_dataset

# ----------------------------------------------------------------------------------------------
# imagefolder:PATH


OPTIONS_FILE = "dataset.json"
"""The options file of an ``imagefolder:`` dataset, inside its folder."""


class FolderOptions(BaseModel):
    """``PATH/dataset.json``: every field optional.

    - ``classnames``: the names used in prompts, per class folder (``{"folder": "name"}``, the
      others keep their folder name) or one per folder in sorted folder order (a list).
    - ``templates``: prompt templates, each with ``{}`` (default ``a photo of a {}.``).
    - ``val_fraction``, ``test_fraction``: stratified fractions of the whole folder (single-folder
      layout; default 0.1 each); with ``train/`` + ``test/`` and no ``val/``, ``val_fraction`` of
      ``train/``. ``seed``: the splits' seed (default 42).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    classnames: dict[str, str] | list[str] | None = None
    templates: list[str] | None = Field(None, min_length=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = SEED

    @model_validator(mode="after")
    def _room_for_train(self) -> "FolderOptions":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must leave room for train, got "
                             f"{self.val_fraction} + {self.test_fraction}")
        return self


def folder_options(path: Path, name: str) -> FolderOptions:
    """The :class:`FolderOptions` of ``path`` (defaults when it has no ``dataset.json``); a bad
    file is one error naming the file, the field and the expected shape."""
    file = path / OPTIONS_FILE
    if not file.is_file():
        return FolderOptions()
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResidualError(f"dataset '{name}': cannot read {file} as JSON ({exc})") from None
    try:
        return FolderOptions.model_validate(data)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
        raise ResidualError(f"dataset '{name}': {file}: {'; '.join(parts)} (fields: classnames "
                            "{folder: name} or [names], templates [\"... {} ...\"], "
                            "val_fraction, test_fraction, seed)") from None


def _imagefolder_path(name: str) -> Path:
    return parse_dataset(name).path


def _imagefolder_class_dir(path: Path) -> Path:
    """The folder whose subfolders are the classes: ``PATH/train`` in the train/test layout."""
    return path / "train" if (path / "train").is_dir() and (path / "test").is_dir() else path


def _class_folders(name: str) -> list[str]:
    """The class folders, sorted: label ``i`` is folder ``i``."""
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
    return classes


def _imagefolder_info(name: str) -> DatasetInfo:
    folders = _class_folders(name)
    options = folder_options(_imagefolder_path(name), name)
    names, file = options.classnames, _imagefolder_path(name) / OPTIONS_FILE
    if isinstance(names, list):
        if len(names) != len(folders):
            raise ResidualError(f"dataset '{name}': {file}: classnames lists {len(names)} names "
                                f"for {len(folders)} class folders ({', '.join(folders)})")
        classnames = list(names)
    else:
        unknown = sorted(set(names or {}) - set(folders))
        if unknown:
            raise ResidualError(f"dataset '{name}': {file}: classnames names folders {unknown} "
                                f"that are not class folders ({', '.join(folders)})")
        classnames = [(names or {}).get(f, f) for f in folders]
    return DatasetInfo(name, classnames, list(options.templates or DEFAULT_TEMPLATES))


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
    classes = _class_folders(info.name)
    extra = sorted(set(find_classes(folder)[0]) - set(classes))
    if extra:
        raise ResidualError(
            f"dataset '{info.name}': {folder} has class folders {extra} that are not among the "
            f"classes of its training folder {classes}"
        )
    try:
        samples = make_dataset(
            str(folder),
            {c: i for i, c in enumerate(classes)},
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
        options = folder_options(path, name)
        folder = functools.partial(_folder_source, info=info, base=path,
                                   skip_bad_images=skip_bad_images)
        if _imagefolder_class_dir(path) == path:
            source, labels = folder(path, complete=True)
            pos = split_80_10_10(labels, options.seed, options.val_fraction,
                                 options.test_fraction)[split]
        elif split == "test" or (split == "val" and (path / "val").is_dir()):
            source, labels = folder(path / split, complete=False)
            pos = np.arange(len(labels), dtype=np.int64)
        else:
            source, labels = folder(path / "train", complete=True)
            if (path / "val").is_dir():
                pos = np.arange(len(labels), dtype=np.int64)
            else:
                pos = _carve_val(labels, split, options.val_fraction, options.seed)
        return source, labels[pos], pos

    return factory
