"""Cost of ``decompose`` (with the [B, U, E] contributions) against plain ``encode_image``.

Goal: at most 1.15x the plain forward. Same model, same batch, interleaved repeats, medians.
"""

from __future__ import annotations

import torch

from benchmarks._timing import interleaved_medians, print_table
from residual_core.identity import EMBEDDED_MODEL
from residual_core.method.decompose import decompose, readout_maps
from residual_core.method.models import load_model

CASES = [("ViT-B-32", 32, 7), (EMBEDDED_MODEL, 256, 15)]


def main() -> None:
    rows = []
    for name, batch, repeats in CASES:
        model = load_model(name, None, device="cpu", seed=0).model
        size = model.visual.image_size[0]
        images = torch.randn(batch, 3, size, size)
        maps = readout_maps(model)

        def plain():
            with torch.inference_mode():
                return model.encode_image(images)

        def decomposed():
            return decompose(model, images, maps=maps).contributions

        med = interleaved_medians({"plain": plain, "decompose": decomposed}, repeats)
        rows.append([name, batch, med["plain"], med["decompose"],
                     med["decompose"] / med["plain"]])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print_table(["model", "batch", "encode_image s", "decompose s", "ratio (goal <= 1.15)"], rows)


if __name__ == "__main__":
    main()
