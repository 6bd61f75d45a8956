"""The main job on the embedded default (grows with the pipeline stages).

Current stage: decompose a batch of real photographs (scikit-learn's bundled sample images, cut
into random crops) with the embedded tiny CLIP, print the unit table and check that the units
sum to ``encode_image`` exactly.
"""

from __future__ import annotations

import time

import torch

from residual_core.decompose import decompose
from residual_core.models import EMBEDDED_MODEL, load_model
from residual_core.sample_images import sample_crops
from residual_core.units import format_unit_table


def run_demo(batch_size: int = 16, seed: int = 0) -> int:
    """Decompose a batch with the embedded model and print the unit table and exactness check."""
    loaded = load_model(EMBEDDED_MODEL, None, device="cpu", seed=seed)
    size = loaded.model.visual.image_size[0]
    images = torch.stack([loaded.preprocess(im) for im in sample_crops(batch_size, size, seed)])
    start = time.perf_counter()
    dec = decompose(loaded.model, images)
    contributions = dec.contributions
    seconds = time.perf_counter() - start
    with torch.inference_mode():
        reference = loaded.model.encode_image(images).float()
    maps = dec.maps
    print(f"model: {EMBEDDED_MODEL} (random weights, seed {seed}); L={maps.n_layers}, "
          f"H={maps.n_heads}, dh={maps.head_dim}, D={maps.width}, E={maps.embed_dim}")
    print(f"units: U = 1 + L + L*H = {len(dec.units)}")
    print(format_unit_table(dec.units))
    err = (contributions.sum(1) - reference).norm(dim=-1) / reference.norm(dim=-1)
    norms = contributions.norm(dim=-1).mean(0)
    top = torch.argsort(norms, descending=True)[:5].tolist()
    print(f"\ndecomposed {batch_size} images in {seconds * 1000:.1f} ms; "
          f"contributions {tuple(contributions.shape)}")
    print("largest units by mean ||y_u||: " +
          ", ".join(f"{dec.units[i].name}={norms[i]:.3f}" for i in top))
    ok = bool(err.max() < 1e-4)
    print(f"exactness: max_b ||sum_u y_u - encode_image|| / ||encode_image|| = {err.max():.2e} "
          f"({'OK' if ok else 'FAILED'}, tolerance 1e-4)")
    return 0 if ok else 1
