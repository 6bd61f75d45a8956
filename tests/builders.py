"""Builders of small on-disk datasets in the layouts users have (shared by several test files)."""

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_cifar(root, folder, files, label_key, meta_file, meta_key, n_classes, per_file):
    """Pickled batches exactly as torchvision reads them; returns {file: (data, labels)}."""
    rng = np.random.default_rng(0)
    (root / folder).mkdir(parents=True)
    written = {}
    for k, (file_name, n) in enumerate(zip(files, per_file)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [(i + k) % n_classes for i in range(n)]
        with open(root / folder / file_name, "wb") as f:
            pickle.dump({"data": data, label_key: labels}, f)
        written[file_name] = (data, labels)
    with open(root / folder / meta_file, "wb") as f:
        pickle.dump({meta_key: [f"class{c}" for c in range(n_classes)]}, f)
    return written


def write_image_folder(root: Path, classes: list[str], per_class: int, size: int = 32,
                       seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: textured RGB images whose mean colour depends on the class."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        for i in range(per_class):
            noise = rng.integers(-60, 61, size=(size, size, 3))
            img = np.clip(base + noise + 10 * label, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:04d}.png")
    return root


def sample_crops(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """``n`` random square crops (side between ``size`` and 4×``size``, at most the photo's
    height) of scikit-learn's two bundled photographs (real images, offline); the model's
    preprocess resizes them."""
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
