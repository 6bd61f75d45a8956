"""Benchmark of the explain stage (heads described in text).

1. The engine on a real store: the tiny model (random weights) on 2048 images of an image
   folder, every head explained with the 3,498-description TextSpan dictionary, seconds per head
   (text embeddings cached beforehand) against the spectral stage's seconds per unit on the same
   store (PCA and TwoNN), measured in one run.
2. The core at ViT-L/14 shapes (one head: N contributions of width E = 768, the 3,498-text
   dictionary, rank 50): seconds and peak traced memory of TextSpan and SOMP against one
   per-unit PCA of the same head (``pca_units`` on a Dask array), for N = 5,000 and 20,000. Every
   call holds one head only, so explaining all 384 heads of ViT-L/14 needs this memory, not 384
   times it.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._timing import print_table  # noqa: E402

N_TEXTS, WIDTH, RANK = 3498, 768, 50


def _engine(tmp: Path) -> None:
    import torch

    from residual_core.engines import explain
    from residual_core.engines.extract import extract
    from residual_core.engines.spectral import run_spectral
    from residual_core.formats.feature_store import FeatureStore
    from residual_core.identity import EMBEDDED_MODEL, WeightsId
    from residual_core.layout import Layout
    from residual_core.method.models import load_model
    from residual_core.stages.explain import Params
    from residual_core.stages.extract import Params as ExtractParams

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from builders import write_image_folder

    torch.set_num_threads(1)
    folder = write_image_folder(tmp / "imgs", [f"c{i}" for i in range(8)], 256, size=32)
    tiny = load_model(EMBEDDED_MODEL, None, device="cpu")
    root = tmp / "st"
    url = extract(EMBEDDED_MODEL, None, f"imagefolder:{folder}", "train",
                  ExtractParams(num_workers=0, device="cpu"), store_root=root, loaded=tiny,
                  progress=False).url
    store = FeatureStore.open(url)
    start = time.perf_counter()
    run_spectral(url, tables_root=str(root), progress=False)
    spectral_per_unit = (time.perf_counter() - start) / len(store.units)
    dictionary = explain.load_dictionary("textspan")
    start = time.perf_counter()
    explain.text_embeddings(tiny, WeightsId(EMBEDDED_MODEL, None), dictionary, Layout.of(root))
    embed_s = time.perf_counter() - start
    rows = []
    for method in ("textspan", "somp"):
        params = Params(method=method, texts_per_head=10, rank=RANK)
        start = time.perf_counter()
        result = explain.run_explain(url, params, tables_root=str(root))
        per_head = (time.perf_counter() - start) / result.heads
        rows.append([method, result.heads, per_head, spectral_per_unit,
                     per_head / spectral_per_unit])
    print(f"1. engine, {EMBEDDED_MODEL} (E=64) on 2048 images, dictionary textspan "
          f"({len(dictionary.texts)} texts, embedded once in {embed_s:.1f} s), 10 texts per head")
    print_table(["method", "heads", "s / head", "spectral s / unit", "ratio"], rows)


def _core() -> None:
    import dask.array as da

    from residual_core.method.explain import somp, textspan
    from residual_core.method.spectral import pca_units

    rng = np.random.default_rng(0)
    texts = rng.standard_normal((N_TEXTS, WIDTH)).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    rows = []
    for n in (5000, 20000):
        # a head: rank-64 signal (its dh) plus a little noise, in the 768-d output space
        y = (rng.standard_normal((n, 64)) @ rng.standard_normal((64, WIDTH))
             + 0.01 * rng.standard_normal((n, WIDTH))).astype(np.float32)
        calls = {"textspan (10 texts)": lambda: textspan(y, texts, 10, rank=RANK),
                 "somp (10 atoms)": lambda: somp(y, texts, 10),
                 "PCA of the head": lambda: pca_units(
                     da.from_array(y[:, None], chunks=(4096, 1, WIDTH)))}
        for name, call in calls.items():
            tracemalloc.start()
            start = time.perf_counter()
            call()
            seconds = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            rows.append([n, name, seconds, peak, y.nbytes / 2**20])
    print(f"\n2. one head at ViT-L/14 width (E={WIDTH}), {N_TEXTS} texts, rank {RANK}")
    print_table(["N", "call", "seconds", "peak traced MB", "head MB (float32)"], rows)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-explain-"))
    try:
        _engine(tmp)
        _core()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
