"""The project's splits (seed 42, stratified): 80/10/10 of a whole set, or a validation part carved
from an official train split (see :mod:`residual_core.datasets`)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

from residual_core.datasets.base import SEED, Factory, SplitSource
from residual_core.errors import ResidualError

# ----------------------------------------------------------------------------------------------
# Splits


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Carve a stratified ``fraction`` out of ``labels``: returns (kept, carved) positions, sorted.

    sklearn's ``train_test_split(stratify=labels, random_state=seed)``, so the result depends only
    on the labels and the seed (the same in every process and run).
    """
    from sklearn.model_selection import train_test_split  # slow import, only needed here

    labels = np.asarray(labels)
    try:
        kept, carved = train_test_split(
            np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed
        )
    except ValueError as e:  # too few samples per class for a stratified split
        n_classes = len(np.unique(labels))
        raise ResidualError(
            f"cannot carve a stratified {fraction:.0%} split from {len(labels)} samples of "
            f"{n_classes} classes: {e}"
        ) from e
    return np.sort(kept).astype(np.int64), np.sort(carved).astype(np.int64)


def split_80_10_10(labels: np.ndarray, seed: int = SEED, val: float = 0.1,
                   test: float = 0.1) -> dict[str, np.ndarray]:
    """Stratified positions: ``test`` and ``val`` fractions of all (80/10/10 by default),
    ``train`` the rest."""
    rest, test_pos = stratified_split(labels, test, seed)
    # val of what test leaves, as an exact ratio (0.1 / 0.9 in floats is one ulp above 1/9,
    # and sklearn's ceil(fraction * n) would then take one more sample)
    share = Fraction(val).limit_denominator(10**6) / (1 - Fraction(test).limit_denominator(10**6))
    train, val_pos = stratified_split(np.asarray(labels)[rest], float(share), seed)
    return {"train": rest[train], "val": rest[val_pos], "test": test_pos}


def _carve_val(labels: np.ndarray, split: str, fraction: float, seed: int = SEED) -> np.ndarray:
    """Positions of ``split`` (``train`` or ``val``) when val is ``fraction`` of official train."""
    train, val = stratified_split(labels, fraction, seed)
    return val if split == "val" else train


# Opener of a dataset's official parts: opener(data_root, part, download) -> (source, labels),
# part "train"/"test" (or "all" for datasets without an official split).
_Opener = Callable[[Path, str, bool], tuple[SplitSource, np.ndarray]]


def _official_splits(opener: _Opener, val_fraction: float | None) -> Factory:
    """Factory from an opener: val carved from official train, or 80/10/10 if no official split."""

    def factory(split: str, data_root: Path, download: bool):
        if val_fraction is None:
            source, labels = opener(data_root, "all", download)
            pos = split_80_10_10(labels)[split]
        elif split == "test":
            source, labels = opener(data_root, "test", download)
            pos = np.arange(len(labels), dtype=np.int64)
        else:
            source, labels = opener(data_root, "train", download)
            pos = _carve_val(labels, split, val_fraction)
        return source, labels[pos], pos

    return factory
