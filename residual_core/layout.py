"""Where everything lives under a root: the one place paths are made (and parsed back).

``<root>`` is a local folder or an fsspec URL (``s3://bucket/residual``, ``memory://x``)::

    <root>/features/<model>/<weights>/<dataset>/<split>.zarr            feature store of a split
    <root>/features/<model>/<weights>/<dataset>/<split>.spectral.zarr   its spectral store
    <root>/features/<model>/<weights>/<dataset>/align.zarr              a task's align weights
    <root>/tables/<table>/<model>/<dataset>/part-<key>.parquet          result tables
    <root>/checkpoints/            pretrained checkpoints (the embedded world)
    <root>/stage-records/          the JSON result of each stage run, by stage key
    <root>/reports/<name>/         Markdown reports and plots
    <root>/cache/manifests/        content manifests of datasets given as files
    <root>/datasets/               the default dataset root

Checkpoints, stage records and manifests are always local (a remote store root keeps them
under the default local root). ``$RESIDUAL_DATA_ROOT`` (default ``./data``) is read here only.
Every name that becomes a path component goes through :func:`component`, which refuses ``..``
and the like. This module imports neither torch nor zarr.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from residual_core.errors import ResidualError
from residual_core.identity import FEATURE_DTYPES, DatasetRef, WeightsId, slug

__all__ = ["DATA_ROOT_ENV", "SPLITS", "FeatureStorePath", "Layout", "component", "data_root",
           "is_local", "local_path", "remove_tree", "zarr_target"]

DATA_ROOT_ENV = "RESIDUAL_DATA_ROOT"
SPLITS = ("train", "val", "test")


def data_root() -> str:
    """``$RESIDUAL_DATA_ROOT`` (``~`` expanded) or ``data``: the default root of everything."""
    value = os.environ.get(DATA_ROOT_ENV)
    return os.path.expanduser(value) if value else "data"


def is_local(url: str | os.PathLike) -> bool:
    """A plain path or a ``file://`` URL."""
    url = str(url)
    return "://" not in url or url.startswith("file://")


def local_path(url: str | os.PathLike) -> Path:
    """The local path of a plain path or ``file://`` URL."""
    url = str(url)
    return Path(url[len("file://"):] if url.startswith("file://") else url)


def zarr_target(url: str) -> str:
    """Local stores as plain paths (Zarr's fsspec store does not create local folders)."""
    return str(local_path(url)) if is_local(url) else url


def remove_tree(url: str) -> None:
    """Delete a store (a folder, local or fsspec) if it exists; a link is removed, never
    followed."""
    if is_local(url):
        path = local_path(url)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def component(name: str, what: str) -> str:
    """``name`` as one path component (:func:`~residual_core.identity.slug`); refuses names
    that are empty or could climb out of the root."""
    if not isinstance(name, str) or not name.strip() or name.strip(". ") == "":
        raise ResidualError(f"invalid {what} name {name!r}: it must be a non-empty name")
    return slug(name)


def _split(split: str) -> str:
    if split not in SPLITS:
        raise ResidualError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return split


def _store_name(split: str, dtype: str, check: bool = True) -> str:
    if dtype not in FEATURE_DTYPES:
        raise ResidualError(f"unknown feature dtype {dtype!r}: use one of "
                            f"{', '.join(FEATURE_DTYPES)}")
    base = _split(split) if check else split
    return f"{base}.zarr" if dtype == FEATURE_DTYPES[0] else f"{base}.{dtype}.zarr"


@dataclass(frozen=True)
class FeatureStorePath:
    """A feature store's place in the layout, parsed back from its URL."""

    layout: "Layout"
    model: str  # path components (slugs), not the real names
    weights: str
    dataset: str
    split: str
    dtype: str = FEATURE_DTYPES[0]


@dataclass(frozen=True)
class Layout:
    """The paths of everything under one root (see the module docstring)."""

    root: str

    @classmethod
    def of(cls, root: str | os.PathLike | None = None) -> "Layout":
        """The layout of ``root`` (default :func:`data_root`); local roots are ``~``-expanded."""
        root = str(root) if root is not None else data_root()
        if is_local(root):
            root = os.path.expanduser(root)
        return cls(root.rstrip("/") or "/")

    def check_root(self) -> "Layout":
        """This layout, refused in one line when its local root cannot be a folder (a file, or
        a path below a file): call it before creating anything under the root."""
        if is_local(self.root):
            path = local_path(self.root)
            existing = next((p for p in (path, *path.parents) if p.exists()), None)
            if existing is not None and not existing.is_dir():
                raise ResidualError(
                    f"store root {self.root}: {existing} is a file, not a folder; pass a folder "
                    "(it is created if missing) as --store-root")
        return self

    def _join(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    # ---------------------------------------------------------------- stores
    def feature_store(self, weights: WeightsId, dataset: str, split: str,
                      dtype: str = FEATURE_DTYPES[0]) -> str:
        """The feature store of (weights, dataset, split) in this storage dtype:
        ``<split>.zarr`` for the default dtype, ``<split>.<dtype>.zarr`` beside it for another
        (so the stores of each dtype coexist)."""
        return self._join("features", component(weights.model, "model"), weights.slug,
                          component(dataset, "dataset"), _store_name(split, dtype))

    def text_embeddings(self, weights: WeightsId, dictionary_sha1: str) -> str:
        """The cached text embeddings of a dictionary (by content) under some weights:
        ``<root>/text/<model>/<weights>/<sha1[:16]>.zarr``."""
        return self._join("text", component(weights.model, "model"), weights.slug,
                          f"{dictionary_sha1[:16]}.zarr")

    def task_folder(self, weights: WeightsId, dataset: str) -> str:
        """The folder of a task's stores (``.../<model>/<weights>/<dataset>``)."""
        return self.feature_store(weights, dataset, "train").rsplit("/", 1)[0]

    @staticmethod
    def spectral_store(feature_url: str) -> str:
        """A feature store's spectral store, next to it: ``train.zarr -> train.spectral.zarr``."""
        base = feature_url[:-len(".zarr")] if feature_url.endswith(".zarr") else feature_url
        return f"{base}.spectral.zarr"

    @classmethod
    def align_weights(cls, train_url: str) -> str:
        """A task's align weights (λ per unit): ``align.zarr`` next to its train store
        (``align.<dtype>.zarr`` for a train store of a non-default dtype)."""
        folder, name = train_url.rstrip("/").rsplit("/", 1)
        where = cls.parse_feature_store(train_url)
        dtype = where.dtype if where else FEATURE_DTYPES[0]
        return f"{folder}/{_store_name('align', dtype, check=False)}"

    @classmethod
    def parse_feature_store(cls, url: str) -> FeatureStorePath | None:
        """The layout and names a feature store URL was made from, or ``None`` for a store that
        does not live in a layout (a path the user chose)."""
        head, sep, rest = str(url).rstrip("/").rpartition("/features/")
        parts = rest.split("/")
        if not sep or len(parts) != 4 or not parts[3].endswith(".zarr"):
            return None
        split, _, dtype = parts[3][:-len(".zarr")].partition(".")
        if split not in SPLITS or (dtype and dtype not in FEATURE_DTYPES[1:]):
            return None  # a spectral store, align weights, or a name the layout never makes
        return FeatureStorePath(cls(head or "/"), parts[0], parts[1], parts[2], split,
                                dtype or FEATURE_DTYPES[0])

    @classmethod
    def of_store(cls, feature_url: str) -> "Layout":
        """The layout a feature store (or its spectral store or align weights) lives in (the
        default one for a store outside any)."""
        where = cls.parse_feature_store(cls._feature_store_of(feature_url))
        return where.layout if where else cls.of()

    @classmethod
    def location(cls, url: str) -> str:
        """Where a store lives, independent of its content and of the root's own path:
        ``<model>/<weights>/<dataset>/<name>`` inside a layout, else the URL. Result rows are
        keyed by the location of what they were computed from, so a store rewritten with
        another configuration has its rows replaced, never kept beside the new ones."""
        where = cls.parse_feature_store(cls._feature_store_of(url))
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if where is None:
            return url.rstrip("/")
        return "/".join((where.model, where.weights, where.dataset, name))

    @staticmethod
    def _feature_store_of(url: str) -> str:
        """The feature store a spectral store or align weights belong to (itself otherwise)."""
        url = url.rstrip("/")
        if url.endswith(".spectral.zarr"):
            return url[:-len(".spectral.zarr")] + ".zarr"
        folder, _, name = url.rpartition("/")
        if name.startswith("align.") and name.endswith(".zarr"):
            return f"{folder}/train{name[len('align'):]}"
        return url

    def sibling_feature_store(self, of: FeatureStorePath, dataset: str, split: str) -> str:
        """The store of another dataset/split of the same weights as ``of``."""
        return self._join("features", of.model, of.weights, component(dataset, "dataset"),
                          _store_name(split, of.dtype))

    def feature_stores(self, model: str | None = None) -> list[str]:
        """Every feature store under this (local) root, of ``model`` when given, sorted (what
        :meth:`parse_feature_store` recognises; spectral stores and align weights are not)."""
        if not is_local(self.root):
            raise ResidualError(f"listing stores needs a local root, got {self.root}")
        base = local_path(self._join("features"))
        if model is not None:
            base = base / component(model, "model")
        found = base.glob("**/*.zarr") if base.is_dir() else ()
        return sorted(str(p) for p in found if self.parse_feature_store(str(p)) is not None)

    # ---------------------------------------------------------------- tables and files
    @property
    def tables(self) -> Path:
        """The root of the Parquet tables (local)."""
        return local_path(self._join("tables"))

    @property
    def local_root(self) -> Path:
        """This root when it is local, else the default local root (for what must be local)."""
        return local_path(self.root) if is_local(self.root) else Path(data_root())

    @property
    def checkpoints(self) -> Path:
        return self.local_root / "checkpoints"

    @property
    def stage_records(self) -> Path:
        """The JSON record of each stage run, by stage key (what a rerun returns as cached)."""
        return self.local_root / "stage-records"

    def reports(self, name: str) -> Path:
        return self.local_root / "reports" / component(name, "report")

    def manifest(self, dataset: DatasetRef) -> Path:
        """The cached content manifest of a dataset given as files (an ``imagefolder:``
        folder, an ``hf-dataset:`` folder or Hub id)."""
        return self.local_root / "cache" / "manifests" / f"{slug(str(dataset.manifest_key))}.json"

    @property
    def datasets(self) -> Path:
        """The default dataset root: ``<root>/datasets`` (local)."""
        return self.local_root / "datasets"
