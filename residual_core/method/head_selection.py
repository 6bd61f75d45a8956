"""The head-selection experiment (METHOD §2) as the authors run it (``experiments/experiment3.py``):
rank heads on the validation split, keep the top ones (heads only), ablate the rest and score
the kept set zero-shot on the test split, with the authors' reference rows.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from residual_core.formats.feature_store import FeatureStore
from residual_core.method.adapters import AlignInputError, SpectralBases
from residual_core.method.batches import DEFAULT_CACHE_BYTES, EVAL_BATCH, StoreFeatures, _stores

# ------------------------------------------------------------------------------ head selection


CORRELATION_STATISTICS = ("pearson", "pooled")
"""How :func:`rank_heads` turns the projected head and target values into one score:
``pearson`` (the authors'), ``pooled`` (one correlation over all directions, an option)."""


class _ProjectedCorr:
    """Streaming float64 sums for the correlation of each head with a target, both projected on
    an orthonormal basis ``[K, E]`` (rows): per head and direction, and pooled."""

    def __init__(self, n_heads: int, basis: torch.Tensor):
        self.basis = basis
        k = len(basis)
        self.n = 0
        self.su, self.suu, self.suo = (np.zeros((n_heads, k)) for _ in range(3))
        self.so, self.soo = np.zeros(k), np.zeros(k)

    def add(self, yh: torch.Tensor, target: torch.Tensor) -> None:
        """``yh [b, H, E]``, ``target [b, E]``."""
        u = (yh @ self.basis.T).double()  # [b, H, K]
        o = (target @ self.basis.T).double()  # [b, K]
        self.n += len(o)
        self.su += u.sum(0).numpy()
        self.suu += u.square().sum(0).numpy()
        self.suo += torch.einsum("bhk,bk->hk", u, o).numpy()
        self.so += o.sum(0).numpy()
        self.soo += o.square().sum(0).numpy()

    def correlation(self, statistic: str) -> np.ndarray:
        mu, mo = self.su / self.n, self.so / self.n
        cov = self.suo - self.n * mu * mo  # [H, K], sums of centred products
        var_u = np.clip(self.suu - self.n * mu * mu, 0, None)
        var_o = np.clip(self.soo - self.n * mo * mo, 0, None)
        with np.errstate(invalid="ignore", divide="ignore"):
            if statistic == "pooled":
                corr = cov.sum(1) / np.sqrt(var_u.sum(1) * var_o.sum())
            else:  # per direction, then the mean over the K directions
                corr = (np.nan_to_num(cov / np.sqrt(var_u * var_o), nan=0.0, posinf=0.0,
                                      neginf=0.0)).mean(1)
        return np.nan_to_num(corr, nan=0.0)  # a constant head or target correlates with nothing


def _qr_basis(vectors: np.ndarray) -> torch.Tensor:
    """``[min(E, M), E]``: ``torch.linalg.qr(vectors.T).Q.T`` for ``vectors [M, E]`` (the
    authors' property basis: Gram-Schmidt of the vectors in their order)."""
    q = np.linalg.qr(np.asarray(vectors, dtype=np.float64).T, mode="reduced")[0]
    return torch.as_tensor(q.T, dtype=torch.float32)


HEAD_SCORES = ("S", "U|T", "U", "U-out")
"""The scores :func:`rank_heads` computes (``R`` is random and needs none)."""


def rank_heads(val_store: FeatureStore | str | Path, *, scores: Sequence[str] = HEAD_SCORES,
               statistic: str = "pearson", class_weights: np.ndarray | None = None,
               cache_bytes: int = DEFAULT_CACHE_BYTES) -> dict[str, np.ndarray]:
    """Per-head scores on a (validation) store, as the authors' experiment 3 scores them.

    Returns ``{score: [L·H] float64}`` in head order (layer-major), higher ranks first:

    - ``S``: the head's own zero-shot accuracy, ``argmax(y_h @ W.T)`` against the labels.
    - ``U``, ``U|T``, ``U-out``: the authors' ``score_unit_correlation`` of the heads
      ``y_h [N, H, E]``: the target is the *sum of the heads* ``s = Σ_h y_h``; both are
      projected on an orthonormal property basis ``B = qr(P.T).Q.T`` and, per head,
      Pearson's correlation over the samples of ``y_h·b_k`` with ``s·b_k`` is averaged over the
      basis directions ``k``. The property ``P`` is: none for ``U`` (``B`` = the identity), the
      class text embeddings (the rows of ``W``) for ``U|T``, and the full outputs
      ``z_n = Σ_u y_un`` of the store for ``U-out``. As the authors compute it, the full
      output enters ``U-out`` only through its basis (Gram-Schmidt of the first outputs in
      store order, all ``E`` directions when ``N ≥ E``); the target is still ``s``.

    Where we deliberately differ: their correlation divides a ``1/N`` covariance by
    ``1/(N−1)`` standard deviations, i.e. it is ``(N−1)/N`` times Pearson's; we return
    Pearson's (a constant factor: every ranking is the same). A direction along which a head
    or the target is constant contributes 0 (theirs would be NaN). ``statistic="pooled"`` is
    an option, not the authors': one correlation of the centred projected values over all
    directions together, ``Σ_k cov_k / sqrt(Σ_k var(y_h·b_k) · Σ_k var(s·b_k))`` (the
    statistic this project used before; rotation-invariant, so ``U`` and ``U-out`` agree).
    Float64 sums, one pass over the store (two with ``U-out``: its basis needs the outputs).
    ``class_weights`` is the task's classifier ``W`` (default the store's text classifier; class
    prototypes for a tower without text, whose ``U|T`` is then in the prototypes' basis, as
    the authors' ``property_enc=classifier.centroids.T``).
    """
    unknown = [s for s in scores if s not in HEAD_SCORES]
    if unknown:
        raise AlignInputError(f"unknown head scores {unknown}; use {HEAD_SCORES}")
    if statistic not in CORRELATION_STATISTICS:
        raise AlignInputError(f"unknown correlation statistic {statistic!r}; use "
                              f"{CORRELATION_STATISTICS}")
    (store,) = _stores(val=val_store).values()
    heads = [u.index for u in store.units if u.kind == "head"]
    classifier = store.class_weights if class_weights is None else np.asarray(class_weights)
    weights = torch.as_tensor(classifier, dtype=torch.float32)
    feats = StoreFeatures(store, range(len(store.units)), cache_bytes=cache_bytes)
    batch = 256  # rows per step: [b, H, E] projections stay small
    bases = {"U": torch.eye(store.dims.embed), "U|T": _qr_basis(classifier)}
    if "U-out" in scores:
        with torch.no_grad():
            outputs = torch.cat([y.sum(1) for y, _ in feats.batches(EVAL_BATCH)])
        bases["U-out"] = _qr_basis(outputs.numpy())
    stats = {s: _ProjectedCorr(len(heads), bases[s]) for s in scores if s != "S"}
    correct = np.zeros(len(heads))
    with torch.no_grad():
        for y, labels in feats.batches(batch):
            yh = y[:, heads]
            if "S" in scores:
                correct += ((yh @ weights.T).argmax(-1) == labels[:, None]).sum(0).numpy()
            target = yh.sum(1)
            for acc in stats.values():
                acc.add(yh, target)
    out = {s: acc.correlation(statistic) for s, acc in stats.items()}
    if "S" in scores:
        out["S"] = correct / feats.n
    return {s: out[s] for s in scores}


HEAD_RANKINGS = ("S", "U|T", "U", "U-out", "R")
"""Head rankings (METHOD §2, the authors' experiment 3): own zero-shot accuracy, correlation in
the class-text basis, correlation, correlation in the full-output basis, random."""

HEAD_KEEP: tuple[int | str, ...] = ("1", "1%", "5%", "10%", "25%", "50%", "75%")
"""How many heads a ranking keeps (the authors' ``greedy_topks``); see :func:`n_kept`."""


def n_kept(keep: int | str, n_heads: int) -> int:
    """Heads kept by a keep rule, as the authors count them (``H`` = all heads):
    an int or a digit string is that count (at most ``H``); ``"p%"`` is ``max(1, ⌊p·H/100⌋)``,
    except ``"1%"``, which is ``max(2, ⌊H/100⌋)`` (the authors' rule: 1% of 144 heads is 2)."""
    text = str(keep).strip()
    if isinstance(keep, (int, np.integer)) and not isinstance(keep, bool) or text.isdigit():
        count = int(text)
        if count < 1:
            raise AlignInputError(f"keep {keep!r}: keep at least one head")
        return min(count, n_heads)
    if text.endswith("%"):
        try:
            p = Fraction(text[:-1])
        except (ValueError, ZeroDivisionError):
            p = None
        if p is not None and 0 < p <= 100:
            return min(n_heads, max(2 if p == 1 else 1, math.floor(p * n_heads / 100)))
    raise AlignInputError(f"keep {keep!r}: use a head count (e.g. 1) or a percentage of all "
                          "heads (e.g. '5%')")


def _reference_masks(units) -> list[tuple[str, np.ndarray, tuple[str, ...]]]:
    """The authors' reference ablations: ``(name, kept-unit mask, ablations)``."""
    kind = np.array([u.kind for u in units])
    layer = np.array([u.layer if u.layer is not None else -1 for u in units])
    is_head = kind == "head"
    refs = [("heads", is_head, ("zero", "mean")), ("layers", ~is_head, ("zero", "mean")),
            ("all", np.ones(len(units), dtype=bool), ("none",))]
    for l in range(int(layer[is_head].max()) + 1 if is_head.any() else 0):
        refs.append((f"layer{l}", is_head & (layer == l), ("zero", "mean")))
        refs.append((f"upto_layer{l}", is_head & (layer <= l), ("zero", "mean")))
    return refs


def head_selection(val_store: FeatureStore | str | Path, test_store: FeatureStore | str | Path,
                   *, bases: SpectralBases | None = None,
                   rankings: Sequence[str] = HEAD_RANKINGS,
                   keep: Sequence[int | str] = HEAD_KEEP,
                   ablations: Sequence[str] = ("zero", "mean"), references: bool = True,
                   statistic: str = "pearson", random_seeds: int = 10, seed: int = 0,
                   class_weights: np.ndarray | None = None,
                   scores: dict[str, np.ndarray] | None = None,
                   cache_bytes: int = DEFAULT_CACHE_BYTES) -> list[dict[str, Any]]:
    """The specialisation-performance experiment (METHOD §2) as the authors run it
    (``experiments/experiment3.py``): keep the top heads of a ranking, ablate every other unit,
    measure test accuracy.

    Heads are scored on ``val_store`` by :func:`rank_heads` (``S``, ``U|T``, ``U``, ``U-out``)
    or at random (``R``: ``random_seeds`` draws, scores ``torch.randn(H)`` from a generator
    seeded ``seed + r``, so ``seed=0`` gives the authors' seeds 0..9), and the top
    :func:`n_kept` heads kept (ties by head order). A kept set holds heads only: ``emb`` and
    every MLP are ablated too, as the authors' ``Residual.ablate(keep_units=topk_units)`` does.
    ``zero`` ablation drops the other units; ``mean`` ablation replaces each by its mean over
    the ablated (test) split, as the authors (``bases`` given: the bases' means instead, a
    deliberate option). With ``references`` also the authors' reference rows: ``heads`` (all
    heads), ``layers`` (``emb`` + MLPs), ``all`` (every unit, nothing ablated: ablation
    ``none``, the zero-shot model), and per layer ``l`` ``layer{l}`` (its heads) and
    ``upto_layer{l}`` (the heads of layers ``0..l``). Logits are linear in the units, so every
    setting is scored from per-unit logits of one read of the test store (two with ``mean``:
    the means first). ``class_weights``: the task's classifier for every score and ranking
    (default the stores' text classifier; see :func:`.batches.task_classifier`). ``scores``:
    :func:`rank_heads`' result on ``val_store`` when already computed (with the same
    ``statistic`` and ``class_weights``), so it is not computed twice.

    Returns:
        One row per setting and ablation: ``ranking`` (a ranking or a reference name),
        ``seed`` (``R`` only, else None), ``keep`` (the rule as text, e.g. ``"1%"``; None for
        references), ``n_heads`` (heads kept), ``fraction`` (kept / all heads), ``ablation``,
        ``mean_source`` (mean ablation: where the means come from, e.g. ``test`` or
        ``bases:imagenet:train``; else None), ``statistic``, ``test_acc``, ``heads`` (the
        kept heads' names, comma-separated, best-ranked first; references in head order).
    """
    unknown = [r for r in rankings if r not in HEAD_RANKINGS]
    if unknown:
        raise AlignInputError(f"unknown rankings {unknown}; use {HEAD_RANKINGS}")
    bad = [a for a in ablations if a not in ("zero", "mean")]
    if bad:
        raise AlignInputError(f"head selection ablations are 'zero' and 'mean', got {bad}")
    if random_seeds < 1 and "R" in rankings:
        raise AlignInputError(f"random_seeds must be at least 1, got {random_seeds}")
    stores = _stores(val=val_store, test=test_store)
    test = stores["test"]
    units = test.units
    heads = np.array([u.index for u in units if u.kind == "head"])
    n_heads = len(heads)
    counts = [(str(k), n_kept(k, n_heads)) for k in keep]  # refuse a bad rule before any work
    needed = [r for r in rankings if r != "R"]
    if scores is None or any(r not in scores for r in needed):
        scores = rank_heads(stores["val"], scores=needed, statistic=statistic,
                            class_weights=class_weights, cache_bytes=cache_bytes)

    # settings: (ranking, seed, keep, kept-unit mask over all units, ablations, kept heads)
    settings: list[tuple[str, int | None, str | None, np.ndarray, tuple[str, ...], str]] = []
    names = [u.name for u in units]
    for ranking in rankings:
        orders = ([(None, np.argsort(-scores[ranking], kind="stable"))] if ranking != "R" else
                  [(r, np.argsort(-torch.randn(n_heads, generator=torch.Generator()
                                               .manual_seed(seed + r)).numpy(), kind="stable"))
                   for r in range(random_seeds)])
        for r_seed, order in orders:
            for label, count in counts:
                mask = np.zeros(len(units), dtype=bool)
                mask[heads[order[:count]]] = True
                kept = ",".join(names[i] for i in heads[order[:count]])
                settings.append((ranking, r_seed, label, mask, tuple(ablations), kept))
    if references:
        settings += [(name, None, None, mask, tuple(a for a in abl if a in ablations or
                                                    a == "none"),
                      ",".join(names[i] for i in heads if mask[i]))
                     for name, mask, abl in _reference_masks(units)]

    weights = torch.as_tensor(test.class_weights if class_weights is None else class_weights,
                              dtype=torch.float32)
    feats = StoreFeatures(test, range(len(units)), cache_bytes=cache_bytes)
    mean_source = None
    if "mean" in ablations:
        if bases is not None:
            bases.check_compatible(test)
            means = torch.as_tensor(np.stack([bases.mean[bases.position(u.index)]
                                              for u in units]), dtype=torch.float32)
            mean_source = f"bases:{bases.basis_dataset}"
        else:  # the authors: the means of the split being ablated
            with torch.no_grad():
                means = sum(y.double().sum(0) for y, _ in feats.batches(EVAL_BATCH))
            means = (means / feats.n).float()
            mean_source = str(test.attrs.get("split", "test"))
        mean_logits = means @ weights.T  # [U, C]
    mask_t = torch.as_tensor(np.stack([s[3] for s in settings]), dtype=torch.float32)  # [S, U]
    removed_mean = (1 - mask_t) @ mean_logits if "mean" in ablations else None  # [S, C]
    correct = {a: torch.zeros(len(settings), dtype=torch.long) for a in ("zero", "mean")}
    # rows per step so that the [b, S, C] logits stay near 64 MB
    step = max(1, (16 << 20) // (len(settings) * weights.shape[0]))
    with torch.no_grad():
        for y, labels in feats.batches(step):
            kept = torch.einsum("buc,su->bsc", y @ weights.T, mask_t)  # [b, S, C]
            for a in {"zero", *ablations}:  # zero scores the "all" reference (none) too
                logits = kept + removed_mean if a == "mean" else kept
                correct[a] += (logits.argmax(-1) == labels[:, None]).sum(0)
    rows = []
    for i, (ranking, r_seed, label, mask, abl, kept_names) in enumerate(settings):
        kept_heads = int(mask[heads].sum())
        for a in abl:
            hits = correct["zero" if a == "none" else a][i]  # none: nothing to ablate
            rows.append({"ranking": ranking, "seed": r_seed, "keep": label,
                         "n_heads": kept_heads, "fraction": kept_heads / n_heads,
                         "ablation": a, "mean_source": mean_source if a == "mean" else None,
                         "statistic": statistic, "test_acc": float(hits) / feats.n,
                         "heads": kept_names})
    return rows
