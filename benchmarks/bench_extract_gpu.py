"""Extraction on an accelerator: images/s of plain ``encode_image`` against extraction with
writes (the same images, loader and batch), their ratio, per precision.

``python -m benchmarks extract-gpu``: on CUDA, ViT-B-16 and ViT-L-14 shapes with random weights
at batch 256 over 2,048 images of 224 px (fp32, bf16, fp16); on a machine without CUDA the same
measurement on the tiny model (fp32 and bf16). Writes go to a local temporary folder, removed at
the end. It prints one table and is sized to end within 5 minutes on one GPU.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks._timing import print_table
from residual_core.datasets import load_dataset
from residual_core.engines.extract import extract
from residual_core.formats.feature_store import FeatureStore
from residual_core.identity import EMBEDDED_MODEL
from residual_core.method.decompose import encode
from residual_core.method.models import load_model
from residual_core.stages.extract import Params as ExtractParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from builders import write_image_folder  # noqa: E402

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _encode_only(loaded, dataset: str, batch_size: int, workers: int, precision: str) -> float:
    """Seconds of ``encode_image`` over the split (images moved as extraction moves them)."""
    data = load_dataset(dataset, "train", transform=loaded.preprocess)
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers,
                        pin_memory=loaded.device.type == "cuda")
    dtype = _AUTOCAST[precision]
    start = time.perf_counter()
    for images, _ in loader:
        with torch.autocast(loaded.device.type, dtype, enabled=dtype is not None):
            out = encode(loaded.model, images.to(loaded.device, non_blocking=True))
        out.float().cpu()
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-gpu-"))
    workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if cuda else 0
    if cuda:
        models, batch, size, per_class = ["ViT-B-16", "ViT-L-14"], 256, 224, 1024
        precisions = ["fp32", "bf16", "fp16"]
    else:
        models, batch, size, per_class = [EMBEDDED_MODEL], 256, 32, 1024
        precisions = ["fp32", "bf16"]
    folder = write_image_folder(tmp / "imgs", ["a", "b"], per_class, size=size)
    name = f"imagefolder:{folder}"
    rows = []
    try:
        for model in models:
            loaded = load_model(model, None, device=device)
            for precision in precisions:
                params = ExtractParams(batch_size=batch, rows_per_chunk=batch * 2,
                                       num_workers=workers, device=device, precision=precision,
                                       feature_dtype="float16" if cuda else "float32")
                _encode_only(loaded, name, batch, workers, precision)  # warm-up (and caches)
                t_encode = _encode_only(loaded, name, batch, workers, precision)
                root = tmp / f"{model}-{precision}"
                result = extract(model, None, name, "train", params, store_root=root,
                                 progress=False, loaded=loaded)
                check = FeatureStore.open(result.url).attrs["exactness"]
                n = result.rows_computed
                rows.append([model, precision, batch, n, n / t_encode, n / result.seconds,
                             result.seconds / t_encode, f"{check['sum_vs_forward']:.1e}",
                             f"{check['sum_vs_fp32_forward']:.1e}"])
                shutil.rmtree(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"extraction against encode_image on {where}, {workers} loader workers, random "
          "weights")
    print_table(["model", "precision", "batch", "images", "encode img/s", "extract img/s",
                 "extract / encode", "unit sum vs forward", "vs fp32 forward"], rows)


if __name__ == "__main__":
    main()
