"""Tests of residual_core.method.spectral: PCA against numpy (in memory and out of core), spectrum
statistics, TwoNN on manifolds of known dimension, basis similarity, and input validation."""

from __future__ import annotations

import logging
import math
import warnings

import dask.array as da
import numpy as np
import pytest
import zarr
from scipy.linalg import subspace_angles
from scipy.stats import special_ortho_group
from sklearn.datasets import make_swiss_roll
from threadpoolctl import threadpool_limits

from residual_core.errors import ResidualError
from residual_core.method.spectral import (
    AffineUnits,
    PCAResult,
    SpectralInputError,
    authors_k,
    basis_similarity,
    basis_similarity_table,
    cross_model_correlations,
    evr_counts,
    head_statistics,
    normalized_spectral_cosine,
    pca,
    pca_affine,
    pca_units,
    sample_rows,
    twonn,
    unit_stats,
)


@pytest.fixture(autouse=True)
def single_threaded_blas():
    """Reference computations with one BLAS thread: on a small shared machine OpenBLAS's own
    threads spin against other processes (a 12x slowdown of np.cov measured here)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def spectral_data(rng, n, units, dim, dtype=np.float32, offset=3.0, maps_seed=0):
    """``[n, units, dim]`` samples (noise from ``rng``) with a decaying spectrum (std 1/i), a
    random rotation per unit and a non-zero mean, both fixed by ``maps_seed`` so that batches
    drawn with one ``rng`` come from the same distribution."""
    maps = np.random.default_rng(maps_seed)
    scales = (1.0 / np.arange(1, dim + 1))[:, None]
    rotations = [np.linalg.qr(maps.standard_normal((dim, dim)))[0] for _ in range(units)]
    mixing = scales * np.stack(rotations)
    shift = offset * maps.standard_normal((units, dim))
    z = rng.standard_normal((n, units, dim), dtype=np.float32)
    x = np.matmul(z.transpose(1, 0, 2), mixing.astype(np.float32)).transpose(1, 0, 2) + shift
    return x.astype(dtype)


def numpy_pca(x):
    """Reference PCA of ``x [N, E]`` in float64: mean, eigenvalues (descending), component rows."""
    x = np.asarray(x, dtype=np.float64)
    eigenvalues, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    return x.mean(axis=0), eigenvalues[::-1], vectors[:, ::-1].T


def assert_matches_numpy(result: PCAResult, x):
    mean, eigenvalues, components = numpy_pca(x)
    n, dim = x.shape
    assert result.n_samples == n
    assert result.mean.dtype == np.float64 and result.mean.shape == (dim,)
    assert result.components.shape == (dim, dim) and result.eigenvalues.shape == (dim,)
    # Equal up to float64 summation-order rounding.
    np.testing.assert_allclose(result.mean, mean, rtol=1e-12, atol=1e-12 * np.abs(mean).max())
    significant = eigenvalues > 1e-9 * eigenvalues[0]
    np.testing.assert_allclose(result.eigenvalues[significant], eigenvalues[significant], rtol=1e-6)
    assert np.all(np.diff(result.eigenvalues) <= 0) and np.all(result.eigenvalues >= 0)
    np.testing.assert_allclose(result.components @ result.components.T, np.eye(dim), atol=1e-12)
    for k in (1, 3, 8):
        angles = subspace_angles(result.components[:k].T, components[:k].T)
        assert angles.max() < 1e-6, (k, angles.max())
    # Sign convention: each component's largest-magnitude entry is positive.
    pivots = np.abs(result.components).argmax(axis=1)
    assert np.all(result.components[np.arange(dim), pivots] > 0)


# ----------------------------------------------------------------------------------------- PCA


def test_pca_leaves_a_float64_input_untouched():
    x = spectral_data(np.random.default_rng(9), 200, 1, 6, dtype=np.float64)[:, 0]
    original = x.copy()
    pca(da.from_array(x, chunks=(64, 6)))
    np.testing.assert_array_equal(x, original)


def test_pca_of_chunked_float32_dask_array_matches_numpy():
    x = spectral_data(np.random.default_rng(0), 2003, 1, 24)[:, 0]
    y = da.from_array(x, chunks=(500, 24))  # 5 row blocks, the last one 3 rows
    assert y.chunks[0][-1] == 3
    assert_matches_numpy(pca(y), x)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_pca_units_matches_numpy_per_unit_and_handles_a_constant_unit(dtype):
    x = spectral_data(np.random.default_rng(1), 1501, 3, 16, dtype=dtype)
    x[:, 0, :] = np.linspace(-2, 2, 16).astype(dtype)  # a constant unit, like CLIP's emb
    y = da.from_array(x, chunks=(400, 2, 8))  # uneven rows, units and features split
    results = pca_units(y)
    assert len(results) == 3
    for u in (1, 2):
        assert_matches_numpy(results[u], x[:, u])
    constant = results[0]
    assert np.array_equal(constant.eigenvalues, np.zeros(16))
    assert np.array_equal(constant.mean, x[0, 0].astype(np.float64))
    stats = unit_stats(constant.eigenvalues)
    assert (stats["k90"], stats["k99"], stats["participation_ratio"]) == (0, 0, 0.0)


def test_pca_affine_equals_numpy_on_the_mapped_data_in_one_pass():
    """Scatter accumulated on features ``w`` and mapped once equals the PCA of ``w @ A + b``;
    two parts (different feature widths; the second with one map for both units) in one call;
    a constant unit stays exactly zero."""
    rng = np.random.default_rng(2)
    n, dim = 1203, 20
    w1 = spectral_data(rng, n, 3, 10, dtype=np.float64)
    w1[:, 1] = w1[0, 1]  # constant features: a constant unit
    w2 = spectral_data(rng, n, 2, 12, dtype=np.float64)
    maps1, maps2 = rng.standard_normal((3, 10, dim)), rng.standard_normal((1, 12, dim))
    offsets1 = rng.standard_normal((3, dim))
    parts = [AffineUnits(da.from_array(w1, chunks=(300, 2, 10)), maps1, offsets1),
             AffineUnits(da.from_array(w2, chunks=(500, 2, 12)), maps2)]
    results = pca_affine(parts)
    assert len(results) == 5
    y1 = np.einsum("nud,ude->nue", w1, maps1) + offsets1
    y2 = np.einsum("nud,de->nue", w2, maps2[0])
    for result, y in zip(results, [y1[:, 0], None, y1[:, 2], y2[:, 0], y2[:, 1]]):
        if y is not None:
            assert_matches_numpy(result, y)
    assert np.array_equal(results[1].eigenvalues, np.zeros(dim))
    np.testing.assert_allclose(results[1].mean, w1[0, 1] @ maps1[1] + offsets1[1], rtol=1e-12)
    with pytest.raises(SpectralInputError, match="maps must be"):
        AffineUnits(da.from_array(w1), maps2)
    with pytest.raises(SpectralInputError, match="different row counts"):
        pca_affine([parts[0], AffineUnits(da.from_array(w2[:10]), maps2)])


def test_pca_out_of_core_on_a_local_cluster_with_small_memory_limit(tmp_path):
    import dask.distributed as distributed
    # 250 MB per worker: dask.array imports xarray when it is installed (+70 MB per process)
    n, units, dim, rows = 520_000, 8, 32, 20_000
    rng = np.random.default_rng(2)
    store = zarr.create_array(
        store=tmp_path / "y.zarr", shape=(n, units, dim), chunks=(rows, 1, dim), dtype="float32"
    )
    for start in range(0, n, rows):
        store[start : start + rows] = spectral_data(rng, rows, units, dim, offset=1.0)
    limit = 250_000_000
    assert store.nbytes > 2 * limit  # larger than both workers' memory together

    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        memory_limit=limit,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as cluster, distributed.Client(cluster) as client:
        workers = set(client.scheduler_info()["workers"])
        with distributed.get_task_stream(client) as stream:
            results = pca_units(da.from_zarr(str(tmp_path / "y.zarr")))
        # A worker killed for memory would have been restarted by its nanny at a new address.
        assert set(client.scheduler_info()["workers"]) == workers
        # The cluster did the work: one statistics task per stored chunk, i.e. a single pass.
        done = [t for t in stream.data if "_block_stats" in str(t["key"])]
        assert len(done) == (n // rows) * units

    for u in range(units):
        assert_matches_numpy(results[u], store[:, u])


def test_pca_rejects_nan_and_inf_naming_the_unit():
    x = spectral_data(np.random.default_rng(3), 300, 3, 8)
    x[17, 1, 5] = np.nan
    with pytest.raises(SpectralInputError, match=r"NaN or inf.*unit\(s\) \[1\]"):
        pca_units(da.from_array(x, chunks=(100, 1, 8)))
    x[17, 1, 5] = np.inf
    with pytest.raises(ResidualError, match="NaN or inf"):
        pca(da.from_array(x[:, 1], chunks=(100, 8)))


def test_pca_rejects_wrong_shapes_and_too_few_samples():
    with pytest.raises(SpectralInputError, match="2 dimensions"):
        pca(da.zeros((10, 2, 4)))
    with pytest.raises(SpectralInputError, match="3 dimensions"):
        pca_units(da.zeros((10, 4)))
    with pytest.raises(SpectralInputError, match="at least 2 samples"):
        pca(da.zeros((1, 4)))
    with pytest.raises(SpectralInputError, match="real numbers"):
        pca(da.zeros((10, 4), dtype=complex))
    assert issubclass(SpectralInputError, ValueError)


# --------------------------------------------------------------------------------- statistics


def test_unit_stats_against_hand_computed_numbers():
    stats = unit_stats(np.array([4.0, 3.0, 2.0, 1.0]))
    np.testing.assert_allclose(stats["evr"], [0.4, 0.3, 0.2, 0.1])
    np.testing.assert_allclose(stats["cumulative_evr"], [0.4, 0.7, 0.9, 1.0])
    assert stats["k90"] == 3  # cumulative EVR reaches 0.9 exactly at k = 3
    assert stats["k99"] == 4
    assert stats["evr1"] == pytest.approx(0.4)
    assert stats["participation_ratio"] == pytest.approx(100 / 30)  # 10² / (16+9+4+1)
    assert stats["total_variance"] == pytest.approx(10.0)

    stats = unit_stats(np.array([0.95, 0.04, 0.01, 0.0]))
    assert (stats["k90"], stats["k99"]) == (1, 2)
    assert stats["participation_ratio"] == pytest.approx(1 / (0.95**2 + 0.04**2 + 0.01**2))


def test_unit_stats_of_a_zero_variance_unit_is_all_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = unit_stats(np.zeros(8))
    assert np.array_equal(stats["evr"], np.zeros(8))
    assert np.array_equal(stats["cumulative_evr"], np.zeros(8))
    assert (stats["k90"], stats["k99"], stats["evr1"], stats["participation_ratio"]) == (0, 0, 0, 0)


# -------------------------------------------------------------------------------------- TwoNN


def random_embedding(rng, intrinsic, ambient):
    """``[ambient, intrinsic]`` matrix with orthonormal columns."""
    return np.linalg.qr(rng.standard_normal((ambient, intrinsic)))[0]


def test_twonn_on_a_5d_linear_subspace_of_64d():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4000, 5)) @ random_embedding(rng, 5, 64).T + 2.0
    assert twonn(x) == pytest.approx(5, rel=0.15)


def test_twonn_on_a_swiss_roll_embedded_in_16d():
    rng = np.random.default_rng(5)
    roll, _ = make_swiss_roll(4000, random_state=5)
    assert twonn(roll @ random_embedding(rng, 3, 16).T) == pytest.approx(2, rel=0.15)


def test_twonn_collapses_duplicates_and_gives_0_for_a_constant_unit():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1000, 3)) @ random_embedding(rng, 3, 10).T
    assert twonn(np.concatenate([x, x[:200]])) == twonn(x)
    assert twonn(np.ones((50, 10))) == 0.0
    with pytest.raises(SpectralInputError, match="at least 3 distinct"):
        twonn(np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(SpectralInputError, match="NaN or inf"):
        twonn(np.full((10, 3), np.nan))
    with pytest.raises(SpectralInputError, match="2 dimensions"):
        twonn(np.zeros(10))


def test_sample_rows_draws_the_subsample_twonn_would_draw():
    rng = np.random.default_rng(7)
    linear = rng.standard_normal((3000, 4)) @ random_embedding(rng, 4, 12).T
    x = np.stack([rng.standard_normal((3000, 12)), linear], axis=1).astype(np.float32)
    y = da.from_array(x, chunks=(700, 1, 12))
    rows = sample_rows(y, unit=1, max_samples=1000, seed=3)
    assert rows.shape == (1000, 12) and rows.dtype == np.float32
    assert twonn(rows, max_samples=1000, seed=3) == twonn(x[:, 1], max_samples=1000, seed=3)
    np.testing.assert_array_equal(sample_rows(y[:500, 0], max_samples=1000), x[:500, 0])
    with pytest.raises(SpectralInputError, match="unit index"):
        sample_rows(y)


# --------------------------------------------------------------------------- basis similarity

DIM = 16
# k90 = 5: cumulative EVR 0.26, 0.52, 0.79, 0.89, 0.94; the first three eigenvalues are equal.
EIGENVALUES = np.array([5.0, 5.0, 5.0, 2.0, 1.0] + [0.1] * (DIM - 5))


@pytest.fixture
def basis():
    return special_ortho_group.rvs(DIM, random_state=8)


@pytest.mark.parametrize("method", ["subspace", "greedy"])
def test_similarity_with_itself_is_1_and_with_an_orthogonal_basis_is_0(basis, method):
    def score(other):
        return basis_similarity(basis, EIGENVALUES, other, EIGENVALUES, method=method)

    assert score(basis) == pytest.approx(1, abs=1e-12)
    assert score(np.roll(basis, -8, axis=0)) == pytest.approx(0, abs=1e-12)  # rows 8..12 vs 0..4


def test_similarity_with_a_copy_rotated_within_an_equal_eigenvalue_block_is_1(basis):
    rotated = basis.copy()
    rotated[:3] = special_ortho_group.rvs(3, random_state=9) @ basis[:3]
    assert basis_similarity(basis, EIGENVALUES, rotated, EIGENVALUES) == pytest.approx(1, abs=1e-12)
    # METHOD's literal greedy matching depends on the arbitrary vectors chosen in that block.
    assert basis_similarity(basis, EIGENVALUES, rotated, EIGENVALUES, method="greedy") < 0.99


def test_similarity_of_partially_overlapping_bases_is_strictly_between_0_and_1(basis):
    shifted = np.roll(basis, -3, axis=0)  # kept rows 3..7 share rows 3 and 4 with rows 0..4
    score = basis_similarity(basis, EIGENVALUES, shifted, EIGENVALUES)
    assert 0.05 < score < 0.95


def test_similarity_methods_agree_for_aligned_bases_with_different_weights(basis):
    other = np.array([8.0, 4.0, 2.0, 1.0, 0.5] + [0.1] * (DIM - 5))  # k90 = 4
    permuted = basis[[2, 0, 3, 1] + list(range(4, DIM))]
    subspace = basis_similarity(basis, EIGENVALUES, permuted, other)
    greedy = basis_similarity(basis, EIGENVALUES, permuted, other, method="greedy")
    assert greedy == pytest.approx(subspace, abs=1e-12)
    assert 0.5 < subspace < 1


def test_similarity_table_and_zero_variance_units(basis):
    results = [
        PCAResult(np.zeros(DIM), basis, EIGENVALUES, 100),
        PCAResult(np.zeros(DIM), np.eye(DIM), np.zeros(DIM), 100),
    ]
    rows = basis_similarity_table(results, results, ["L0H0", "emb"])
    assert [r["unit"] for r in rows] == ["L0H0", "emb"]
    assert rows[0]["similarity"] == pytest.approx(1)
    assert rows[0]["similarity_greedy"] == pytest.approx(1)
    assert rows[0]["authors"] == pytest.approx(1) and math.isnan(rows[1]["authors"])
    assert (rows[0]["k_a"], rows[0]["k_b"]) == (5, 5)
    assert math.isnan(rows[1]["similarity"]) and rows[1]["k_a"] == 0
    with pytest.raises(SpectralInputError, match="as many"):
        basis_similarity_table(results, results[:1], ["L0H0", "emb"])


# ------------------------------------------------------------- the authors' spectral cosine


def reference_authors_similarity(components_a, eigenvalues_a, components_b, eigenvalues_b,
                                 threshold):
    """A straightforward reimplementation of the ResiDual authors' measure (their
    ``get_k`` + ``get_weights`` + ``normalized_spectral_cosine``), in loops and float64."""

    def k_of(lam):
        total = sum(float(v) for v in lam)
        cumulative = 0.0
        for i, v in enumerate(lam):
            cumulative += float(v) / total
            if cumulative > threshold:  # strictly: theirs is argmax(evr > threshold) + 1
                return i + 1
        return 1

    ka, kb = k_of(eigenvalues_a), k_of(eigenvalues_b)
    w = [float(v) for v in eigenvalues_a[:ka]]
    v = [float(x) for x in eigenvalues_b[:kb]]
    diag = math.sqrt(sum((w[i] * v[i]) ** 2 for i in range(min(ka, kb))))
    c = [[abs(sum(float(p) * float(q) for p, q in zip(components_a[i], components_b[j])))
          * w[i] * v[j] / diag for j in range(kb)] for i in range(ka)]
    rows, cols, picked = set(), set(), []
    for _ in range(min(ka, kb)):
        best = None
        for i in range(ka):
            for j in range(kb):
                if i not in rows and j not in cols and (best is None or c[i][j] > best[0]):
                    best = (c[i][j], i, j)
        picked.append(best[0])
        rows.add(best[1])
        cols.add(best[2])
    return math.sqrt(sum(p * p for p in picked))


def decaying(rng, dim, rate):
    return np.sort(rng.exponential(1.0, dim) * np.exp(-rate * np.arange(dim)))[::-1]


def test_authors_similarity_of_one_span_with_itself_under_other_weights_is_1(basis):
    other = np.array([9.0, 3.0, 1.0, 0.5, 0.2] + [0.05] * (DIM - 5))  # kept: 3 vs 5 rows
    flipped = basis * np.where(np.arange(DIM) % 2, -1.0, 1.0)[:, None]  # signs do not count
    for eigenvalues_b in (EIGENVALUES, other, EIGENVALUES[::-1].cumsum()[::-1]):
        assert basis_similarity(basis, EIGENVALUES, flipped, eigenvalues_b,
                                method="authors") == pytest.approx(1, abs=1e-12)
    # ours is stricter: other weights, or a nested basis, score below 1
    assert basis_similarity(basis, EIGENVALUES, basis, other, method="greedy") < 0.99


def test_authors_similarity_of_orthogonal_spans_is_0(basis):
    assert basis_similarity(basis, EIGENVALUES, np.roll(basis, -8, axis=0), EIGENVALUES,
                            method="authors") == pytest.approx(0, abs=1e-12)


def test_authors_similarity_equals_a_loop_reimplementation_on_random_bases():
    rng = np.random.default_rng(5)
    scores = []
    for trial in range(12):
        dim = int(rng.integers(6, 20))
        a = special_ortho_group.rvs(dim, random_state=rng)
        # half the trials: b shares a's leading directions, mixed, so scores spread over (0, 1)
        b = special_ortho_group.rvs(dim, random_state=rng)
        if trial % 2:
            mix = special_ortho_group.rvs(4, random_state=rng)
            b[:4] = 0.7 * (mix @ a[:4]) + 0.3 * b[:4]
            b = np.linalg.qr(b.T)[0].T
        lam_a, lam_b = decaying(rng, dim, 0.3), decaying(rng, dim, rng.uniform(0.05, 0.6))
        for threshold in (0.5, 0.9):
            ours = basis_similarity(a, lam_a, b, lam_b, threshold, method="authors")
            ref = reference_authors_similarity(a, lam_a, b, lam_b, threshold)
            assert ours == pytest.approx(ref, rel=1e-12, abs=1e-15)
            # symmetric in a, b; bounded by 1 (eigenvalue weights are sorted)
            assert basis_similarity(b, lam_b, a, lam_a, threshold, method="authors") == \
                pytest.approx(ours, rel=1e-12, abs=1e-15)
            assert 0 <= ours <= 1 + 1e-12
            scores.append(ours)
    assert min(scores) < 0.5 < max(scores) < 1  # the cases are not all trivial


def test_authors_truncation_is_strictly_above_the_threshold():
    # cumulative EVR 0.5, 0.75, 0.875, 0.9375, 1 (exact in binary)
    lam = np.array([8.0, 4.0, 2.0, 1.0, 1.0, 0.0])
    assert authors_k(lam, 0.875) == 4 and unit_stats(lam)["k90"] == 4
    fit = PCAResult(np.zeros(6), np.eye(6), lam, 10)
    (row,) = basis_similarity_table([fit], [fit], ["L0H0"], 0.875)
    assert row["k_a"] == 3  # ours reaches 0.875 at 3 components
    assert [authors_k(lam, t) for t in (0.4, 0.5, 0.6, 0.9, 0.95)] == [1, 2, 2, 4, 5]
    assert authors_k(np.zeros(4), 0.9) == 0
    # the 4th component counts for the authors at 0.875, not for ours: replace it by a
    # direction orthogonal to a's kept ones
    a = np.eye(6)
    b = a[[0, 1, 2, 5, 4, 3]]
    score = basis_similarity(a, lam, b, lam, 0.875, method="authors")
    assert score == pytest.approx(math.sqrt((64**2 + 16**2 + 4**2) / (64**2 + 16**2 + 4**2 + 1)),
                                  rel=1e-14)
    assert basis_similarity(a, lam, b, lam, 0.875, method="greedy") == pytest.approx(1)


def test_normalized_spectral_cosine_without_weights_compares_components_by_rank():
    a = np.eye(4)[:3]
    b = np.eye(4)[[1, 0, 2]]  # same span, first two swapped
    assert normalized_spectral_cosine(a, a) == pytest.approx(1)
    assert normalized_spectral_cosine(a, b) == pytest.approx(math.sqrt(1 / 3))  # only (2, 2)
    assert normalized_spectral_cosine(a, b, [3, 2, 1], [3, 2, 1]) == pytest.approx(
        math.sqrt((6**2 + 6**2 + 1) / (9**2 + 4**2 + 1)))
    with pytest.raises(SpectralInputError, match="both"):
        normalized_spectral_cosine(a, b, [1, 1, 1])


def test_authors_weights_singular_and_zero_variance(basis):
    singular = basis_similarity(basis, EIGENVALUES, np.roll(basis, -3, axis=0), EIGENVALUES,
                                method="authors", weights="singular")
    eigen = basis_similarity(basis, EIGENVALUES, np.roll(basis, -3, axis=0), EIGENVALUES,
                             method="authors")
    assert 0 < eigen < singular < 1  # square roots weigh the shared tail rows more
    # their unweighted variant compares components by rank: rows 0..4 vs 3..7 share none
    unweighted = basis_similarity(basis, EIGENVALUES, np.roll(basis, -3, axis=0), EIGENVALUES,
                                  method="authors", weights="none")
    assert unweighted == pytest.approx(0, abs=1e-12)
    swapped = basis[[1, 0] + list(range(2, DIM))]
    assert basis_similarity(basis, EIGENVALUES, swapped, EIGENVALUES, method="authors",
                            weights="none") == pytest.approx(math.sqrt(3 / 5))
    assert math.isnan(basis_similarity(basis, np.zeros(DIM), basis, EIGENVALUES,
                                       method="authors"))
    with pytest.raises(SpectralInputError, match="method"):
        basis_similarity(basis, EIGENVALUES, basis, EIGENVALUES, method="paper")


def test_cross_model_correlations_match_heads_by_name():
    rng = np.random.default_rng(0)
    lam = {f"L{l}H{h}": decaying(rng, 8, 0.4) for l in range(3) for h in range(2)}
    dims = {name: float(rng.uniform(2, 6)) for name in lam}
    stats_a = head_statistics(lam, dims, evr_counts(8))
    assert evr_counts(8) == (1, 2, 4) and evr_counts(64) == (1, 2, 4, 8, 16, 32)
    other = {name: lam[name] * rng.uniform(0.5, 2.0, 8) for name in list(lam)[1:]}
    other["L9H9"] = decaying(rng, 8, 0.1)
    stats_b = head_statistics({n: np.sort(v)[::-1] for n, v in other.items()},
                              {n: dims.get(n, 1.0) + rng.normal(0, 0.3) for n in other},
                              evr_counts(8))
    result = cross_model_correlations(stats_a, stats_b)
    assert result["only_a"] == ["L0H0"] and result["only_b"] == ["L9H9"]
    heads = result["heads"]
    assert heads == list(lam)[1:]
    from scipy.stats import pearsonr, spearmanr

    for name in ("k90", "twonn"):
        x = [stats_a[name][h] for h in heads]
        y = [stats_b[name][h] for h in heads]
        got = result["statistics"][name]
        if np.ptp(x) and np.ptp(y):
            assert got["pearson"] == pytest.approx(pearsonr(x, y)[0], rel=1e-12)
            assert got["spearman"] == pytest.approx(spearmanr(x, y)[0], rel=1e-12)
        assert got["n_heads"] == 5 and got["n_values"] == 5
    curves = result["statistics"]["cumulative_evr"]
    x = np.concatenate([stats_a["cumulative_evr"][h] for h in heads])
    y = np.concatenate([stats_b["cumulative_evr"][h] for h in heads])
    assert curves["pearson"] == pytest.approx(pearsonr(x, y)[0], rel=1e-12)
    assert curves["n_values"] == 15
    constant = cross_model_correlations({"k90": {"a": 3, "b": 3}}, {"k90": {"a": 1, "b": 2}})
    assert math.isnan(constant["statistics"]["k90"]["pearson"])
    with pytest.raises(SpectralInputError, match="counts"):
        head_statistics(lam, dims, (1, 9))
