"""The spectral store: a Zarr group next to its feature store (``train.zarr`` ->
``train.spectral.zarr``) holding per-unit PCA bases, spectra, statistics and TwoNN estimates,
and the feature store's config hash it was computed from.
"""

from __future__ import annotations

import numpy as np
import zarr

from residual_core.errors import StoreError
from residual_core.formats.feature_store import FeatureStore, _now
from residual_core.layout import is_local, local_path, zarr_target
from residual_core.method.spectral import PCAResult
from residual_core.method.units import Unit
from residual_core.stages.spectral import Params as SpectralParams

SPECTRAL_VERSION = 3  # 2: TwoNN is stored (tables rewritable from the store); 3: float64-exact PCA
FORMAT_NAME = "residual-spectral-store"


class SpectralStore:
    """An open spectral store: per-unit mean, components and eigenvalues of a feature store."""

    def __init__(self, group: zarr.Group, url: str):
        self.group, self.url, self.attrs = group, url, dict(group.attrs)

    @classmethod
    def open(cls, url: str) -> "SpectralStore":
        if is_local(url) and not local_path(url).exists():
            raise StoreError(f"no spectral store at {url}: run `residual spectral` first")
        try:
            group = zarr.open_group(zarr_target(url), mode="r")
        except Exception as exc:
            raise StoreError(f"{url} is not a Zarr group ({type(exc).__name__})") from None
        if group.attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{url} is not a residual spectral store")
        if group.attrs.get("state") != "complete":
            raise StoreError(f"{url} is incomplete: rerun `residual spectral` to recompute it")
        return cls(group, url)

    @property
    def units(self) -> tuple[Unit, ...]:
        return tuple(Unit(**u) for u in self.attrs["units"])

    def results(self) -> list[PCAResult]:
        """One :class:`PCAResult` per unit, in unit order."""
        mean, comps, eig = (self.group[k][...] for k in ("mean", "components", "eigenvalues"))
        n = int(self.attrs["n_samples"])
        return [PCAResult(mean[u], comps[u], eig[u], n) for u in range(mean.shape[0])]

    def twonn(self) -> np.ndarray:
        """TwoNN intrinsic dimension per unit, in unit order."""
        return self.group["twonn"][...]


DIMENSIONS = {"mean": ("unit", "embed"), "components": ("unit", "component", "embed"),
              "eigenvalues": ("unit", "component"), "twonn": ("unit",)}
"""The named axes of each array (Zarr ``dimension_names``: xarray opens the store as is)."""


def _write_store(url: str, features: FeatureStore, results: list[PCAResult],
                 dims: list[float], key: str, params: SpectralParams) -> None:
    group = zarr.open_group(zarr_target(url), mode="w")
    n_units, dim = len(results), results[0].mean.shape[0]
    arrays = {
        "mean": np.stack([r.mean for r in results]),
        "components": np.stack([r.components for r in results]),
        "eigenvalues": np.stack([r.eigenvalues for r in results]),
        "twonn": np.asarray(dims, dtype="float64"),
    }
    for name, value in arrays.items():
        chunks = (1,) + value.shape[1:]
        group.create_array(name, shape=value.shape, chunks=chunks, dtype="float64",
                           dimension_names=DIMENSIONS[name])[...] = value
    group.attrs.update({
        "format": FORMAT_NAME, "spectral_version": SPECTRAL_VERSION, "config_hash": key,
        "params": params.model_dump(), "feature_store": features.url,
        "feature_config_hash": features.attrs["config_hash"],
        "units": features.attrs["units"], "n_samples": int(results[0].n_samples),
        "n_units": n_units, "embed_dim": dim,
        **{k: features.attrs.get(k) for k in ("model", "pretrained", "checkpoint_sha256",
                                               "dataset", "split")},
        "created_at": _now(),
    })
    group.attrs["state"] = "complete"  # last: a killed run leaves an incomplete store
