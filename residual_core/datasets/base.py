"""What a dataset is to the pipeline: its class names and prompts (:class:`DatasetInfo`), one split of it
(:class:`SplitDataset`), what a factory returns, and the seed of every split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import default_loader

from residual_core.errors import ResidualError

SEED = 42
"""Seed of every split."""


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
