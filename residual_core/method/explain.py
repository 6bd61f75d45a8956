"""Explain residual units in text: TextSpan, SOMP and concept scores (the numerical core).

Every function takes ONE unit's (head's) output-space contributions ``[N, D]`` over a dataset
(``N`` samples, ``D`` = joint embedding width) and a text dictionary ``[M, D]`` of text embeddings
of the same width. Nothing here needs all units at once, nothing here knows about stores, models
or orchestration. Inputs may be float32 or float64; all arithmetic is float64, in row chunks, so
that memory stays bounded (no ``N x M`` matrix is ever held; see each function's notes).

- :func:`textspan`: the TextSpan algorithm of Gandelsman et al., "Interpreting CLIP's image
  representation via text-based decomposition" (ICLR 2024), as ``replace_with_iterative_removal``
  in ``compute_complete_text_set.py`` of github.com/yossigandelsman/clip_text_span.
- :func:`somp`: simultaneous orthogonal matching pursuit as ``somp`` / ``SOMP`` in
  ``src/residual/sparse_decomposition.py`` of github.com/Flegyas/ResiDual.
- :func:`concept_scores`: the variance of a unit along given concept directions, to rank units
  by how much of a concept ("a red digit") they carry.
- :func:`class_separation`: how much of a unit's variance along given directions (e.g. the
  picks of TextSpan) the class means of a labelling account for (eta^2): whether a description
  is about what separates a dataset's classes.

Errors caused by the input raise :class:`ExplainInputError` (bad values or parameters) or
:class:`~residual_core.errors.ShapeError` (bad shapes or dtypes); both are
:class:`~residual_core.errors.ResidualError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from residual_core.errors import ResidualError, ShapeError

__all__ = [
    "ExplainInputError",
    "TextSpanResult",
    "SompResult",
    "textspan",
    "somp",
    "concept_scores",
    "class_separation",
    "principal_directions",
]

# Row chunks are sized so that one float64 chunk of the widest matrix involved is about this big.
_CHUNK_BYTES = 32 * 2**20
# A (projected, deflated) text or concept whose norm is at most this (inputs are unit-normalised)
# is numerically zero.
_ZERO_NORM = 1e-10
# Tolerance of the orthonormality check of a basis given to concept_scores.
_ORTHONORMAL_TOL = 1e-6


class ExplainInputError(ResidualError, ValueError):
    """Values or parameters that TextSpan / SOMP / concept scores cannot use (NaN, k < 1, ...)."""


# ------------------------------------------------------------------------------------ helpers


def _matrix(a: np.ndarray, name: str, *, min_rows: int = 1) -> np.ndarray:
    """``a`` as a 2-D real array (not copied); checks shape, dtype and finiteness."""
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise ShapeError(f"{name} must be a 2-D array [rows, D], got shape {arr.shape}")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating)
                                 or np.issubdtype(arr.dtype, np.integer)):
        raise ShapeError(f"{name} must be a real float or integer array, got dtype {arr.dtype}")
    if arr.shape[0] < min_rows:
        raise ExplainInputError(f"{name} needs at least {min_rows} row(s), got {arr.shape[0]}")
    if arr.shape[1] < 1:
        raise ShapeError(f"{name} must have at least one column, got shape {arr.shape}")
    step = _chunk_rows(arr.shape[1])
    for start in range(0, arr.shape[0], step):
        if not np.isfinite(arr[start:start + step]).all():
            raise ExplainInputError(f"{name} contains NaN or infinite values")
    return arr


def _same_width(a: np.ndarray, b: np.ndarray, a_name: str, b_name: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ShapeError(f"{b_name} has embedding width {b.shape[1]} but {a_name} has "
                         f"{a.shape[1]}; both must live in the same output space")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ExplainInputError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ExplainInputError(f"{name} must be at least 1, got {value}")
    return int(value)


def _chunk_rows(width: int) -> int:
    return max(1, _CHUNK_BYTES // (8 * max(1, width)))


def _chunks(n: int, width: int):
    step = _chunk_rows(width)
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _unit_rows(a: np.ndarray, name: str) -> np.ndarray:
    """float64 copy of ``a`` with unit-norm rows; a zero row is an error."""
    out = np.asarray(a, dtype=np.float64).copy()
    norms = np.linalg.norm(out, axis=1)
    zero = np.flatnonzero(norms <= 0.0)
    if zero.size:
        raise ExplainInputError(f"{name} row {int(zero[0])} has zero norm and has no direction")
    out /= norms[:, None]
    return out


def _column_mean(x: np.ndarray) -> np.ndarray:
    total = np.zeros(x.shape[1])
    for rows in _chunks(x.shape[0], x.shape[1]):
        total += x[rows].sum(axis=0, dtype=np.float64)
    return total / x.shape[0]


def _r_factor(blocks) -> np.ndarray:
    """R of the QR decomposition of the row-stack of ``blocks`` (sequential TSQR, float64).

    ``R.T @ R`` equals the Gram matrix of the stacked rows, and ``||R v|| = ||X v||`` for every
    ``v``: the row space, singular values and right singular vectors of ``X`` are those of ``R``.
    """
    r = None
    for block in blocks:
        stacked = block if r is None else np.vstack([r, block])
        r = np.linalg.qr(stacked, mode="r")
    return r


# ----------------------------------------------------------------------------------- TextSpan


@dataclass(frozen=True)
class TextSpanResult:
    """TextSpan of one unit.

    Attributes:
        indices: ``(n_texts,)`` int64 rows of the dictionary, in pick order.
        scores: ``(n_texts,)`` the authors' score of each pick at its step: the standard
            deviation (``ddof=1``) over samples of the deflated centred data projected on the
            deflated, projected, NOT re-normalised text (see :func:`textspan`).
        explained_variance: ``(n_texts,)`` variance removed by each pick's deflation over
            ``total_variance`` (the picked directions are orthogonal: the sum is at most 1).
        total_variance: sum over dimensions of the variance (``ddof=1``) of the contributions.
        directions: ``(n_texts, D)`` the unit directions the data was deflated along (the picked
            texts after projection and deflation, normalised); mutually orthogonal, so the
            authors' reconstruction is ``mean + (X - mean) @ directions.T @ directions``.
        mean: ``(D,)`` the mean contribution that was subtracted.
        rank: the rank of the span actually used (``min(rank, N, D)``).
    """

    indices: np.ndarray
    scores: np.ndarray
    explained_variance: np.ndarray
    total_variance: float
    directions: np.ndarray
    mean: np.ndarray
    rank: int


def textspan(
    contributions: np.ndarray,  # (N, D) one unit's output-space contributions over a dataset
    texts: np.ndarray,  # (M, D) dictionary text embeddings (normalised here)
    n_texts: int,
    rank: int = 80,
) -> TextSpanResult:
    """TextSpan (Gandelsman et al., ICLR 2024): greedily pick the ``n_texts`` dictionary texts
    that explain most of a unit's variance.

    Exactly the authors' ``replace_with_iterative_removal`` (clip_text_span,
    ``compute_complete_text_set.py``):

    1. ``vh`` = the top-``rank`` right singular vectors of the contributions as given, i.e. NOT
       centred (the authors call ``np.linalg.svd(data)`` before subtracting the mean, so for a
       unit with a large mean the first direction is close to the mean); every text is
       projected onto their span, ``vh.T (vh vh.T)^-1 vh t`` (= ``vh.T vh t``), and the projected
       texts are NOT re-normalised. Texts are unit-normalised before the projection (the authors'
       dictionary is stored L2-normalised by ``compute_text_set_projection.py``).
    2. The data is centred. Each step picks ``argmax_j std(X t_j)`` over samples (``torch.std``:
       ``ddof=1``) of the current (deflated) centred data ``X`` and current texts ``t_j``. As the
       texts are not re-normalised, a text with a larger projection onto the span is favoured:
       the score is ``|t_j| * std`` along ``t_j / |t_j|``. That is the authors' choice, kept here.
    3. With the pick ``t``, both the data and all texts are deflated by the orthogonal projection
       along ``t``: ``X -= (X t / (t.t)) t.T`` and ``t_j -= (t_j.t / (t.t)) t`` (the squared norm
       ``t.t`` is the divisor, so this is an exact projection). Once the texts are deflated,
       deflating the data changes no pick, score or explained variance (``X (I - w w^T) t' =
       X t'`` for ``t'`` orthogonal to ``w``); it is done anyway, as the authors do.

    The authors run this in float32 on a GPU; here everything is float64, so near-ties may be
    broken differently from their published runs.

    Implementation (same numbers, less memory): the data enter only through their R factor
    (``||X v|| = ||R v||``), computed by a chunked QR, and everything after the projection runs
    in the ``rank``-dimensional coordinates of the span: per step ``O(M rank^2)`` instead of the
    authors' ``O(N M D)``. No ``N x M`` projection is held; peak memory is one row chunk
    (~32 MiB) plus ``O(D^2 + M rank)``.

    Deviations (only where the authors' code would misbehave): a text already picked is not
    picked again (the authors' argmax could return it, deflated to ~0, only when every other
    score is ~0 too), and a pick whose projected, deflated text is numerically zero raises
    instead of dividing by ~0. ``rank`` above ``min(N, D)`` is clamped to it (the authors' slice
    ``vh[:rank]`` does the same); the directions of zero singular values then count in the span.
    Picks after the data's variance is exhausted have ~0 explained variance and arbitrary order.

    Args:
        contributions: ``(N, D)`` with ``N >= 2``, finite, not constant.
        texts: ``(M, D)`` text embeddings, no zero rows.
        n_texts: how many texts to pick, ``1 <= n_texts <= min(M, rank used)``.
        rank: the rank of the data span the texts are projected on (the authors' ``w_ov_rank``,
            80 by default).

    Returns:
        :class:`TextSpanResult`.
    """
    x = _matrix(contributions, "contributions", min_rows=2)
    t = _matrix(texts, "texts (the dictionary)")
    _same_width(x, t, "contributions", "texts (the dictionary)")
    n_texts = _positive_int(n_texts, "n_texts")
    rank = _positive_int(rank, "rank")
    n, d = x.shape
    m = t.shape[0]
    if n_texts > m:
        raise ExplainInputError(f"n_texts={n_texts} exceeds the dictionary size {m}")
    r = min(rank, n, d)
    if n_texts > r:
        raise ExplainInputError(
            f"n_texts={n_texts} exceeds the rank of the span the texts are projected on "
            f"({r} = min(rank={rank}, N={n}, D={d})): each pick removes one of its directions")
    t = _unit_rows(t, "texts (the dictionary)")

    # 1. span of the top-r right singular vectors of the UNcentred data
    r_raw = _r_factor(np.asarray(x[rows], dtype=np.float64) for rows in _chunks(n, d))
    vh = np.linalg.svd(r_raw, full_matrices=False)[2][:r]  # (r, D), orthonormal rows

    # 2. centred data: total variance and its R factor in span coordinates ((X - mean) @ vh.T)
    mean = _column_mean(x)
    sum_sq = 0.0

    def centred_in_span():
        nonlocal sum_sq
        for rows in _chunks(n, d):
            xc = np.asarray(x[rows], dtype=np.float64) - mean
            sum_sq += float(np.einsum("ij,ij->", xc, xc))
            yield xc @ vh.T

    rb = _r_factor(centred_in_span())  # (r, r): ||(X - mean) vh.T a|| = ||rb a||
    total_variance = sum_sq / (n - 1)
    if not total_variance > 0.0:
        raise ExplainInputError("contributions have zero variance (every sample is the same)")

    a = t @ vh.T  # (M, r): coordinates of the projected texts vh.T vh t
    picked = np.zeros(m, dtype=bool)
    indices = np.empty(n_texts, dtype=np.int64)
    scores = np.empty(n_texts)
    explained = np.empty(n_texts)
    directions = np.empty((n_texts, d))
    for step in range(n_texts):
        proj = a @ rb.T  # (M, r); row j: ||.|| = ||X_c t_j||
        score = np.sqrt(np.einsum("ij,ij->i", proj, proj) / (n - 1))
        score[picked] = -np.inf
        j = int(np.argmax(score))
        norm = float(np.linalg.norm(a[j]))
        if norm <= _ZERO_NORM:
            raise ExplainInputError(
                f"after {step} picks every remaining text lies (numerically) in the span of the "
                f"picked ones within the data's rank-{r} span; ask for at most {step} texts")
        w = a[j] / norm  # unit direction, span coordinates
        rw = rb @ w
        indices[step] = j
        scores[step] = score[j]
        explained[step] = float(rw @ rw) / (n - 1) / total_variance
        directions[step] = w @ vh
        picked[j] = True
        rb -= np.outer(rw, w)  # X <- X (I - w w^T)
        a -= np.outer(a @ w, w)  # t_j <- t_j - (t_j . w) w
    return TextSpanResult(indices=indices, scores=scores, explained_variance=explained,
                          total_variance=total_variance, directions=directions, mean=mean,
                          rank=r)


# --------------------------------------------------------------------------------------- SOMP


@dataclass(frozen=True)
class SompResult:
    """SOMP of a set of signals.

    Attributes:
        atoms: ``(k,)`` int64 dictionary rows in pick order.
        coefficients: ``(k, N)`` least-squares coefficients of the final refit: row ``i`` is
            atom ``atoms[i]``'s weight in every (centred) signal.
        weights: ``(k,)`` the authors' per-atom weight: the L2 norm of its coefficient row.
        order: ``(k,)`` positions into ``atoms`` by decreasing weight (the authors' ``order``).
        residual_norms: ``(k,)`` Frobenius norm of the residual ``signals - mean - fit`` after
            each step.
        explained_variance: ``(k,)`` the authors' ``evr`` after each step: summed per-dimension
            variance (``ddof=1``) of the fit over that of the signals (NaN when ``N == 1``).
        mean: ``(D,)`` the mean signal that was subtracted (zeros without centring).
    """

    atoms: np.ndarray
    coefficients: np.ndarray
    weights: np.ndarray
    order: np.ndarray
    residual_norms: np.ndarray
    explained_variance: np.ndarray
    mean: np.ndarray


def somp(
    signals: np.ndarray,  # (N, D) e.g. one unit's contributions, one signal per row
    dictionary: np.ndarray,  # (M, D) atoms, used as given (pass unit-norm rows)
    k: int,
    *,
    criterion: Literal["l1", "std"] = "l1",
    centering: bool = True,
) -> SompResult:
    """Simultaneous orthogonal matching pursuit: ``k`` atoms that jointly fit all signals.

    Exactly the ResiDual authors' ``somp`` (``src/residual/sparse_decomposition.py``, the
    ``SOMP`` projection with its defaults ``criterion="l1"``, ``pc=None``, ``centering=True``):

    1. The signals are centred (their mean over signals is subtracted) unless ``centering`` is
       False. The dictionary is NOT normalised (the authors' normalisation line is commented
       out): an atom's score scales with its norm, so pass unit-norm rows (text embeddings are).
    2. Each step correlates the current residual with every atom, ``cross = R @ dictionary.T``
       ``[N, M]``, and picks the atom with the largest ``sum_n |cross[n, m]|`` (``"l1"``, the
       default: the sum of absolute correlations over signals, not their norm) or
       ``std_n cross[n, m]`` (``"std"``, ``ddof=1``). Atoms already chosen are excluded.
    3. All chosen atoms are refit by least squares to the (centred) signals, ``W =
       lstsq(A.T, X.T)`` ``[j, N]``, and the residual is ``X - (A.T W).T``.

    Returned as the authors do: the atoms in pick order, the final coefficients, the per-atom
    weight ``||W[i]||_2`` and the order by weight, the ``evr`` per step; plus the residual norm
    per step.

    Deviations: chosen atoms are excluded with ``-inf`` instead of the authors' multiplication
    by 0, which differs only when every unchosen score is exactly 0 (the authors' argmax could
    then re-pick atom 0). ``centering`` with ``N == 1`` is refused (it leaves a zero signal).

    Memory: the correlations are computed in row chunks (~32 MiB), never ``N x M`` at once; the
    centred signals and the residual of one chunk are float64 (one ``N x D`` copy), the
    coefficients are ``k x N``. Each step costs ``O(N D (M + j))``.

    Args:
        signals: ``(N, D)`` finite.
        dictionary: ``(M, D)`` finite, ``M >= k``.
        k: number of atoms, ``1 <= k <= M``.
        criterion: ``"l1"`` (default) or ``"std"``.
        centering: subtract the mean signal first (default, as the authors).

    Returns:
        :class:`SompResult`.
    """
    x = _matrix(signals, "signals")
    atoms_in = _matrix(dictionary, "dictionary")
    _same_width(x, atoms_in, "signals", "dictionary")
    k = _positive_int(k, "k")
    n, d = x.shape
    m = atoms_in.shape[0]
    if k > m:
        raise ExplainInputError(f"k={k} exceeds the dictionary size {m}")
    if criterion not in ("l1", "std"):
        raise ExplainInputError(f"criterion must be 'l1' or 'std', got {criterion!r}")
    if criterion == "std" and n < 2:
        raise ExplainInputError("criterion 'std' needs at least 2 signals")
    if centering and n < 2:
        raise ExplainInputError("centering a single signal leaves zero; pass centering=False")
    dic = np.asarray(atoms_in, dtype=np.float64)
    mean = _column_mean(x) if centering else np.zeros(d)
    xc = np.asarray(x, dtype=np.float64) - mean  # (N, D) float64 copy
    if n >= 2:  # the authors' std_orig: per-dimension variance (ddof=1) of the raw signals
        x_mean = mean if centering else _column_mean(x)
        orig_var = sum(float(np.sum((np.asarray(x[rows], dtype=np.float64) - x_mean) ** 2))
                       for rows in _chunks(n, d)) / (n - 1)
    else:
        orig_var = math.nan

    chosen: list[int] = []
    coef = np.zeros((0, n))
    residual_norms = np.empty(k)
    explained = np.empty(k)
    width = max(d, m)
    for step in range(k):
        sel = dic[chosen]  # (j, D)
        score_sum = np.zeros(m)
        count, mean_c, m2 = 0, np.zeros(m), np.zeros(m)  # Chan et al. merge for 'std'
        for rows in _chunks(n, width):
            res = xc[rows] - coef[:, rows].T @ sel
            cross = res @ dic.T  # (chunk, M)
            if criterion == "l1":
                score_sum += np.abs(cross).sum(axis=0)
            else:
                nb = cross.shape[0]
                mean_b = cross.mean(axis=0)
                m2_b = ((cross - mean_b) ** 2).sum(axis=0)
                delta = mean_b - mean_c
                tot = count + nb
                mean_c = mean_c + delta * (nb / tot)
                m2 = m2 + m2_b + delta ** 2 * (count * nb / tot)
                count = tot
        score = score_sum if criterion == "l1" else np.sqrt(m2 / (n - 1))
        score[chosen] = -np.inf
        chosen.append(int(np.argmax(score)))
        sel = dic[chosen]
        coef = np.linalg.lstsq(sel.T, xc.T, rcond=None)[0]  # (j, N)
        res_sq = 0.0
        fit_sq = 0.0
        fit_sum = np.zeros(d)
        for rows in _chunks(n, d):
            fit = coef[:, rows].T @ sel
            res = xc[rows] - fit
            res_sq += float(np.einsum("ij,ij->", res, res))
            fit_sq += float(np.einsum("ij,ij->", fit, fit))
            fit_sum += fit.sum(axis=0)
        residual_norms[step] = math.sqrt(res_sq)
        if n >= 2 and orig_var > 0.0:
            fit_var = (fit_sq - float(fit_sum @ fit_sum) / n) / (n - 1)
            explained[step] = fit_var / orig_var
        else:
            explained[step] = math.nan
    weights = np.linalg.norm(coef, axis=1)
    order = np.argsort(-weights, kind="stable")
    return SompResult(atoms=np.asarray(chosen, dtype=np.int64), coefficients=coef,
                      weights=weights, order=order, residual_norms=residual_norms,
                      explained_variance=explained, mean=mean)


# ----------------------------------------------------------------------------- concept scores


def concept_scores(
    contributions: np.ndarray,  # (N, D) one unit's output-space contributions
    concepts: np.ndarray,  # (C, D) concept directions, e.g. text embeddings (normalised here)
    basis: np.ndarray | None = None,  # (r, D) orthonormal rows, e.g. the unit's top PCs
) -> np.ndarray:  # (C,)
    """Variance of one unit's centred contributions along each concept direction.

    ``scores[c] = var_n((x_n - mean) . u_c)`` with ``ddof=0`` (``np.var``), where ``u_c`` is the
    concept normalised to unit length. Rank units by it to find which carry a concept ("a red
    digit"). With ``basis`` (orthonormal rows spanning e.g. the unit's principal subspace),
    ``u_c`` is the concept's projection onto that span, renormalised; a concept whose projection
    is numerically zero (norm at most 1e-10 of the concept's) gives 0.0, i.e. the span carries
    none of it.

    Memory: one row chunk (~32 MiB) at a time; costs ``O(N D C)``, or ``O(N D^2)`` when
    ``C > D`` (through the R factor of the centred data).

    Args:
        contributions: ``(N, D)`` finite.
        concepts: ``(C, D)`` finite, no zero rows.
        basis: optional ``(r, D)`` with orthonormal rows (within 1e-6).

    Returns:
        ``(C,)`` float64 variances.
    """
    x = _matrix(contributions, "contributions")
    u = _unit_rows(_matrix(concepts, "concepts"), "concepts")
    _same_width(x, u, "contributions", "concepts")
    n, d = x.shape
    zero = np.zeros(u.shape[0], dtype=bool)
    if basis is not None:
        b = np.asarray(_matrix(basis, "basis"), dtype=np.float64)
        _same_width(x, b, "contributions", "basis")
        if b.shape[0] > d:
            raise ShapeError(f"basis has {b.shape[0]} rows but only {d} can be orthonormal in "
                             f"width {d}")
        if not np.allclose(b @ b.T, np.eye(b.shape[0]), atol=_ORTHONORMAL_TOL, rtol=0.0):
            raise ExplainInputError("basis rows must be orthonormal (basis @ basis.T == I)")
        u = (u @ b.T) @ b
        norms = np.linalg.norm(u, axis=1)
        zero = norms <= _ZERO_NORM
        u[zero] = 0.0
        u[~zero] /= norms[~zero, None]
    mean = _column_mean(x)
    if u.shape[0] > d:
        rc = _r_factor(np.asarray(x[rows], dtype=np.float64) - mean for rows in _chunks(n, d))
        proj = u @ rc.T
        scores = np.einsum("ij,ij->i", proj, proj) / n
    else:
        scores = np.zeros(u.shape[0])
        for rows in _chunks(n, max(d, u.shape[0])):
            p = (np.asarray(x[rows], dtype=np.float64) - mean) @ u.T
            scores += np.einsum("ij,ij->j", p, p)
        scores /= n
    scores[zero] = 0.0
    return scores


# --------------------------------------------------------------------------- class separation


def class_separation(
    contributions: np.ndarray,  # (N, D) one unit's output-space contributions
    directions: np.ndarray,  # (k, D) directions, e.g. TextSpan's picks (normalised here)
    labels: np.ndarray,  # (N,) integer class of each row
) -> np.ndarray:  # (k,)
    """Between-class share of the variance along each direction (eta^2, in ``[0, 1]``).

    ``p = (x - mean) . u`` for each unit direction ``u``; the score is ``sum_c n_c mean_c(p)^2 /
    sum_n p_n^2``: the R^2 of the class means as a model of ``p``. Near 1: the direction
    separates the classes and little else; near 0: it carries variance that has nothing to do
    with them. A direction with no variance scores 0.

    Memory: one row chunk (~32 MiB) at a time; ``O(N D k)``.
    """
    x = _matrix(contributions, "contributions", min_rows=2)
    u = _unit_rows(_matrix(directions, "directions"), "directions")
    _same_width(x, u, "contributions", "directions")
    y = np.asarray(labels)
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ShapeError(f"labels must be {x.shape[0]} integers (one per row), got "
                         f"{y.dtype} of shape {y.shape}")
    classes, y = np.unique(y, return_inverse=True)
    mean = _column_mean(x)
    sums = np.zeros((len(classes), u.shape[0]))
    sum_sq = np.zeros(u.shape[0])
    for rows in _chunks(x.shape[0], max(x.shape[1], u.shape[0])):
        p = (np.asarray(x[rows], dtype=np.float64) - mean) @ u.T
        np.add.at(sums, y[rows], p)
        sum_sq += np.einsum("ij,ij->j", p, p)
    counts = np.bincount(y, minlength=len(classes))[:, None]
    between = (sums ** 2 / counts).sum(axis=0)
    return np.divide(between, sum_sq, out=np.zeros_like(sum_sq), where=sum_sq > 0)


def principal_directions(contributions: np.ndarray, rank: int) -> np.ndarray:  # (r, D)
    """The top-``rank`` principal directions of one unit's centred contributions ``(N, D)``:
    orthonormal rows, by decreasing variance (``rank`` above ``min(N, D)`` is clamped to it).
    Computed through the chunked R factor of the centred data, so memory stays one row chunk
    plus ``O(D^2)``; pass them as ``basis`` to :func:`concept_scores`."""
    x = _matrix(contributions, "contributions", min_rows=2)
    rank = min(_positive_int(rank, "rank"), *x.shape)
    mean = _column_mean(x)
    r = _r_factor(np.asarray(x[rows], dtype=np.float64) - mean for rows in _chunks(*x.shape))
    return np.linalg.svd(r, full_matrices=False)[2][:rank]
