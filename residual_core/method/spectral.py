"""Spectral analysis of residual units (METHOD.md §2): per-unit PCA, spectrum statistics, TwoNN
intrinsic dimension, basis similarity (ours and the ResiDual authors'), and the correlation of
per-head spectral statistics across models.

Inputs are per-unit contributions in the output space: a dask array ``y`` of shape ``[N, U, E]``
(``N`` samples, ``U`` units, ``E`` output dimensions) or one unit's ``[N, E]`` slice. The PCA is
out of core: every block of rows is reduced to its per-unit mean and centred scatter matrix in
float64 (one batched BLAS product per block), the partial results are merged in a tree, and the
covariance of each unit is diagonalised with ``numpy.linalg.eigh``. All units come out of ONE pass
over the data, because reading the store is the cost. Units whose data are an affine image of
narrower features (a head's ``y`` of its raw output: :class:`AffineUnits`, :func:`pca_affine`)
accumulate the scatter of the features and map it once. Computation goes through ``dask.compute``,
so it runs on the local threaded scheduler or on a ``dask.distributed`` client if one is active.

Nothing here knows about stores or orchestration; errors caused by the data raise
:class:`SpectralInputError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import dask
import dask.array as da
import dask.threaded
import numpy as np
from threadpoolctl import threadpool_limits

from residual_core.errors import ResidualError

__all__ = [
    "SpectralInputError",
    "PCAResult",
    "AffineUnits",
    "pca",
    "pca_units",
    "pca_affine",
    "unit_stats",
    "twonn",
    "sample_rows",
    "authors_k",
    "normalized_spectral_cosine",
    "basis_similarity",
    "basis_similarity_table",
    "evr_counts",
    "head_statistics",
    "correlation",
    "cross_model_correlations",
]

# Upper bound for one task's float64 scatter matrices ([u, E, E]); units are split into groups
# of at most this size so that ViT-L (409 units, E=768) never holds all covariances in one task.
_SCATTER_BYTES_PER_TASK = 64 * 2**20
# Fan-in of the tree that merges per-block statistics.
_MERGE_FAN_IN = 8
# Cumulative explained variance within this of a threshold counts as reaching it, so that
# hand-made spectra that hit 0.9 exactly are not flipped by float rounding.
_EVR_TOL = 1e-12


class SpectralInputError(ResidualError, ValueError):
    """Data or arguments that the spectral analysis cannot use (shape, sample count, NaN/inf)."""


@dataclass(frozen=True)
class PCAResult:
    """Principal components of one unit.

    Attributes:
        mean: ``[E]`` float64, the sample mean.
        components: ``[K, E]`` float64 orthonormal rows (``K = E``), sorted by decreasing
            eigenvalue. Sign convention: the entry of largest magnitude of each row is positive
            (first such entry on ties), so results are reproducible. Directions with eigenvalue 0
            (beyond the data's rank) are an arbitrary orthonormal completion.
        eigenvalues: ``[K]`` float64 covariance eigenvalues (``1/(N-1)`` normalisation),
            non-increasing, clipped at 0; values below ``E * eps * max`` (numerical noise of the
            eigensolver) are set to exactly 0.
        n_samples: ``N``, the number of rows the statistics were computed from.
    """

    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    n_samples: int


# ----------------------------------------------------------------------------------------- PCA


def pca(y) -> PCAResult:
    """PCA of one unit.

    Args:
        y: ``[N, E]`` dask array (or anything ``dask.array.asarray`` accepts), float16/32/64,
            any row chunking, ``N >= 2``.

    Returns:
        The unit's :class:`PCAResult`.

    Raises:
        SpectralInputError: wrong ndim, ``N < 2``, non-numeric dtype, or NaN/inf in the data.
    """
    y = _as_dask(y, ndim=2, what="y [N, E]")
    return pca_units(y[:, None, :])[0]


def pca_units(y) -> list[PCAResult]:
    """PCA of every unit of ``y`` in one pass over the data.

    Each row block contributes, per unit, its mean and centred scatter matrix in float64
    (centred twice: first on the block's first row, so a constant unit gives exactly zero, then
    on the block mean); blocks are merged with the exact parallel-variance formula (Chan et al.)
    in a tree, and each unit's covariance ``scatter / (N - 1)`` is diagonalised in the final
    task of its group, so the client only receives means, eigenvalues and components.

    Scheduling: ``dask.compute`` with whatever scheduler is active (a ``dask.distributed``
    client if one is the default). Under the local threaded scheduler, BLAS is limited to one
    thread for the duration of the computation (``threadpoolctl``; process-wide), since dask's
    threads already run one block each.

    Memory: a task holds one row block in float64 (two copies) plus ``u * E * E * 8`` bytes of
    scatter for its group of ``u`` units (units are regrouped so this stays <= 64 MiB); it does
    not grow with ``N``. The result itself is ``U * E * E * 8`` bytes of components.

    Args:
        y: ``[N, U, E]`` dask array (or array-like), float16/32/64 (integers are accepted too),
            any chunking; ``N >= 2``.

    Returns:
        ``U`` :class:`PCAResult` objects, in unit order.

    Raises:
        SpectralInputError: wrong ndim, ``N < 2``, non-numeric dtype, or NaN/inf in the data
            (the message names the offending units).
    """
    return pca_affine([AffineUnits(_as_dask(y, ndim=3, what="y [N, U, E]"))])


@dataclass(frozen=True)
class AffineUnits:
    """Units whose data are affine images of narrower features:
    ``y[:, i] = w[:, i] @ maps[i] + offsets[i]`` (``maps=None``: ``y = w``).

    A head's contribution is affine in its raw output (``d = dh + 2`` features against ``E``
    output dimensions: 66 against 512 for ViT-B/16), so :func:`pca_affine` accumulates the
    ``d × d`` scatter of ``w`` and maps it once per unit (``mapsᵀ S maps``) instead of
    projecting every row and accumulating ``E × E``: the same covariance in float64, with
    ``(d / E)²`` of the arithmetic.

    Attributes:
        w: ``[N, U, d]`` dask array.
        maps: ``[U, d, E]`` float64 (``[1, d, E]``: one map for every unit), a numpy or a
            dask array (then each group's slice is computed where its task runs), or None.
        offsets: ``[U, E]`` float64, or None (zeros).
    """

    w: da.Array
    maps: np.ndarray | da.Array | None = None
    offsets: np.ndarray | None = None

    def __post_init__(self) -> None:
        n, n_units, dim = self.w.shape
        if self.maps is not None and (self.maps.ndim != 3 or self.maps.shape[1] != dim
                                      or self.maps.shape[0] not in (1, n_units)):
            raise SpectralInputError(f"maps must be [{n_units}, {dim}, E] for w of shape "
                                     f"{self.w.shape}, got {self.maps.shape}")
        if self.offsets is not None and (
                self.maps is None or self.offsets.shape != (n_units, self.maps.shape[2])):
            raise SpectralInputError(f"offsets must be [U, E] beside maps, got "
                                     f"{self.offsets.shape}")

    @property
    def embed_dim(self) -> int:
        return self.w.shape[2] if self.maps is None else self.maps.shape[2]


def pca_affine(parts: Sequence[AffineUnits]) -> list[PCAResult]:
    """PCA of the units of every part (:class:`AffineUnits`) in one pass over the data: as
    :func:`pca_units`, with each block's scatter taken in the features' space and mapped to
    the output space in the final task of each unit group.

    Returns:
        One :class:`PCAResult` per unit, part after part, in unit order within a part.
    """
    if not parts:
        return []
    n = parts[0].w.shape[0]
    if any(p.w.shape[0] != n for p in parts):
        raise SpectralInputError(f"parts with different row counts: {[p.w.shape for p in parts]}")
    tasks = []
    first = 0
    for part in parts:
        tasks += _pca_tasks(part, first)
        first += part.w.shape[1]

    if dask.base.get_scheduler(collections=tasks) is dask.threaded.get:
        # The row blocks are the parallelism; BLAS threads nested in each of dask's threads
        # oversubscribe the cores (5x slower measured on 2 busy cores). Distributed workers
        # already run single-threaded BLAS.
        with threadpool_limits(limits=1, user_api="blas"):
            computed = dask.compute(*tasks)
    else:
        computed = dask.compute(*tasks)
    results = []
    for n_rows, mean, eigenvalues, components in computed:
        results += [
            PCAResult(mean[u], components[u], eigenvalues[u], n_rows) for u in range(len(mean))
        ]
    return results


def _pca_tasks(part: AffineUnits, first_unit: int) -> list:
    """The delayed tasks of one part: per group of units, a tree over the row blocks."""
    w = _as_dask(part.w, ndim=3, what="w [N, U, d]")
    n, n_units, dim = w.shape
    if n < 2:
        raise SpectralInputError(f"PCA needs at least 2 samples, got N={n}")
    if n_units < 1 or dim < 1:
        raise SpectralInputError(f"y [N, U, E] has no units or features: shape {w.shape}")
    # a group's final task holds its scatter and its output-space covariances
    per_unit = 8 * (dim * dim + (part.embed_dim ** 2 if part.maps is not None else 0))
    group = max(1, min(n_units, _SCATTER_BYTES_PER_TASK // per_unit))
    rechunk = {}
    if max(w.chunks[1]) > group:
        rechunk[1] = group
    if len(w.chunks[2]) > 1:
        rechunk[2] = -1
    if rechunk:
        w = w.rechunk(rechunk)

    blocks = w.to_delayed()  # [row blocks, unit groups, 1]
    stats = dask.delayed(_block_stats, pure=True)
    merge = dask.delayed(_merge_stats, pure=True)
    finish = dask.delayed(_finish, pure=True)
    starts = np.cumsum((0,) + w.chunks[1][:-1])
    tasks = []
    for j, (start, size) in enumerate(zip(starts, w.chunks[1])):
        level = [stats(b) for b in blocks[:, j, 0]]
        while len(level) > 1:
            level = [
                merge(*level[i : i + _MERGE_FAN_IN]) for i in range(0, len(level), _MERGE_FAN_IN)
            ]
        group_maps = part.maps
        if part.maps is not None and len(part.maps) > 1:
            group_maps = part.maps[start:start + size]
        group_offsets = None if part.offsets is None else part.offsets[start:start + size]
        tasks.append(finish(level[0], int(first_unit + start), group_maps, group_offsets))
    return tasks


def _as_dask(y, ndim: int, what: str) -> da.Array:
    """``y`` as a dask array, checked for ``ndim`` and a real numeric dtype."""
    if not isinstance(y, da.Array):
        y = da.asarray(y)
    if y.ndim != ndim:
        raise SpectralInputError(f"expected {what} with {ndim} dimensions, got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)):
        raise SpectralInputError(f"expected real numbers in {what}, got dtype {y.dtype}")
    return y


def _block_stats(block: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Row count, per-unit mean ``[u, E]`` and centred scatter ``[u, E, E]`` of ``[n, u, E]``."""
    n, n_units, dim = block.shape
    if n == 0:
        return 0, np.zeros((n_units, dim)), np.zeros((n_units, dim, dim))
    # A copy in every case: the block may be the caller's own float64 array.
    x = np.array(block.transpose(1, 0, 2), dtype=np.float64, order="C", copy=True)  # [u, n, E]
    with np.errstate(invalid="ignore"):  # NaN/inf propagate to the mean; _finish reports them
        shift = x[:, :1, :].copy()
        x -= shift  # exact zeros for constant columns (a mean of equal floats can be inexact)
        offset = x.mean(axis=1, keepdims=True)
        x -= offset
        scatter = np.matmul(x.transpose(0, 2, 1), x)  # batched BLAS: [u, E, n] @ [u, n, E]
    return n, (shift + offset)[:, 0, :], scatter


def _merge_stats(*parts: tuple[int, np.ndarray, np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
    """Merge block statistics exactly: scatter = sum of scatters + between-block scatter."""
    parts = [p for p in parts if p[0] > 0] or [parts[0]]
    total = sum(p[0] for p in parts)
    ref = parts[0][1]
    scatter = sum(p[2] for p in parts)
    with np.errstate(invalid="ignore"):  # NaN/inf propagate to the mean; _finish reports them
        # Deviations from one block's mean rather than raw means keep the between-block term
        # free of cancellation (and exactly zero for a constant unit).
        deltas = [p[1] - ref for p in parts]
        delta = sum(p[0] * d for p, d in zip(parts, deltas)) / total
        for p, d in zip(parts, deltas):
            dd = d - delta
            scatter += p[0] * (dd[:, :, None] * dd[:, None, :])  # sum() made a new array
    return total, ref + delta, scatter


def _finish(part: tuple[int, np.ndarray, np.ndarray], first_unit: int,
            maps: np.ndarray | None = None, offsets: np.ndarray | None = None):
    """Eigen-decompose merged statistics: ``(N, mean [u,E], eigenvalues [u,K], comps [u,K,E])``;
    with ``maps [u, d, E]``, the statistics are of features and mapped first."""
    n, mean, scatter = part
    bad = np.flatnonzero(~np.isfinite(mean).all(axis=1))
    if bad.size:
        raise SpectralInputError(
            f"NaN or inf in the data of unit(s) {(bad + first_unit).tolist()}; "
            "spectral analysis needs finite values"
        )
    if maps is not None:
        mean = np.matmul(mean[:, None, :], maps)[:, 0]  # maps may be one map for all
        if offsets is not None:
            mean += offsets
    if maps is not None and maps.shape[1] < maps.shape[2]:
        eigenvalues, components = _mapped_eigh(scatter / (n - 1), maps)
    else:
        if maps is not None:
            scatter = np.matmul(maps.transpose(0, 2, 1), np.matmul(scatter, maps))
            scatter = (scatter + scatter.transpose(0, 2, 1)) / 2  # exactly symmetric for eigh
        eigenvalues, vectors = np.linalg.eigh(scatter / (n - 1))  # ascending, columns
        eigenvalues = eigenvalues[:, ::-1]
        components = vectors[:, :, ::-1].transpose(0, 2, 1).copy()  # rows, decreasing
    # Below this the eigensolver cannot tell a value from 0 (numpy's matrix_rank tolerance).
    noise = eigenvalues.shape[1] * np.finfo(np.float64).eps * eigenvalues[:, :1]
    eigenvalues = np.ascontiguousarray(np.where(eigenvalues > noise, eigenvalues, 0.0))
    pivots = np.abs(components).argmax(axis=2)[..., None]
    components *= np.where(np.take_along_axis(components, pivots, axis=2) < 0, -1.0, 1.0)
    return n, mean, eigenvalues, components


def _mapped_eigh(cov: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (decreasing) and component rows of ``mapsᵀ cov maps`` (``[u, E, E]``) from
    ``d × d`` problems, for ``d < E``: with ``cov = L Lᵀ``, the ``d`` possibly non-zero
    eigenpairs are the squared singular values and right singular vectors of ``Lᵀ maps``; the
    other ``E - d`` components (eigenvalue 0) complete them to an orthonormal basis (QR). For a
    head of ViT-B/16 (``d = 66``, ``E = 512``) that replaces a 512 × 512 eigensolve."""
    d, dim = maps.shape[1:]
    lam, vectors = np.linalg.eigh(cov)
    root = vectors * np.sqrt(np.clip(lam, 0.0, None))[:, None, :]  # L, cov = L Lᵀ
    _, sigma, top = np.linalg.svd(np.matmul(root.transpose(0, 2, 1), maps),
                                  full_matrices=False)  # top: [u, d, E], sigma decreasing
    complete = np.linalg.qr(top.transpose(0, 2, 1), mode="complete")[0]  # [u, E, E]
    components = np.concatenate([top, complete[:, :, d:].transpose(0, 2, 1)], axis=1)
    eigenvalues = np.concatenate([sigma**2, np.zeros((len(sigma), dim - d))], axis=1)
    return eigenvalues, components


# ------------------------------------------------------------------------------- statistics


def _n_components_for(cumulative_evr: np.ndarray, threshold: float) -> int:
    """Smallest ``k`` with ``cumulative_evr[k-1] >= threshold`` (0 if the curve is all zero)."""
    if cumulative_evr.size == 0 or cumulative_evr[-1] == 0:
        return 0
    k = int(np.searchsorted(cumulative_evr, threshold - _EVR_TOL, side="left")) + 1
    return min(k, cumulative_evr.size)


def unit_stats(eigenvalues) -> dict:
    """Spectrum statistics of one unit.

    Args:
        eigenvalues: ``[K]`` covariance eigenvalues, non-increasing (as in :class:`PCAResult`);
            negative values (numerical noise) are treated as 0. Pass all ``E`` of them: ratios are
            relative to their sum.

    Returns:
        ``evr`` ``[K]`` explained-variance ratios; ``cumulative_evr`` ``[K]``; ``k90``, ``k99``
        (smallest ``k`` whose cumulative EVR reaches 0.90 / 0.99, within 1e-12); ``evr1`` (first
        component's EVR); ``participation_ratio`` ``(Σλ)² / Σλ²``; ``total_variance`` ``Σλ``.
        A unit with zero variance (e.g. CLIP's constant ``emb``) gets all-zero ``evr`` and
        ``cumulative_evr``, ``k90 = k99 = 0``, ``evr1 = 0.0`` and ``participation_ratio = 0.0``.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    if lam.ndim != 1:
        raise SpectralInputError(f"expected a 1-D eigenvalue vector, got shape {lam.shape}")
    if not np.isfinite(lam).all():
        raise SpectralInputError("eigenvalues contain NaN or inf")
    lam = np.clip(lam, 0.0, None)
    total = float(lam.sum())
    if total > 0:
        evr = lam / total
        participation = 1.0 / float(np.sum(evr**2))  # = (Σλ)²/Σλ², without under/overflow
    else:
        evr, participation = np.zeros_like(lam), 0.0
    cumulative = np.cumsum(evr)
    return {
        "evr": evr,
        "cumulative_evr": cumulative,
        "k90": _n_components_for(cumulative, 0.90),
        "k99": _n_components_for(cumulative, 0.99),
        "evr1": float(evr[0]) if evr.size else 0.0,
        "participation_ratio": participation,
        "total_variance": total,
    }


# ---------------------------------------------------------------------------------- TwoNN


def _subsample_indices(n: int, max_samples: int, seed: int) -> np.ndarray | None:
    """Sorted random row indices (``max_samples`` of ``n``), or None when all rows are kept."""
    if max_samples < 3:
        raise SpectralInputError(f"max_samples must be >= 3, got {max_samples}")
    if n <= max_samples:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))


def sample_rows(y, unit: int | None = None, max_samples: int = 50_000, seed: int = 42):
    """Load one unit's rows into memory, subsampled the same way :func:`twonn` would.

    Only the selected rows are computed (a sorted random subset, drawn with
    ``numpy.random.default_rng(seed)``), so a large store is never loaded whole. Because
    :func:`twonn` keeps arrays of at most ``max_samples`` rows as they are,
    ``twonn(sample_rows(y, u))`` equals ``twonn(y[:, u].compute())`` with the same arguments.

    Args:
        y: ``[N, U, E]`` (then ``unit`` is required) or ``[N, E]`` dask array / array-like.
        unit: the unit index for a 3-D ``y``.
        max_samples: at most this many rows are returned.
        seed: seed of the row subsample.

    Returns:
        ``[min(N, max_samples), E]`` numpy array in the stored dtype, rows in original order.
    """
    if not isinstance(y, da.Array):
        y = da.asarray(y)
    if y.ndim == 3:
        if unit is None:
            raise SpectralInputError("y is [N, U, E]: pass the unit index")
        y = y[:, unit, :]
    elif y.ndim != 2 or unit is not None:
        raise SpectralInputError(f"expected [N, U, E] with a unit or [N, E], got shape {y.shape}")
    idx = _subsample_indices(y.shape[0], max_samples, seed)
    (rows,) = dask.compute(y if idx is None else y[idx])
    return rows


def twonn(x, discard_fraction: float = 0.1, max_samples: int = 50_000, seed: int = 42) -> float:
    """TwoNN intrinsic dimension (Facco et al. 2017), as the ResiDual authors use it.

    For each point, ``mu = r2 / r1`` (distances to its 2nd and 1st nearest neighbours, from
    ``sklearn.neighbors.NearestNeighbors``; no N×N matrix). The ratios are sorted, the largest
    ``discard_fraction`` of them dropped, and the slope of the least-squares line through the origin
    of ``-log(1 - F(mu))`` against ``log(mu)`` is returned, with the empirical CDF
    ``F(mu_(i)) = i / n`` (``n`` counting all points, so the kept points never reach F = 1).

    Duplicates: exact duplicate rows are collapsed to one before the neighbour search (a duplicated
    point has ``r1 = 0``, an infinite ratio, and would also give its neighbours a spurious
    ``r1 = r2``); any remaining point with ``r1 == 0`` (distinct rows that round to distance 0) is
    dropped. A set with a single distinct point (a constant unit) has dimension 0.0.

    Args:
        x: ``[N, E]`` finite data.
        discard_fraction: fraction of the largest ratios to drop, in ``[0, 1)``.
        max_samples: rows are subsampled to this many (``default_rng(seed)``, without
            replacement) when ``N`` is larger.
        seed: seed of the subsample.

    Returns:
        The estimated intrinsic dimension.

    Raises:
        SpectralInputError: wrong ndim, NaN/inf, fewer than 3 distinct points (but more than 1),
            or all kept ratios equal to 1 (no slope to fit).
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise SpectralInputError(f"expected x [N, E] with 2 dimensions, got shape {x.shape}")
    if not 0 <= discard_fraction < 1:
        raise SpectralInputError(f"discard_fraction must be in [0, 1), got {discard_fraction}")
    idx = _subsample_indices(x.shape[0], max_samples, seed)
    if idx is not None:
        x = x[idx]
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise SpectralInputError("NaN or inf in the data; TwoNN needs finite values")
    x = np.unique(x, axis=0)
    if x.shape[0] == 1:
        return 0.0
    if x.shape[0] < 3:
        raise SpectralInputError(f"TwoNN needs at least 3 distinct points, got {x.shape[0]}")
    x -= x.mean(axis=0)  # smaller norms -> more accurate distances from the |a|²-2ab+|b|² trick

    from sklearn.neighbors import NearestNeighbors  # heavy import, only needed here

    dist, _ = NearestNeighbors(n_neighbors=2).fit(x).kneighbors()  # excludes each point itself
    r1, r2 = dist[:, 0], dist[:, 1]
    keep = r1 > 0
    mu = np.sort(r2[keep] / r1[keep])
    n = mu.size
    if n < 3:
        raise SpectralInputError(f"TwoNN needs at least 3 points with r1 > 0, got {n}")
    n_fit = min(int(n * (1 - discard_fraction)), n - 1)
    log_mu = np.log(mu[:n_fit])
    target = -np.log1p(-np.arange(1, n_fit + 1) / n)
    denom = float(log_mu @ log_mu)
    if denom == 0:
        raise SpectralInputError("all neighbour-distance ratios are 1: TwoNN has no slope to fit")
    return float(log_mu @ target) / denom


# ------------------------------------------------------------------------- basis similarity


def _k_at(eigenvalues, evr_threshold: float) -> int:
    """Number of components that reach ``evr_threshold`` cumulative explained variance."""
    return _n_components_for(unit_stats(eigenvalues)["cumulative_evr"], evr_threshold)


def authors_k(eigenvalues, evr_threshold: float = 0.9) -> int:
    """The ResiDual authors' truncation of a basis (``get_k`` / ``threshold_pruning`` in their
    ``unit_distance.py``): ``argmax(cumulative_evr > evr_threshold) + 1``.

    That is the smallest ``k`` whose cumulative EVR EXCEEDS the threshold (strictly, no
    tolerance), where :func:`unit_stats`' ``k90`` is the smallest ``k`` that REACHES it: on a
    spectrum whose cumulative EVR equals the threshold exactly at ``k``, this keeps ``k + 1``.
    Kept as theirs: when no component exceeds the threshold (only possible at
    ``evr_threshold >= 1``, then decided by float rounding of the last cumulative value), the
    argmax of an all-false mask is 0 and one component is kept. A zero-variance unit has no
    basis: 0 (their code gets NaN ratios there).
    """
    cumulative = unit_stats(eigenvalues)["cumulative_evr"]
    if cumulative.size == 0 or cumulative[-1] == 0:
        return 0
    return int(np.argmax(cumulative > evr_threshold)) + 1


def normalized_spectral_cosine(x, y, weights_x=None, weights_y=None) -> float:
    """The ResiDual authors' ``normalized_spectral_cosine`` (``unit_distance.py``), in float64.

    ``C = |x yᵀ|`` (absolute cosines of the rows); ``W = outer(weights_x, weights_y)``
    normalised by ``||diag(W)||₂ = ||(wx_i wy_i)_{i < min(kx, ky)}||₂`` (the weights of
    components of equal rank); ``C ∘ W`` is matched greedily one to one ``min(kx, ky)`` times
    (the largest remaining entry, ties to the first in row-major order as their
    ``torch.max``/``argmax``; its row and column are then excluded) and the result is the L2
    norm of the matched values. (Their final division by ``||diag(W)||₂`` happens after ``W``
    was normalised, so it divides by 1.) With weights sorted decreasingly, as eigenvalues are,
    the rearrangement inequality bounds the result by 1; it is 1 for the same directions with
    ANY weights (also nested, ``kx != ky``) and symmetric in ``x, y`` up to ties.

    Without weights their ``W`` is ``eye(kx, ky) / sqrt(min(kx, ky))``, which zeroes every pair
    but ``(i, i)``: the result is ``sqrt(mean_i cos²(x_i, y_i))``, components compared by rank
    only (the greedy matching has nothing left to choose). Kept as theirs.

    Args:
        x: ``[kx, E]`` rows (orthonormal principal directions).
        y: ``[ky, E]`` rows.
        weights_x, weights_y: ``[kx]`` and ``[ky]`` weights, both or neither.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise SpectralInputError(f"need x [kx, E] and y [ky, E] of one E, got {x.shape}, {y.shape}")
    if (weights_x is None) != (weights_y is None):
        raise SpectralInputError("pass both weight vectors or neither")
    c = np.abs(x @ y.T)
    if weights_x is None:
        w = np.eye(*c.shape)
    else:
        w = np.outer(np.asarray(weights_x, dtype=np.float64), np.asarray(weights_y, np.float64))
        if w.shape != c.shape:
            raise SpectralInputError(f"weights of shapes {w.shape} for {c.shape} cosines")
    w = w / np.linalg.norm(np.diagonal(w))
    c = c * w
    picked = np.empty(min(c.shape))
    for i in range(picked.size):
        r, col = np.unravel_index(np.argmax(c), c.shape)
        picked[i] = c[r, col]
        c[r, :] = -np.inf
        c[:, col] = -np.inf
    return float(np.linalg.norm(picked))


def _weights(eigenvalues, k: int, weights: str) -> np.ndarray:
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64)[:k], 0.0, None)
    if weights == "none":
        return np.ones_like(lam)
    return np.sqrt(lam) if weights == "singular" else lam


def _truncated_basis(components, eigenvalues, evr_threshold: float, k: int | None = None,
                     weights: str = "eigenvalues"):
    """Rows of ``components`` up to ``k`` (default: reaching ``evr_threshold``) and their
    weights normalised to sum 1."""
    components = np.asarray(components, dtype=np.float64)
    k = _k_at(eigenvalues, evr_threshold) if k is None else k
    if components.ndim != 2 or components.shape[0] < k:
        raise SpectralInputError(
            f"need components [K, E] with K >= {k} rows (k at {evr_threshold:g} EVR), "
            f"got shape {components.shape}"
        )
    w = _weights(eigenvalues, k, weights)
    return components[:k], w / w.sum() if k else w


_METHODS = ("subspace", "greedy", "authors")


def basis_similarity(
    components_a,
    eigenvalues_a,
    components_b,
    eigenvalues_b,
    evr_threshold: float = 0.9,
    method: Literal["subspace", "greedy", "authors"] = "subspace",
    weights: Literal["eigenvalues", "singular", "none"] = "eigenvalues",
) -> float:
    """Similarity in [0, 1] of two units' principal bases (METHOD.md §2).

    ``method="authors"`` is the paper's measure, the authors' code exactly; ``"subspace"`` (the
    default, unchanged for existing callers) and ``"greedy"`` are ours. All three weight each
    kept component by its eigenvalue (``weights="singular"``: by its square root, the
    authors' ``get_weights`` mode ``"singular"``; their modes ``"eigs"`` and
    ``"explained_variance"`` are proportional to eigenvalues, and every score here is invariant
    to rescaling either weight vector, so those are ``"eigenvalues"``).

    - ``method="authors"``: each basis truncated with :func:`authors_k` (cumulative EVR strictly
      above ``evr_threshold``), then :func:`normalized_spectral_cosine` with the kept
      eigenvalues as weights: ``C_ij = |cos(φ_i, ψ_j)| w_i v_j``, greedy one-to-one matching
      (largest first), ``score = ||matched C_ij||₂ / ||(w_i v_i)_{i < min(ka, kb)}||₂``.
      Symmetric in a, b (up to ties). It scores 1 for the same directions whatever their
      weights, and for nested bases (a basis and its first components). Which weighting their
      head-to-head experiment ran with is set in a gin file they did not publish
      (``compute_spectral_distances`` defaults to no weights); their own call sites pass
      eigenvalues, hence the default. ``weights="none"`` is their unweighted variant
      (components compared by rank only, see :func:`normalized_spectral_cosine`). Checked against their torch code on PCA fits of random
      data: equal to 1e-14 for every ``get_weights`` mode.

    For ``"subspace"`` and ``"greedy"`` both bases are truncated at the number of components
    that REACH ``evr_threshold`` (``k90`` by default, as in the ``unit_stats`` table) and
    weighted by their eigenvalues normalised to sum 1 over the kept rows. With
    ``C_ij = cos(φ_i, ψ_j) · w_i · v_j``:

    - ``method="greedy"`` is METHOD's formula literally: the authors' matching (largest
      ``|C_ij|`` first, one to one), ``raw = ||matched |C_ij| values||₂``, with our
      normalisation below instead of theirs.
    - ``method="subspace"`` uses ``raw = ||C||_F``, the L2 norm of all pair values,
      equivalently of the singular values of ``C`` (the values a one-to-one matching gives after
      rotating each basis to the singular directions). When the bases are aligned (each
      direction of either basis is orthogonal to all but at most one direction of the other),
      ``C`` has at most one non-zero per row and column, the greedy matching picks exactly those,
      and both methods agree. Otherwise the greedy value is smaller: it ignores unmatched
      overlaps. Unlike the greedy score, the subspace score does not depend on the arbitrary
      choice of eigenvectors inside a block of equal eigenvalues (such a basis is not unique):
      ``||C||_F² = tr(Φᵀ W² Φ · Ψᵀ V² Ψ)`` only sees the weighted projectors, so a copy rotated
      within such a block scores exactly 1, where the greedy score drops below 1.

    Normalisation of ours: ``score = raw / sqrt(raw_aa · raw_bb)`` with ``raw_aa = ||w²||₂`` and
    ``raw_bb = ||v²||₂``, the raw scores of each basis with itself. By Cauchy–Schwarz the score is
    in [0, 1]: 1 for a basis with itself, 0 for orthogonal subspaces. The subspace score is the
    square root of the cosine similarity of the weighted projectors ``Φᵀ W² Φ`` and ``Ψᵀ V² Ψ``;
    it is 1 exactly when they are proportional (same span, same normalised weights). The
    authors' ``||(w_i v_i)_i||₂`` also scores 1 for aligned directions with different weight
    profiles and for nested subspaces; ours is stricter there.

    Truncation caveat: if the ``evr_threshold`` cut falls inside a block of equal eigenvalues,
    which vectors of that block are kept is arbitrary, and so is the score.

    Args:
        components_a: ``[Ka, E]`` orthonormal rows, eigenvalue order.
        eigenvalues_a: ``[Ka]`` its eigenvalues (all of them, for the right EVR).
        components_b, eigenvalues_b: the same for the other unit (same ``E``).
        evr_threshold: cumulative EVR at which each basis is truncated, in (0, 1].
        method: ``"subspace"``, ``"greedy"`` or ``"authors"`` (the paper's).
        weights: ``"eigenvalues"``, ``"singular"`` (their square roots) or ``"none"``
            (``"authors"``: their unweighted variant; ours: equal weights).

    Returns:
        The similarity, or NaN when either unit has zero variance (no basis to compare).
    """
    if not 0 < evr_threshold <= 1:
        raise SpectralInputError(f"evr_threshold must be in (0, 1], got {evr_threshold}")
    if method not in _METHODS:
        raise SpectralInputError(f"method must be one of {', '.join(_METHODS)}, got {method!r}")
    if weights not in ("eigenvalues", "singular", "none"):
        raise SpectralInputError(f"weights must be 'eigenvalues', 'singular' or 'none', got "
                                 f"{weights!r}")
    if method == "authors":
        ka, kb = authors_k(eigenvalues_a, evr_threshold), authors_k(eigenvalues_b, evr_threshold)
        phi, w = _truncated_basis(components_a, eigenvalues_a, evr_threshold, ka, weights)
        psi, v = _truncated_basis(components_b, eigenvalues_b, evr_threshold, kb, weights)
    else:
        phi, w = _truncated_basis(components_a, eigenvalues_a, evr_threshold, weights=weights)
        psi, v = _truncated_basis(components_b, eigenvalues_b, evr_threshold, weights=weights)
    if phi.shape[1] != psi.shape[1]:
        raise SpectralInputError(f"bases of different sizes: E={phi.shape[1]} vs {psi.shape[1]}")
    if w.size == 0 or v.size == 0:
        return math.nan
    if method == "authors":
        if weights == "none":
            return normalized_spectral_cosine(phi, psi)
        return normalized_spectral_cosine(phi, psi, w, v)
    weighted = np.abs(phi @ psi.T) * w[:, None] * v[None, :]
    if method == "subspace":
        raw = float(np.linalg.norm(weighted))
    else:
        matched = []
        for _ in range(min(weighted.shape)):
            i, j = np.unravel_index(np.argmax(weighted), weighted.shape)
            matched.append(weighted[i, j])
            weighted[i, :] = -np.inf
            weighted[:, j] = -np.inf
        raw = float(np.linalg.norm(matched))
    norm = math.sqrt(float(np.linalg.norm(w**2)) * float(np.linalg.norm(v**2)))
    return min(raw / norm, 1.0)


def basis_similarity_table(
    results_a: Sequence[PCAResult],
    results_b: Sequence[PCAResult],
    unit_names: Sequence[str],
    evr_threshold: float = 0.9,
) -> list[dict]:
    """Per-unit basis similarity between two PCA fits of the same units (e.g. two datasets, or
    two models of one output width).

    Args:
        results_a, results_b: one :class:`PCAResult` per unit, in the same unit order.
        unit_names: the units' names (e.g. ``L11H3``), same length.
        evr_threshold: truncation threshold passed to :func:`basis_similarity`.

    Returns:
        One dict per unit: ``unit``, ``similarity`` (subspace score), ``similarity_greedy``
        (METHOD's literal greedy score), ``authors`` (the paper's score, the authors' code),
        ``k_a``, ``k_b`` (components reaching the threshold, kept by the first two; the
        authors' truncation keeps one more where the cumulative EVR equals it exactly). A list
        of dicts; ``pyarrow.Table.from_pylist`` turns it into a table.
    """
    if not len(results_a) == len(results_b) == len(unit_names):
        raise SpectralInputError(
            f"need as many results as unit names: {len(results_a)}, {len(results_b)}, "
            f"{len(unit_names)}"
        )
    rows = []
    for name, a, b in zip(unit_names, results_a, results_b):
        args = (a.components, a.eigenvalues, b.components, b.eigenvalues, evr_threshold)
        rows.append(
            {
                "unit": name,
                "similarity": basis_similarity(*args, method="subspace"),
                "similarity_greedy": basis_similarity(*args, method="greedy"),
                "authors": basis_similarity(*args, method="authors"),
                "k_a": _k_at(a.eigenvalues, evr_threshold),
                "k_b": _k_at(b.eigenvalues, evr_threshold),
            }
        )
    return rows


# ------------------------------------------------------------------ spectra across models


def evr_counts(width: int) -> tuple[int, ...]:
    """The default component counts at which the cross-model comparison reads each head's
    cumulative EVR curve (:func:`head_statistics`): the powers of two below ``width`` (1, 2, 4,
    ..., 32 for 64), log-spaced like the curves' plots; beyond the heads' K_90 every curve is
    close to 1, so a dense grid would mostly correlate saturated values."""
    return tuple(2**i for i in range(max(int(width - 1).bit_length(), 1)))


def head_statistics(eigenvalues: dict[str, np.ndarray], twonn_dims: dict[str, float],
                    counts: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Per-head spectral statistics, by statistic then head name: ``k90`` (components reaching
    90% EVR, as in ``unit_stats``), ``twonn`` (as given) and ``cumulative_evr`` (the cumulative
    EVR after each of ``counts`` components, ``[len(counts)]``).

    Args:
        eigenvalues: head name -> its ``[E]`` eigenvalues (all of them).
        twonn_dims: head name -> its TwoNN dimension (same names).
        counts: component counts, each in ``1..E``.
    """
    counts = [int(c) for c in counts]
    out: dict[str, dict[str, Any]] = {"k90": {}, "twonn": {}, "cumulative_evr": {}}
    for name, lam in eigenvalues.items():
        stats = unit_stats(lam)
        if not counts or min(counts) < 1 or max(counts) > stats["cumulative_evr"].size:
            raise SpectralInputError(f"component counts must be in 1..{stats['evr'].size}, "
                                     f"got {counts}")
        out["k90"][name] = stats["k90"]
        out["twonn"][name] = float(twonn_dims[name])
        out["cumulative_evr"][name] = stats["cumulative_evr"][np.asarray(counts) - 1]
    return out


def correlation(x, y) -> dict:
    """Pearson and Spearman correlation of paired values (``scipy.stats``): ``pearson``,
    ``spearman`` and ``n``; NaN (without a warning) for fewer than 2 pairs or a constant
    side."""
    from scipy import stats as st

    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise SpectralInputError(f"need paired values, got {x.size} and {y.size}")
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"pearson": math.nan, "spearman": math.nan, "n": int(x.size)}
    return {"pearson": float(st.pearsonr(x, y)[0]), "spearman": float(st.spearmanr(x, y)[0]),
            "n": int(x.size)}


def cross_model_correlations(stats_a: dict[str, dict[str, Any]],
                             stats_b: dict[str, dict[str, Any]]) -> dict:
    """Correlate per-head statistics of two models (:func:`head_statistics` of each), heads
    matched by name; only the heads both have count.

    Returns:
        ``heads`` (the matched names, in ``stats_a``'s order), ``only_a``, ``only_b`` (names
        left out), and ``statistics``: statistic -> ``pearson``, ``spearman``, ``n_heads``,
        ``n_values`` (pairs correlated: heads, or heads × counts for ``cumulative_evr``, whose
        per-head vectors are concatenated in head order).
    """
    names_a = list(next(iter(stats_a.values())))
    names_b = list(next(iter(stats_b.values())))
    in_b = set(names_b)
    heads = [n for n in names_a if n in in_b]
    result = {"heads": heads, "only_a": [n for n in names_a if n not in in_b],
              "only_b": [n for n in names_b if n not in set(names_a)], "statistics": {}}
    for name in stats_a:
        x = np.concatenate([np.atleast_1d(stats_a[name][h]) for h in heads]) if heads else []
        y = np.concatenate([np.atleast_1d(stats_b[name][h]) for h in heads]) if heads else []
        corr = correlation(x, y)
        result["statistics"][name] = {"pearson": corr["pearson"], "spearman": corr["spearman"],
                                      "n_heads": len(heads), "n_values": corr["n"]}
    return result
