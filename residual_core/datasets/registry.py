"""The dataset registry and the public entry points: :func:`register_dataset`, :func:`list_datasets`,
:func:`dataset_info`, :func:`load_dataset`."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from residual_core.datasets.base import DatasetInfo, Factory, SplitDataset, validate_labels
from residual_core.datasets.hf import _hf_dataset, _hf_info
from residual_core.datasets.imagefolder import _imagefolder, _imagefolder_info
from residual_core.errors import DatasetNotFoundError, ResidualError
from residual_core.identity import (
    HF_DATASET_PREFIX,
    IMAGEFOLDER_PREFIX,
    canonical_dataset,
    parse_dataset,
)
from residual_core.layout import SPLITS, Layout

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
    if not key or key.startswith((IMAGEFOLDER_PREFIX, HF_DATASET_PREFIX)):
        raise ResidualError(f"invalid dataset name {name!r} ('{IMAGEFOLDER_PREFIX}' and "
                            f"'{HF_DATASET_PREFIX}' are reserved)")
    if key in _REGISTRY and not overwrite:
        raise ResidualError(f"dataset '{key}' is already registered (pass overwrite=True)")
    if info.name != key:
        raise ResidualError(f"DatasetInfo.name {info.name!r} differs from the name {key!r}")
    _REGISTRY[key] = _Entry(factory, lambda: info)


def list_datasets() -> list[str]:
    """Names of all registered datasets, sorted (``imagefolder:PATH`` and
    ``hf-dataset:SOURCE`` are always available too)."""
    return sorted(_REGISTRY)


def _entry(name: str, skip_bad_images: bool = False) -> tuple[str, _Entry]:
    if name.startswith(IMAGEFOLDER_PREFIX):
        return name, _Entry(_imagefolder(name, skip_bad_images), lambda: _imagefolder_info(name))
    if name.startswith(HF_DATASET_PREFIX):
        parse_dataset(name)  # a malformed name fails here, before anything is read
        return name, _Entry(_hf_dataset(name), lambda: _hf_info(name))
    key = name.strip().lower()
    if key in _REGISTRY:
        return key, _REGISTRY[key]
    close = difflib.get_close_matches(key, list_datasets(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise DatasetNotFoundError(
        f"unknown dataset {name!r}.{hint} Known datasets: {', '.join(list_datasets())}; "
        f"or use '{IMAGEFOLDER_PREFIX}PATH' for a folder of class subfolders, "
        f"'{HF_DATASET_PREFIX}NAMESPACE/NAME' for a Hugging Face dataset in the local cache or "
        f"'{HF_DATASET_PREFIX}PATH' for one written by save_to_disk."
    )


def dataset_info(name: str) -> DatasetInfo:
    """Class names and templates of a dataset, without reading its data.

    (``imagefolder:PATH`` lists the class folders of ``PATH``, ``hf-dataset:`` opens the
    dataset's metadata; neither reads an image.)
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

    ``data_root`` defaults to ``Layout.of().datasets`` (a bare ``imagefolder:NAME`` is the
    folder ``NAME`` under it); ``download=True`` lets torchvision fetch
    a missing dataset that it can download (nothing is downloaded otherwise; for the others,
    ``imagefolder:`` and ``hf-dataset:`` included, a missing dataset is an error that says it
    cannot be downloaded, and where to put it).
    ``skip_bad_images``: an ``imagefolder:`` dataset leaves out the files PIL cannot decode
    (listed in :attr:`SplitDataset.skipped`) instead of refusing them; other datasets ignore it.

    Raises:
        DatasetNotFoundError: unknown name, or data not where it is expected (the message says
            what was expected, at which path, and how to get it).
        ResidualError: unknown split, labels outside the class list, malformed data, an image
            of an ``imagefolder:`` dataset that cannot be decoded.
    """
    root = Path(data_root).expanduser() if data_root is not None else Layout.of().datasets
    key, entry = _entry(canonical_dataset(name, root), skip_bad_images)
    if split not in SPLITS:
        raise ResidualError(
            f"unknown split {split!r} for dataset '{key}': expected one of {', '.join(SPLITS)}"
        )
    try:
        info = entry.info()
        source, labels, indices = entry.factory(split, root, download)
    except DatasetNotFoundError as e:
        if download and parse_dataset(key).is_files and "never download" not in str(e):
            raise DatasetNotFoundError(
                f"{e} (download: '{IMAGEFOLDER_PREFIX}' and '{HF_DATASET_PREFIX}' datasets are "
                "local files and are never downloaded)") from e
        raise
    validate_labels(labels, info)
    return SplitDataset(source, labels, indices, info, split, transform,
                        skipped=getattr(source, "skipped", ()))
