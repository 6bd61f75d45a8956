"""The align stage: training from cached features against running the frozen backbone, and the
methods side by side.

1. Seconds per training epoch of ResiDual on the tiny model: from the feature store (held in
   memory, and streamed chunk by chunk) against running the frozen backbone on the same examples
   (``decompose`` + ResiDual forward/backward/step per batch; the preprocessed images are held
   in memory, so the backbone side pays compute only, no image decoding). Same batches of 64,
   same optimizer; interleaved repeats, medians; the ratio is backbone / cached.
2. Trainable parameters, validation and test accuracy, epochs and seconds of every method on the
   same stores (random-weight tiny tower, images whose mean colour depends on the class: zero-shot
   is near chance, the class signal is in the units).

Run: ``python -m benchmarks align`` (single-threaded torch, for stable timings on a shared CPU).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import schedulefree
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from benchmarks._timing import interleaved_medians, print_table
from residual_core.datasets import load_dataset
from residual_core.engines.extract import extract
from residual_core.formats.feature_store import FeatureStore
from residual_core.identity import EMBEDDED_MODEL
from residual_core.method import training
from residual_core.method.adapters import SpectralBases, build_adapter
from residual_core.method.batches import StoreFeatures
from residual_core.method.decompose import decompose, readout_maps
from residual_core.method.models import load_model
from residual_core.stages.extract import Params as ExtractParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from builders import write_image_folder  # noqa: E402

CLASSES = ["ant", "bee", "cow", "dog"]
PER_CLASS = 300  # 1,200 images: 960 train, 120 val, 120 test
BATCH = 64
METHODS = ("zero-shot", "residual-star", "residual-full", "coarse", "linear")
FINETUNE_EPOCHS = 3  # the backbone baseline is slow on a CPU even for the tiny tower


def _step(module, optimizer, y, labels) -> None:
    loss = F.cross_entropy(module.logits(y), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _timings(tiny, dataset: str, stores: dict, bases: SpectralBases, method: str) -> list:
    store = stores["train"]
    module = build_adapter(method, store.units, store.class_weights, bases,
                           head_dim=store.dims.head_dim)
    optimizer = schedulefree.AdamWScheduleFree(module.parameters(), lr=0.8)
    optimizer.train()
    cached = StoreFeatures(store, module.input_units)
    streamed = StoreFeatures(store, module.input_units, cache_bytes=0)
    data = load_dataset(dataset, "train", transform=tiny.preprocess)
    images, labels = map(torch.cat, zip(*DataLoader(data, batch_size=256)))
    maps = readout_maps(tiny.model)
    cols = torch.as_tensor(module.input_units)
    gen = torch.Generator().manual_seed(0)

    def from_features(features):
        def epoch():
            for y, lab in features.batches(BATCH, gen):
                _step(module, optimizer, y, lab)
        return epoch

    def from_backbone():
        order = torch.randperm(len(labels), generator=gen)
        for s in range(0, len(order), BATCH):
            idx = order[s:s + BATCH]
            y = decompose(tiny.model, images[idx], maps=maps).contributions[:, cols]
            _step(module, optimizer, y, labels[idx])

    med = interleaved_medians({"memory": from_features(cached), "stream": from_features(streamed),
                               "backbone": from_backbone}, repeats=5)
    return [method, module.trainable_parameters(), len(labels), med["memory"], med["stream"],
            med["backbone"], med["backbone"] / med["memory"]]


def main() -> None:
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-align-"))
    try:
        _run(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(tmp: Path) -> None:
    folder = write_image_folder(tmp / "imgs", CLASSES, PER_CLASS, size=32)
    dataset = f"imagefolder:{folder}"
    tiny = load_model(EMBEDDED_MODEL, None, device="cpu", seed=0)
    stores = {}
    for split in ("train", "val", "test"):
        res = extract(EMBEDDED_MODEL, None, dataset, split,
                      ExtractParams(batch_size=128, rows_per_chunk=128, num_workers=0, device="cpu"),
                      store_root=tmp / "stores", loaded=tiny, progress=False)
        stores[split] = FeatureStore.open(res.url)
    bases = SpectralBases.from_store(stores["train"])

    print(f"1. seconds per training epoch, {EMBEDDED_MODEL} (random weights), batch {BATCH}, "
          "median of 5 interleaved")
    rows = [_timings(tiny, dataset, stores, bases, m) for m in ("residual-full", "residual-star")]
    print_table(["method", "params", "examples", "cached (RAM) s", "cached (stream) s",
                 "backbone s", "backbone / cached"], rows)

    print(f"\n2. methods on {dataset.split(':')[0]} ({len(CLASSES)} classes; "
          + ", ".join(f"{k} {s.dims.n}" for k, s in stores.items()) + "), seed 0")
    table = []
    for method in METHODS:
        r = training.fit(method, stores["train"], stores["val"], stores["test"], bases,
                      progress=False)
        table.append([method, r.trainable_parameters, r.val_acc, r.test_acc, r.epochs_run,
                      r.best_epoch, r.fit_seconds])
    data = {s: load_dataset(dataset, s, transform=tiny.preprocess)
            for s in ("train", "val", "test")}
    start = time.perf_counter()
    r = training.finetune(tiny, data["train"], data["val"], data["test"], epochs=FINETUNE_EPOCHS,
                       progress=False)
    table.append([f"finetune ({FINETUNE_EPOCHS} ep. max)", r.trainable_parameters, r.val_acc,
                  r.test_acc, r.epochs_run, r.best_epoch, time.perf_counter() - start])
    print_table(["method", "trainable params", "val acc", "test acc", "epochs", "best epoch",
                 "fit s"], table)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU; "
          f"numpy {np.__version__}")


if __name__ == "__main__":
    main()
