"""Cost of ``decompose`` (with the [B, U, E] contributions) against the plain forward.

Goal: at most 1.10x the plain forward (``encode_image`` for open_clip, the model's own forward
for transformers towers: ViT-B-sized DINOv2 at 224 px / patch 14 and HF CLIP ViT-B/16, random
weights from configs). Same model, same batch, interleaved repeats, medians.
"""

from __future__ import annotations

import torch

from benchmarks._timing import interleaved_medians, print_table
from residual_core.identity import EMBEDDED_MODEL
from residual_core.method.decompose import decompose, encode, readout_maps
from residual_core.method.models import load_model

CASES = [("ViT-B-32", 32, 7), (EMBEDDED_MODEL, 256, 15), ("hf dinov2 ViT-B/14", 8, 5),
         ("hf clip ViT-B/16", 8, 5)]


def _hf_model(name: str) -> torch.nn.Module:
    """A ViT-B-sized transformers tower with random weights (no download)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, \
        Dinov2Model

    torch.manual_seed(0)
    if "dinov2" in name:
        return Dinov2Model(Dinov2Config(image_size=224, patch_size=14)).eval()
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=224, patch_size=16, projection_dim=512)).eval()


def main() -> None:
    rows = []
    for name, batch, repeats in CASES:
        if name.startswith("hf "):
            model, size = _hf_model(name), 224
        else:
            model = load_model(name, None, device="cpu", seed=0).model
            size = model.visual.image_size[0]
        images = torch.randn(batch, 3, size, size)
        maps = readout_maps(model)

        def plain():
            return encode(model, images)

        def decomposed():
            return decompose(model, images, maps=maps).contributions

        med = interleaved_medians({"plain": plain, "decompose": decomposed}, repeats)
        rows.append([name, batch, med["plain"], med["decompose"],
                     med["decompose"] / med["plain"]])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print_table(["model", "batch", "plain forward s", "decompose s", "ratio (goal <= 1.10)"], rows)


if __name__ == "__main__":
    main()
