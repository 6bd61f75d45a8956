"""The extract stage: the feature store of one dataset split (:func:`residual_core.engines.extract.extract`).

Its key is the store's own config hash (:func:`residual_core.engines.extract.store_config`), so the
stage and the store decide "current" from one identity: the weights, the dataset (and the
content of a dataset given as files), the split's sample ids, the storage dtype, the row chunks,
whether unreadable images were left out, and the format versions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from residual_core.errors import StoreError
from residual_core.identity import FEATURE_DTYPES, parse_weights
from residual_core.layout import Layout
from residual_core.stages.base import RUN_ONLY, Stage, StageInputs, StageParams, StageResult

Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class Part:
    """Part ``index`` of ``count`` of one split's extraction: the row chunks
    ``[index * C // count, (index + 1) * C // count)`` of a store of ``C`` row chunks.

    Parts run at the same time in other processes or machines on one store; the store and its
    config hash do not depend on the part count, so any partition (or a change of it while a
    store is half done) gives the same arrays: each row chunk is claimed before it is written
    and never rewritten once done.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"part {self.index}/{self.count} does not exist: a part is I/P "
                             "with P >= 1 parts and 0 <= I < P (e.g. 0/4 ... 3/4)")

    @classmethod
    def parse(cls, text: str) -> "Part":
        """``"I/P"`` (e.g. ``"2/8"``: the third of eight parts)."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if match is None:
            raise ValueError(f"a part is I/P (part I of P, counted from 0, e.g. 0/4), got "
                             f"{text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    def chunks(self, n_chunks: int) -> range:
        """The row chunks this part owns."""
        return range(self.index * n_chunks // self.count,
                     (self.index + 1) * n_chunks // self.count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class Params(StageParams):
    """Extraction settings; only ``feature_dtype``, ``rows_per_chunk``, ``precision`` and
    ``skip_bad_images`` change what a store holds (``download`` only lets a missing dataset be
    fetched first)."""

    batch_size: int = Field(64, ge=1, json_schema_extra=RUN_ONLY,
                            description="images per forward pass (batches never cross row chunks)")
    feature_dtype: Literal[FEATURE_DTYPES] = Field(
        FEATURE_DTYPES[0], description="storage dtype of the raw features (LN statistics stay "
        "float32); stores of each dtype live side by side")
    rows_per_chunk: int = Field(1024, ge=1,
                                description="rows per chunk: the unit of writing and resuming")
    skip_bad_images: bool = Field(
        False, description="leave out the images of an imagefolder: dataset that cannot be "
        "decoded (listed in the store's skipped_images) instead of refusing the dataset")
    download: bool = Field(
        False, json_schema_extra=RUN_ONLY,
        description="let torchvision download a dataset missing from the data root (cifar10, "
        "cifar100, mnist, svhn, gtsrb, dtd, eurosat, sun397); for any other a missing dataset "
        "stays an error saying where to put it")
    num_workers: int | None = Field(None, ge=0, json_schema_extra=RUN_ONLY,
                                    description="DataLoader worker processes "
                                    "(default min(4, CPUs - 1))")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="arithmetic of the backbone: fp32, or torch autocast to bf16/fp16 "
        "(faster on GPUs; the raw form is still stored in feature_dtype, and the store's "
        "exactness attribute records how far the unit sum is from the forward pass)")
    device: str | None = Field(None, json_schema_extra=RUN_ONLY,
                               description="torch device: cpu, cuda, cuda:N or mps "
                               "(default cuda when present)")
    writer: Literal["process", "thread"] = Field(
        "process", json_schema_extra=RUN_ONLY,
        description="where row chunks are encoded and written behind compute: a writer process "
        "(for a store in a local folder; zarr's encoding holds the GIL, which a thread would "
        "take from compute) or a thread (always used for an fsspec URL store)")

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str | None) -> str | None:
        """A typo is refused here, in the grid or the options; whether the device exists on
        this machine is checked where the model is loaded."""
        if device is not None and not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
            raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N (GPU N) or mps")
        return device


class Inputs(StageInputs):
    """A model's weights on one split, and where stores and datasets live."""

    model: str
    pretrained: str | None = None
    dataset: str
    split: Split
    store_root: str
    data_root: str | None = None

    def store_url(self, params: "Params") -> str:
        """Where the store of these inputs with these parameters (its dtype) lives."""
        return Layout.of(self.store_root).feature_store(
            parse_weights(self.model, self.pretrained), self.dataset, self.split,
            params.feature_dtype)


class Result(StageResult):
    """What an extraction did: the store, and how many row chunks it computed now (for a part:
    of its own chunks; ``busy_chunks`` were being written by another process)."""

    url: str
    computed_chunks: int
    total_chunks: int
    rows_computed: int
    seconds: float
    part: str = "0/1"
    busy_chunks: int = 0
    complete: bool = True

    @property
    def was_cached(self) -> bool:
        return self.computed_chunks == 0


def identity(inputs: Inputs, params: Params) -> dict[str, Any]:
    from residual_core.engines.extract import store_config_hash

    return {"store": inputs.store_url(params),
            "config_hash": store_config_hash(
                parse_weights(inputs.model, inputs.pretrained), inputs.dataset, inputs.split,
                params, data_root=inputs.data_root, store_root=inputs.store_root)}


def is_current(inputs: Inputs, params: Params) -> bool:
    from residual_core.formats.feature_store import FeatureStore

    try:
        store = FeatureStore.open(inputs.store_url(params))
    except StoreError:
        return False
    return store.attrs.get("config_hash") == identity(inputs, params)["config_hash"]


def run(inputs: Inputs, params: Params, progress: bool = False, force: bool = False,
        part: Part | None = None) -> Result:
    """Extract the store (``part``: only that part's row chunks, see :class:`Part`)."""
    from residual_core.engines.extract import extract, loaded_model

    loaded = loaded_model(inputs.model, inputs.pretrained, params.device)
    return extract(inputs.model, inputs.pretrained, inputs.dataset, inputs.split, params,
                   data_root=inputs.data_root, store_root=inputs.store_root, loaded=loaded,
                   progress=progress, part=part)


def discard(inputs: Inputs, params: Params) -> None:
    from residual_core.engines.extract import remove_store

    remove_store(inputs.store_url(params))


STAGE = Stage("extract", 1, ("pretrain",), Params, Inputs, Result, identity, is_current, run,
              discard, summary=("url", "computed_chunks", "total_chunks", "rows_computed",
                                 "seconds"))
