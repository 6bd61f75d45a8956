"""The world's downstream tasks ``world/<attribute>`` as datasets, registered on import
(the images and labels come from :mod:`residual_core.world.rendering`).
"""

from __future__ import annotations

from PIL import Image

from residual_core.datasets.base import DatasetInfo
from residual_core.datasets.registry import list_datasets, register_dataset
from residual_core.world.rendering import (
    ATTRIBUTES,
    CLASSNAMES,
    TASKS,
    TEMPLATES,
    Sample,
    _downstream_pool,
    downstream_samples,
    render,
)

# ------------------------------------------------------------------------------------ datasets


class WorldSource:
    """The downstream pool as a dataset source: ``source[i] -> (PIL RGB image, Sample)``."""

    def __len__(self) -> int:
        return len(_downstream_pool())

    def __getitem__(self, index: int) -> tuple[Image.Image, Sample]:
        sample = _downstream_pool()[index]
        return Image.fromarray(render(sample), mode="RGB"), sample


def _factory(attribute: str):
    def factory(split, data_root, download):  # self-contained: data_root and download unused
        samples, ids = downstream_samples(split)
        return WorldSource(), samples.labels(attribute), ids

    return factory


def register_world_datasets() -> None:
    """Register :data:`TASKS` with :func:`~residual_core.datasets.register_dataset` (idempotent)."""
    for attribute, name in zip(ATTRIBUTES, TASKS):
        info = DatasetInfo(name, list(CLASSNAMES[attribute]), list(TEMPLATES[attribute]))
        register_dataset(name, _factory(attribute), info, overwrite=name in list_datasets())


register_world_datasets()
