"""The learned weights of the align stage: one Zarr group per fit in ``align.zarr`` (λ per unit and
component for the ResiDual variants), keyed by the fit's content hash.
"""

from __future__ import annotations

import numpy as np
import zarr

from residual_core.errors import ResidualError
from residual_core.identity import slug
from residual_core.layout import zarr_target
from residual_core.method.training import FitResult


def _save_weights(group: zarr.Group, result: FitResult, fit_hash: str) -> None:
    """λ per unit (and any other trainable weights) under ``<method>/seed<k>/``: the latest
    fit of that method and seed (its ``fit_hash`` attribute names which)."""
    base = f"{slug(result.method)}/seed{result.seed}"
    for name, value in result.state.items():
        if name.startswith("lambda/") or value.size <= 1_000_000:
            arr = np.asarray(value)
            leaf = name.rsplit("/", 1)[-1]  # axes named per array: their sizes differ
            group.create_array(f"{base}/{name}", shape=arr.shape, dtype=arr.dtype,
                               dimension_names=[f"{leaf}_{i}" for i in range(arr.ndim)],
                               overwrite=True)[...] = arr
    group.require_group(base).attrs.update({"val_acc": result.val_acc, "test_acc":
                                            result.test_acc, "basis": result.basis_dataset,
                                            "fit_hash": fit_hash})


def save_classifier(group: zarr.Group, name: str, weights: np.ndarray, train_hash: str) -> None:
    """The ``[C, E]`` frozen classifier every fit of the task used, as ``classifiers/<name>``
    (``text``, ``centroid``, ``centroid-l2``), with the train store it came from."""
    arr = np.asarray(weights, dtype=np.float32)
    out = group.create_array(f"classifiers/{slug(name)}", shape=arr.shape, dtype=arr.dtype,
                             dimension_names=["class", "embed"], overwrite=True)
    out[...] = arr
    out.attrs.update({"classifier": name, "train_config_hash": train_hash})


def stored_classifier(weights_url: str, name: str) -> np.ndarray:
    """The ``[C, E]`` classifier :func:`save_classifier` wrote for ``name``."""
    group = zarr.open_group(zarr_target(weights_url), mode="r")
    key = f"classifiers/{slug(name)}"
    if key not in group:
        raise ResidualError(f"no {name} classifier in {weights_url}")
    return group[key][...]


def stored_lambdas(weights_url: str, method: str, seed: int = 0) -> dict[str, np.ndarray]:
    """``{unit name: λ_u}`` saved by :func:`run_align` for ``method`` and ``seed``."""
    group = zarr.open_group(zarr_target(weights_url), mode="r")
    base = f"{slug(method)}/seed{seed}/lambda"
    if base not in group:
        raise ResidualError(f"no λ for {method} seed {seed} in {weights_url}")
    sub = group[base]
    return {name: sub[name][...] for name in sub.array_keys()}
