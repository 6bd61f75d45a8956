"""Real photographs that ship with scikit-learn, cut into crops: offline test and demo inputs."""

from __future__ import annotations

import numpy as np
from PIL import Image


def sample_crops(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """``n`` random square crops (side between ``size`` and 4×``size``, at most the photo's
    height) of scikit-learn's two bundled photographs; the model's preprocess resizes them."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 RGB photographs, shipped with sklearn
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        img = photos[rng.integers(len(photos))]
        short = min(img.shape[:2])
        side = int(rng.integers(min(size, short // 2), min(4 * size, short) + 1))
        top = int(rng.integers(0, img.shape[0] - side + 1))
        left = int(rng.integers(0, img.shape[1] - side + 1))
        crops.append(Image.fromarray(img[top:top + side, left:left + side]))
    return crops
