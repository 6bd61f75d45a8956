"""``hf-dataset:SOURCE[?OPTIONS]`` datasets: a Hugging Face ``datasets`` dataset read from a folder
written by ``save_to_disk`` or, for a Hub id, from the local ``datasets`` cache, offline (the Hub
is never asked: what ``HF_DATASETS_OFFLINE=1`` does, for these calls only).

- Columns: ``image=`` / ``label=`` name them; by default the only ``Image`` column and the only
  ``ClassLabel`` column (none, or two candidates, is an error listing the columns). Class names
  are the ``ClassLabel`` names; templates those of the paper dataset the source's last component
  names (``tanganke/eurosat``: eurosat's), or ``templates=NAME|default``.
- Splits: the dataset's own ``train`` and ``test`` (and ``validation`` or ``val``, else a
  stratified part of train, seed 42: 20% when the source is named like svhn, dtd, stanford_cars
  or imagenet, as the authors carve those, else 10%; :func:`val_fraction`); a dataset with a
  single split (or a plain ``Dataset``) is drawn 80/10/10, as the authors draw EuroSAT and
  SUN397. Sample ids are row positions within the source split.
- Identity (:func:`content_identity`): each split's fingerprint and the content hash of the
  Arrow and metadata files it is read from, so that a dataset saved again (or re-downloaded)
  makes its feature stores stale.

The ``datasets`` package is imported only when such a dataset is used.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from residual_core.datasets.base import DEFAULT_TEMPLATES, DatasetInfo, Factory
from residual_core.datasets.splits import _carve_val, split_80_10_10
from residual_core.errors import DatasetNotFoundError, ResidualError
from residual_core.identity import HF_DATASET_PREFIX, DatasetRef, files_identity, parse_dataset

VAL_SPLITS = ("validation", "val")
"""Names of a dataset's own validation split (else val is carved from train)."""

_SAVED = "a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk"
_LOCK = threading.RLock()


def _hf():
    try:
        import datasets
    except ImportError as e:
        raise ResidualError(
            f"{HF_DATASET_PREFIX} datasets need the Hugging Face 'datasets' package: "
            "pip install 'datasets>=5.2,<6'") from e
    return datasets


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


@contextmanager
def _offline() -> Iterator[Any]:
    """``datasets`` with the Hub switched off (no request can leave), its cache warnings and
    progress bars silenced; everything restored afterwards."""
    datasets = _hf()
    import importlib

    import huggingface_hub.constants as hub

    hf_logging = importlib.import_module("datasets.utils.logging")
    hf_tqdm = importlib.import_module("datasets.utils.tqdm")  # the module, not its tqdm class

    flags = [(module, attr) for module, attr in ((datasets.config, "HF_HUB_OFFLINE"),
                                                 (datasets.config, "HF_DATASETS_OFFLINE"),
                                                 (hub, "HF_HUB_OFFLINE")) if hasattr(module, attr)]
    with _LOCK:
        saved = [getattr(module, attr) for module, attr in flags]
        verbosity, bars_off = hf_logging.get_verbosity(), hf_tqdm.are_progress_bars_disabled()
        for module, attr in flags:
            setattr(module, attr, True)
        hf_logging.set_verbosity_error()
        hf_tqdm.disable_progress_bars()
        try:
            yield datasets
        finally:
            for (module, attr), value in zip(flags, saved):
                setattr(module, attr, value)
            hf_logging.set_verbosity(verbosity)
            if not bars_off:
                hf_tqdm.enable_progress_bars()


def _open(ref: DatasetRef) -> dict[str | None, Any]:
    """The splits of the dataset (``{None: dataset}`` for a plain ``Dataset``), memory-mapped
    (the loaders' ``cache_files`` are then the files :func:`content_identity` hashes)."""
    hf = ref.hf
    if hf.path is not None and not hf.path.is_dir():
        raise DatasetNotFoundError(
            f"dataset '{ref.name}': {hf.path} does not exist; expected {_SAVED} (or a "
            f"Hub id, {HF_DATASET_PREFIX}NAMESPACE/NAME, read from the local cache)")
    with _offline() as datasets:
        if hf.path is not None:
            try:
                loaded = datasets.load_from_disk(str(hf.path), keep_in_memory=False)
            except FileNotFoundError as e:
                raise DatasetNotFoundError(
                    f"dataset '{ref.name}': {hf.path} is not {_SAVED} (no dataset_dict.json, "
                    f"or no dataset_info.json and state.json); save the dataset there with "
                    f"save_to_disk [{_one_line(e)}]") from e
            except Exception as e:  # noqa: BLE001  damaged Arrow or JSON files
                raise ResidualError(f"dataset '{ref.name}': {hf.path} cannot be read as "
                                    f"{_SAVED} ({_one_line(e)}); save it again") from e
        else:
            if Path(hf.source).is_dir():
                raise ResidualError(
                    f"dataset '{ref.name}': {hf.source!r} is both a Hub id and a folder here; "
                    f"write {HF_DATASET_PREFIX}./{hf.source} for the folder")
            configs = _cached_configs(datasets, hf.source)
            if hf.config is None and len(configs) > 1:  # else the newest one would be read
                raise DatasetNotFoundError(
                    f"dataset '{ref.name}': the local Hugging Face datasets cache holds "
                    f"{len(configs)} configurations of {hf.source!r} ({', '.join(configs)}): "
                    f"name one with ?config=NAME")
            try:
                loaded = datasets.load_dataset(hf.source, hf.config, keep_in_memory=False)
            except Exception as e:  # noqa: BLE001  ConnectionError, FileNotFoundError, ValueError
                config = f", {hf.config!r}" if hf.config else ""
                if "configuration" in str(e) and "cache" in str(e):  # several cached configs
                    raise DatasetNotFoundError(
                        f"dataset '{ref.name}': the local Hugging Face datasets cache holds "
                        f"several configurations of {hf.source!r} or not the one named: name "
                        f"one with ?config=NAME [{_one_line(e)}]") from e
                raise DatasetNotFoundError(
                    f"dataset '{ref.name}' is not in the local Hugging Face datasets cache "
                    f"({datasets.config.HF_DATASETS_CACHE}; hf-dataset: never downloads): load "
                    f"it once where the Hub is reachable (datasets.load_dataset({hf.source!r}"
                    f"{config})), or save it with save_to_disk and use "
                    f"{HF_DATASET_PREFIX}/path/to/that/folder [{_one_line(e)}]") from e
    if isinstance(loaded, datasets.Dataset):
        return {None: loaded}
    if not isinstance(loaded, datasets.DatasetDict) or not loaded:
        raise ResidualError(f"dataset '{ref.name}': expected a Dataset or a DatasetDict with "
                            f"splits, got {type(loaded).__name__}")
    return dict(loaded)


def _cached_configs(datasets: Any, source: str) -> list[str]:
    """The configurations of a Hub dataset in the local cache (where ``datasets`` keeps them:
    ``<cache>/<namespace>___<name>/<config>/<version>/<hash>/``)."""
    from datasets.naming import camelcase_to_snakecase

    parts = source.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = Path(str(datasets.config.HF_DATASETS_CACHE)).expanduser() / "___".join(parts)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir()
                  if d.is_dir() and any(d.glob("*/*/dataset_info.json")))


def _parts(splits: dict[str | None, Any], name: str) -> dict[str, str | None]:
    """Which source split each part is: ``{"train", "test", "val"}`` (``val`` ``None``: carved
    from train) or ``{"all"}`` (a single split, drawn 80/10/10)."""
    if "train" in splits and "test" in splits:
        own = [v for v in VAL_SPLITS if v in splits]
        if len(own) > 1:
            raise ResidualError(f"dataset '{name}' has both a 'validation' and a 'val' split; "
                                "save it with one of them")
        return {"train": "train", "test": "test", "val": own[0] if own else None}
    if len(splits) == 1:
        return {"all": next(iter(splits))}
    raise ResidualError(
        f"dataset '{name}' has splits {sorted(map(str, splits))}: expected 'train' and 'test' "
        "(and optionally 'validation' or 'val'), or a single split (drawn 80/10/10); save it "
        "as a DatasetDict with those split names")


def _describe(feature: Any) -> str:
    kind = type(feature).__name__
    if kind == "ClassLabel":
        return f"ClassLabel of {feature.num_classes} classes"
    if kind == "Value":
        return f"Value({feature.dtype})"
    return kind


def _column(ds: Any, name: str, chosen: str | None, what: str) -> str:
    """The ``image`` (an ``Image`` feature) or ``label`` (a ``ClassLabel``) column."""
    datasets = _hf()
    kind, option = ((datasets.Image, "image") if what == "image" else
                    (datasets.ClassLabel, "label"))
    fix = ({"image": f"cast it to images (ds.cast_column(COLUMN, datasets.Image())) and "
                     f"save it again",
            "label": "encode it as class labels (ds.class_encode_column(COLUMN), or cast it to "
                     "datasets.ClassLabel(names=[...])) and save it again"}[option])
    features = ds.features
    columns = ", ".join(f"{c} ({_describe(f)})" for c, f in features.items())
    if chosen is not None:
        if chosen not in features:
            raise ResidualError(f"dataset '{name}' has no column {chosen!r} (columns: {columns}); "
                                f"name one of them with {option}=COLUMN")
        if not isinstance(features[chosen], kind):
            raise ResidualError(
                f"dataset '{name}': column {chosen!r} is a {_describe(features[chosen])}, not "
                f"an {kind.__name__} column: {fix.replace('COLUMN', repr(chosen))}")
        return chosen
    found = [c for c, f in features.items() if isinstance(f, kind)]
    if not found:
        raise ResidualError(f"dataset '{name}' has no {kind.__name__} column (columns: "
                            f"{columns}): {fix}, or name it with {option}=COLUMN")
    if len(found) > 1:
        raise ResidualError(f"dataset '{name}' has {len(found)} {kind.__name__} columns "
                            f"({', '.join(found)}): name one with ?{option}=COLUMN, e.g. "
                            f"{name}{'&' if '?' in name else '?'}{option}={found[0]}")
    return found[0]


def _templates(ref: DatasetRef) -> list[str]:
    from residual_core.datasets.paper import _prompts  # the prompt file

    prompts = _prompts()
    chosen = ref.hf.templates
    if chosen is None:
        return list(prompts.get(ref.hf.short_name, {"templates": DEFAULT_TEMPLATES})["templates"])
    if chosen == "default":
        return list(DEFAULT_TEMPLATES)
    if chosen not in prompts:
        raise ResidualError(f"dataset '{ref.name}': templates={chosen!r} is not a dataset of the "
                            f"prompt file; use default or one of {', '.join(sorted(prompts))}")
    return list(prompts[chosen]["templates"])


class _Opened:
    """An opened ``hf-dataset:``: its splits, parts, columns and :class:`DatasetInfo`."""

    def __init__(self, name: str) -> None:
        self.ref = parse_dataset(name)
        self.splits = _open(self.ref)
        self.parts = _parts(self.splits, name)
        first = self.splits[self.parts.get("train", self.parts.get("all"))]
        self.image = _column(first, name, self.ref.hf.image, "image")
        self.label = _column(first, name, self.ref.hf.label, "label")
        classnames = list(first.features[self.label].names)
        for key in self.used:
            ds = self.splits[key]
            if self.image not in ds.features or self.label not in ds.features:
                raise ResidualError(f"dataset '{name}': split {key!r} lacks the column "
                                    f"{self.image!r} or {self.label!r} of its other splits")
            names = getattr(ds.features[self.label], "names", None)
            if names != classnames:
                raise ResidualError(
                    f"dataset '{name}': split {key!r} has the class names {names} but the "
                    f"others {classnames}; save every split with the same ClassLabel")
        self.info = DatasetInfo(name, classnames, _templates(self.ref))

    @property
    def used(self) -> list[str | None]:
        """The source splits the project's splits are drawn from."""
        if "all" in self.parts:
            return [self.parts["all"]]
        return [k for k in (self.parts["train"], self.parts["test"], self.parts["val"])
                if k is not None]

    def part(self, key: str | None) -> tuple["HfSplitSource", np.ndarray]:
        ds = self.splits[key]
        labels = np.asarray(ds.with_format("numpy", columns=[self.label])[:][self.label],
                            dtype=np.int64)
        return HfSplitSource(ds.select_columns([self.image]), self.image, labels), labels


class HfSplitSource:
    """One split of a Hugging Face dataset: ``source[i] -> (PIL image, label)`` (memory-mapped,
    so it pickles to DataLoader workers by file name)."""

    def __init__(self, dataset: Any, column: str, labels: np.ndarray) -> None:
        self.dataset, self.column, self.labels = dataset, column, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.dataset[int(index)][self.column]
        if isinstance(image, dict):  # an Image(decode=False) column: {"bytes", "path"}
            image = _hf().Image().decode_example(image)
        return image, int(self.labels[index])


def val_fraction(ref: DatasetRef) -> float:
    """The fraction of train carved as val: the paper dataset's the source is named like
    (``ufldl-stanford/svhn``, ``tanganke/stanford_cars``, ``tanganke/dtd``: 20%, as the authors),
    else 10%."""
    from residual_core.datasets.paper import VAL_FRACTIONS

    return VAL_FRACTIONS.get(ref.hf.short_name) or 0.1


def _hf_info(name: str) -> DatasetInfo:
    return _Opened(name).info


def _hf_dataset(name: str) -> Factory:
    def factory(split: str, data_root: Path, download: bool):  # local only: data_root unused
        opened = _Opened(name)
        parts = opened.parts
        if "all" in parts:
            source, labels = opened.part(parts["all"])
            pos = split_80_10_10(labels)[split]
        elif split == "test" or (split == "val" and parts["val"] is not None):
            source, labels = opened.part(parts[split])
            pos = np.arange(len(labels), dtype=np.int64)
        else:  # train, or val carved from it when the dataset has no validation split
            source, labels = opened.part(parts["train"])
            if parts["val"] is not None:
                pos = np.arange(len(labels), dtype=np.int64)
            else:
                pos = _carve_val(labels, split, val_fraction(opened.ref))
        return source, labels[pos], pos

    return factory


def content_identity(ref: DatasetRef, cache: str | os.PathLike | None = None) -> dict[str, Any]:
    """What an ``hf-dataset:``'s content is: the ``_fingerprint`` of each split it is read from
    and a digest of the files behind them (their Arrow files and the metadata beside them),
    hashed once and then reused from the manifest ``cache`` while size and mtime hold."""
    opened = _Opened(ref.name)
    fingerprints, paths = {}, []
    for key in opened.used:
        ds = opened.splits[key]
        fingerprints["all" if key is None else key] = ds._fingerprint
        arrow = [Path(f["filename"]) for f in ds.cache_files]
        if not arrow:  # never: both loaders memory-map (keep_in_memory=False)
            raise ResidualError(f"dataset '{ref.name}': split {key!r} is not backed by files")
        meta = [p for d in dict.fromkeys(a.parent for a in arrow)
                for p in (d / "dataset_info.json", d / "state.json") if p.is_file()]
        paths.extend(arrow + meta)
    paths = list(dict.fromkeys(p.resolve() for p in paths))
    base = Path(os.path.commonpath([p.parent for p in paths]))
    return {"hf_fingerprints": fingerprints,
            **files_identity(((p.relative_to(base).as_posix(), p) for p in paths), cache)}
