"""Tests of residual_core.method.explain (TextSpan, SOMP, concept scores) and its text dictionaries.

The references below are written independently of the module, straight from the authors' code
(clip_text_span's replace_with_iterative_removal, ResiDual's somp), in plain float64 loops.
"""

import re
from importlib import resources

import numpy as np
import pytest

from residual_core.errors import ResidualError, ShapeError
from residual_core.method import explain
from residual_core.method.explain import (
    ExplainInputError,
    class_separation,
    concept_scores,
    principal_directions,
    somp,
    textspan,
)


@pytest.fixture(params=["one-chunk", "tiny-chunks"])
def chunking(request, monkeypatch):
    """Run a test with the default row chunks and with chunks of a handful of rows."""
    if request.param == "tiny-chunks":
        monkeypatch.setattr(explain, "_CHUNK_BYTES", 8 * 7 * 64)  # ~7 rows of width 64
    return request.param


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _orthonormal(rng, n, d):
    return np.linalg.qr(rng.normal(size=(d, n)))[0].T  # (n, d) orthonormal rows


def _whitened(rng, n, k):
    """(n, k) latent coordinates with mean exactly 0 and covariance exactly I (ddof=1)."""
    z = rng.normal(size=(n, k))
    z -= z.mean(axis=0)
    q = np.linalg.qr(z)[0]
    return q * np.sqrt(n - 1)


# ------------------------------------------------------------------------------ references


def _reference_textspan(data, texts, iters, rank, centred_svd=False):
    """The authors' algorithm, float64, looped over texts; returns (indices, scores, evr)."""
    data = np.array(data, dtype=np.float64)
    texts = np.array(texts, dtype=np.float64)
    for i in range(len(texts)):
        texts[i] = texts[i] / np.sqrt(np.sum(texts[i] ** 2))
    n = data.shape[0]
    svd_input = data - data.mean(axis=0) if centred_svd else data
    _, _, vh = np.linalg.svd(svd_input, full_matrices=False)
    vh = vh[:rank]
    texts = (vh.T @ np.linalg.inv(vh @ vh.T) @ vh @ texts.T).T
    data = data - data.mean(axis=0, keepdims=True)
    total = sum(np.var(data[:, c], ddof=1) for c in range(data.shape[1]))
    indices, scores, evr = [], [], []
    for _ in range(iters):
        stds = np.array([np.std(data @ texts[j], ddof=1) for j in range(len(texts))])
        top = int(np.argmax(stds))
        t = texts[top].copy()
        t_norm = t @ t
        coef = data @ t / t_norm
        removed = np.var(coef * np.sqrt(t_norm), ddof=1)
        indices.append(top)
        scores.append(stds[top])
        evr.append(removed / total)
        data = data - coef[:, None] * t[None, :]
        for j in range(len(texts)):
            texts[j] = texts[j] - (texts[j] @ t / t_norm) * t
    return np.array(indices), np.array(scores), np.array(evr)


def _reference_somp(x, dictionary, k, criterion="l1", centering=True):
    """The ResiDual authors' somp, float64, looped over atoms; returns (atoms, coefficients)."""
    x = np.array(x, dtype=np.float64)
    if centering:
        x = x - x.mean(axis=0, keepdims=True)
    residual = x.copy()
    chosen, coef = [], None
    for _ in range(k):
        scores = np.empty(len(dictionary))
        for m, atom in enumerate(dictionary):
            cross = residual @ atom
            scores[m] = np.sum(np.abs(cross)) if criterion == "l1" else np.std(cross, ddof=1)
            if m in chosen:
                scores[m] = 0.0
        chosen.append(int(np.argmax(scores)))
        atoms = dictionary[chosen]
        coef = np.linalg.lstsq(atoms.T, x.T, rcond=None)[0]
        residual = x - (atoms.T @ coef).T
    return np.array(chosen), coef


# -------------------------------------------------------------------------------- TextSpan


@pytest.mark.parametrize("rank", [80, 4])
def test_textspan_recovers_planted_texts_in_variance_order(chunking, rank):
    rng = np.random.default_rng(0)
    n, d, m = 600, 32, 203
    planted_at = np.array([17, 150, 88])  # in decreasing variance order
    sigma = np.array([3.0, 2.0, 1.0])
    dictionary = _unit(rng.normal(size=(m, d)))
    directions = _orthonormal(rng, 3, d)
    dictionary[planted_at] = directions
    # texts are normalised inside: scaled rows must not change anything
    dictionary *= rng.uniform(0.3, 3.0, size=(m, 1))
    offset = 5.0 * _unit(rng.normal(size=d))  # a mean far from zero
    data = offset + (_whitened(rng, n, 3) * sigma) @ directions

    result = textspan(data, dictionary, n_texts=3, rank=rank)

    np.testing.assert_array_equal(result.indices, planted_at)
    np.testing.assert_allclose(result.scores, sigma, rtol=1e-9)
    np.testing.assert_allclose(result.explained_variance, sigma**2 / np.sum(sigma**2),
                               rtol=1e-9)
    assert result.explained_variance.sum() == pytest.approx(1.0, abs=1e-9)
    assert result.total_variance == pytest.approx(np.sum(sigma**2), rel=1e-9)
    np.testing.assert_allclose(np.abs(result.directions @ directions.T), np.eye(3), atol=1e-9)
    np.testing.assert_allclose(result.mean, offset, atol=1e-9)
    assert result.rank == min(rank, d)


def _random_head(seed, n=400, d=24, m=120):
    rng = np.random.default_rng(seed)
    scales = np.geomspace(4.0, 0.1, d)
    data = (rng.normal(size=(n, d)) * scales) @ _orthonormal(rng, d, d)
    data += 3.0 * rng.normal(size=d)  # a large mean: the authors' SVD is of the uncentred data
    texts = rng.normal(size=(m, d)) * rng.uniform(0.5, 2.0, size=(m, 1))
    return data, texts


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_textspan_matches_independent_reference(chunking, seed):
    data, texts = _random_head(seed)
    ref_idx, ref_scores, ref_evr = _reference_textspan(data, texts, iters=8, rank=10)
    # the fixture is sensitive to the SVD being taken before centring, as the authors do
    alt_idx, alt_scores, _ = _reference_textspan(data, texts, iters=8, rank=10,
                                                  centred_svd=True)
    assert (not np.array_equal(alt_idx, ref_idx)
            or not np.allclose(alt_scores, ref_scores, rtol=1e-3))

    result = textspan(data, texts, n_texts=8, rank=10)

    np.testing.assert_array_equal(result.indices, ref_idx)
    np.testing.assert_allclose(result.scores, ref_scores, rtol=1e-6)
    np.testing.assert_allclose(result.explained_variance, ref_evr, rtol=1e-6)
    assert result.explained_variance.sum() < 1.0
    # float32 input gives the same picks
    result32 = textspan(data.astype(np.float32), texts.astype(np.float32), n_texts=8, rank=10)
    np.testing.assert_array_equal(result32.indices, ref_idx)
    np.testing.assert_allclose(result32.scores, ref_scores, rtol=1e-4)


def test_textspan_directions_reconstruct_like_the_authors():
    data, texts = _random_head(4)
    result = textspan(data, texts, n_texts=6, rank=12)
    # the authors' reconstruct: mean + sum of the deflated parts; deflated data = the rest
    np.testing.assert_allclose(result.directions @ result.directions.T, np.eye(6), atol=1e-10)
    centred = data - data.mean(axis=0)
    kept = centred @ result.directions.T @ result.directions
    removed_var = np.var(kept, axis=0, ddof=1).sum() / result.total_variance
    assert removed_var == pytest.approx(result.explained_variance.sum(), rel=1e-9)


# ------------------------------------------------------------------------------------ SOMP


def test_somp_single_signal_matches_sklearn_omp():
    from sklearn.linear_model import orthogonal_mp
    rng = np.random.default_rng(5)
    d, m, k = 40, 60, 8
    dictionary = _unit(rng.normal(size=(m, d)))
    y = rng.normal(size=d)  # a generic signal: every greedy step is a real decision

    result = somp(y[None, :], dictionary, k=k, centering=False)

    path = orthogonal_mp(dictionary.T, y, n_nonzero_coefs=k, return_path=True)  # (m, k)
    sk_order = []
    for step in range(k):
        new = [i for i in np.flatnonzero(path[:, step]) if i not in sk_order]
        assert len(new) == 1
        sk_order.append(new[0])
    np.testing.assert_array_equal(result.atoms, sk_order)
    coef_by_atom = dict(zip(result.atoms.tolist(), result.coefficients[:, 0]))
    np.testing.assert_allclose([coef_by_atom[i] for i in sk_order], path[sk_order, -1],
                               rtol=1e-8, atol=1e-10)


def test_somp_recovers_planted_atoms_from_noisy_signals(chunking):
    rng = np.random.default_rng(6)
    n, d, m = 200, 64, 300
    planted = np.array([3, 77, 150, 299])
    dictionary = _unit(rng.normal(size=(m, d)))
    signals = rng.normal(size=(n, 4)) @ dictionary[planted] + 0.01 * rng.normal(size=(n, d))
    signals += rng.normal(size=d)  # a common offset, removed by the centring

    result = somp(signals, dictionary, k=4)

    assert set(result.atoms.tolist()) == set(planted.tolist())
    assert np.all(np.diff(result.residual_norms) < 0)
    noise_norm = 0.01 * np.sqrt(n * d)
    assert result.residual_norms[-1] < 1.1 * noise_norm  # only the noise is left
    assert result.residual_norms[-2] > 5 * noise_norm  # three atoms do not suffice
    assert result.explained_variance[-1] > 0.998


@pytest.mark.parametrize("criterion", ["l1", "std"])
def test_somp_matches_reference_and_lstsq_refit(chunking, criterion):
    rng = np.random.default_rng(7)
    n, d, m, k = 90, 20, 50, 6
    dictionary = _unit(rng.normal(size=(m, d)))
    signals = rng.normal(size=(n, d)) * np.geomspace(3, 0.3, d) + 2.0

    result = somp(signals, dictionary, k=k, criterion=criterion)

    ref_atoms, ref_coef = _reference_somp(signals, dictionary, k, criterion=criterion)
    np.testing.assert_array_equal(result.atoms, ref_atoms)
    centred = signals - signals.mean(axis=0)
    lstsq = np.linalg.lstsq(dictionary[result.atoms].T, centred.T, rcond=None)[0]
    np.testing.assert_allclose(result.coefficients, lstsq, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.coefficients, ref_coef, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.weights, np.linalg.norm(lstsq, axis=1), rtol=1e-12)
    np.testing.assert_array_equal(result.order, np.argsort(-result.weights))
    fit = (dictionary[result.atoms].T @ lstsq).T
    assert result.residual_norms[-1] == pytest.approx(np.linalg.norm(centred - fit), rel=1e-10)
    authors_evr = np.var(fit, axis=0, ddof=1).sum() / np.var(signals, axis=0, ddof=1).sum()
    assert result.explained_variance[-1] == pytest.approx(authors_evr, rel=1e-10)
    np.testing.assert_allclose(result.mean, signals.mean(axis=0), rtol=1e-12)


# -------------------------------------------------------------------------- concept scores


def test_concept_scores_equal_direct_variance(chunking):
    rng = np.random.default_rng(8)
    n, d = 300, 16
    data = rng.normal(size=(n, d)) * np.geomspace(5, 0.2, d) + 1.5
    centred = data - data.mean(axis=0)
    for c in (5, 40):  # fewer and more concepts than dimensions (two code paths)
        concepts = rng.normal(size=(c, d)) * rng.uniform(0.1, 4.0, size=(c, 1))
        expected = [np.var(centred @ (v / np.linalg.norm(v))) for v in concepts]
        np.testing.assert_allclose(concept_scores(data, concepts), expected, rtol=1e-10)


def test_concept_scores_with_basis_and_main_direction():
    rng = np.random.default_rng(9)
    n, d = 500, 12
    rotation = _orthonormal(rng, d, d)
    data = (rng.normal(size=(n, d)) * np.geomspace(6, 0.3, d)) @ rotation
    centred = data - data.mean(axis=0)
    main = 2.5 * rotation[0]  # the data's main direction, not unit length
    concepts = np.vstack([rng.normal(size=(6, d)), main, rng.normal(size=(3, d))])
    scores = concept_scores(data, concepts)
    assert int(np.argmax(scores)) == 6

    basis = rotation[[0, 2, 5]]
    with_basis = concept_scores(data, np.vstack([concepts, rotation[7]]), basis=basis)
    for i, v in enumerate(concepts):
        p = basis.T @ (basis @ v)
        assert with_basis[i] == pytest.approx(np.var(centred @ (p / np.linalg.norm(p))),
                                              rel=1e-10)
    assert with_basis[-1] == 0.0  # orthogonal to the span: documented as 0


def test_class_separation_is_the_r2_of_the_class_means(chunking):
    """eta^2 along each direction equals the R^2 of a least-squares fit of the projections on
    class indicators (independent), is ~1 along a direction only the classes move and ~0 along
    one they do not; labels need not be 0..C-1."""
    rng = np.random.default_rng(11)
    n, d = 600, 10
    labels = rng.integers(3, size=n) * 7 + 2  # classes 2, 9, 16
    data = rng.normal(size=(n, d)) * 0.05 + 3.0
    data[:, 0] += labels / 7.0  # the classes move dimension 0 only
    directions = np.vstack([np.eye(d)[0] * 3.0, np.eye(d)[4], rng.normal(size=(2, d))])
    got = class_separation(data, directions, labels)
    p = (data - data.mean(0)) @ (directions / np.linalg.norm(directions, axis=1, keepdims=True)).T
    onehot = (labels[:, None] == np.unique(labels)[None]).astype(float)
    fit = onehot @ np.linalg.lstsq(onehot, p, rcond=None)[0]
    np.testing.assert_allclose(got, 1 - ((p - fit) ** 2).sum(0) / (p ** 2).sum(0), atol=1e-12)
    assert got[0] > 0.99 and got[1] < 0.02


def test_principal_directions_span_numpys_top_eigenvectors(chunking):
    rng = np.random.default_rng(12)
    n, d = 400, 9
    data = (rng.normal(size=(n, d)) * np.geomspace(4, 0.1, d)) @ _orthonormal(rng, d, d) + 2.0
    centred = data - data.mean(0)
    vectors = np.linalg.eigh(centred.T @ centred)[1][:, ::-1]  # decreasing
    got = principal_directions(data, 3)
    assert got.shape == (3, d)
    np.testing.assert_allclose(got @ got.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(got * vectors[:, :3].T, axis=1)), 1.0, atol=1e-9)
    assert principal_directions(data, 50).shape == (d, d)  # clamped to min(N, D)


# ------------------------------------------------------------------------------- bad input

_D = 8


def _ok():
    rng = np.random.default_rng(10)
    return rng.normal(size=(30, _D)), rng.normal(size=(12, _D))


@pytest.mark.parametrize("call, error, match", [
    (lambda x, t: textspan(x, t[:0], 2), ExplainInputError, "texts.*at least 1 row"),
    (lambda x, t: textspan(x, t[:, :5], 2), ShapeError, "embedding width 5 .* has 8"),
    (lambda x, t: textspan(x, t, 2, rank=0), ExplainInputError, "rank must be at least 1"),
    (lambda x, t: textspan(x, t, 0), ExplainInputError, "n_texts must be at least 1"),
    (lambda x, t: textspan(x, t, 2.0), ExplainInputError, "n_texts must be an integer"),
    (lambda x, t: textspan(x, t, 13), ExplainInputError, "exceeds the dictionary size 12"),
    (lambda x, t: textspan(x, t, 4, rank=3), ExplainInputError, "exceeds the rank"),
    (lambda x, t: textspan(np.where(x > 1, np.nan, x), t, 2), ExplainInputError,
     "contributions contains NaN"),
    (lambda x, t: textspan(x, np.where(t > 1, np.inf, t), 2), ExplainInputError,
     "texts.*NaN or infinite"),
    (lambda x, t: textspan(x, np.vstack([t, np.zeros(_D)]), 2), ExplainInputError,
     "row 12 has zero norm"),
    (lambda x, t: textspan(np.ones_like(x), t, 2), ExplainInputError, "zero variance"),
    (lambda x, t: textspan(x[:1], t, 1), ExplainInputError, "at least 2 row"),
    (lambda x, t: textspan(x[0], t, 1), ShapeError, "2-D array"),
    (lambda x, t: textspan(x.astype(complex), t, 1), ShapeError, "real float"),
    (lambda x, t: textspan(x, np.repeat(t[:1], 3, axis=0), 2), ExplainInputError,
     "after 1 picks every remaining text"),
    (lambda x, t: somp(x, t[:0], 1), ExplainInputError, "dictionary needs at least 1 row"),
    (lambda x, t: somp(x, t[:, :5], 1), ShapeError, "dictionary has embedding width 5"),
    (lambda x, t: somp(x, t, 0), ExplainInputError, "k must be at least 1"),
    (lambda x, t: somp(x, t, 13), ExplainInputError, "k=13 exceeds the dictionary size 12"),
    (lambda x, t: somp(x, t, 2, criterion="l2"), ExplainInputError, "criterion must be"),
    (lambda x, t: somp(x[:1], t, 2), ExplainInputError, "centering a single signal"),
    (lambda x, t: somp(x, np.where(t > 1, np.nan, t), 2), ExplainInputError,
     "dictionary contains NaN"),
    (lambda x, t: concept_scores(x, t[:, :5]), ShapeError, "concepts has embedding width 5"),
    (lambda x, t: concept_scores(x, np.zeros((2, _D))), ExplainInputError, "zero norm"),
    (lambda x, t: concept_scores(x, t, basis=2 * np.eye(_D)[:3]), ExplainInputError,
     "orthonormal"),
    (lambda x, t: concept_scores(x, t, basis=np.eye(5)), ShapeError,
     "basis has embedding width 5"),
    (lambda x, t: class_separation(x, t, np.zeros(29, dtype=int)), ShapeError,
     "labels must be 30 integers"),
    (lambda x, t: class_separation(x, t, np.zeros(30)), ShapeError, "labels must be 30 integers"),
    (lambda x, t: class_separation(x, np.zeros((1, _D)), np.zeros(30, dtype=int)),
     ExplainInputError, "zero norm"),
])
def test_bad_input_is_a_residual_error(call, error, match):
    x, t = _ok()
    with pytest.raises(error, match=match) as info:
        call(x, t)
    assert isinstance(info.value, ResidualError)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------- dictionaries


def _resource_lines(name):
    text = (resources.files("residual_core") / "resources" / name).read_text(encoding="utf-8")
    return text.splitlines()


def test_world_descriptions_name_every_class_and_some_distractors():
    from residual_core.world.rendering import CLASSNAMES

    lines = _resource_lines("world_descriptions.txt")
    assert len(lines) == len(set(lines)) and all(line.strip() == line and line for line in lines)
    names = [(a, name) for a, values in CLASSNAMES.items() for name in values]

    def mentions(line, name):
        return re.search(rf"\b{re.escape(name)}\b", line) is not None

    missing = [(a, name) for a, name in names if not any(mentions(ln, name) for ln in lines)]
    assert not missing
    distractors = [ln for ln in lines
                   if not any(mentions(ln, name) for _, name in names)
                   and not re.search(r"\d", ln)]
    assert len(distractors) >= 20


def test_textspan_descriptions_are_the_shared_dictionary():
    lines = _resource_lines("textspan_descriptions.txt")
    assert len(lines) == 3498 and len(set(lines)) == 3498 and all(lines)
    assert lines[0] == "A badge"
