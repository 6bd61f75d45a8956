"""The align stage: ResiDual and its variants are exact where they must be (identity settings,
parameter counts), training improves on zero-shot, runs are reproducible, streaming equals
in-memory training, bad inputs are refused, and the head-selection experiment runs."""

import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch

from builders import write_image_folder
from residual_core.datasets import load_dataset
from residual_core.engines.extract import extract
from residual_core.errors import StoreError
from residual_core.formats.feature_store import FeatureStore
from residual_core.identity import EMBEDDED_MODEL
from residual_core.method import head_selection, training
from residual_core.method.adapters import (
    PRESETS,
    AlignInputError,
    BasisMismatchError,
    CoarseResiDual,
    LinearAdapter,
    ResiDual,
    SpectralBases,
    UnknownPresetError,
    build_adapter,
    get_preset,
    parameter_count,
)
from residual_core.method.batches import StoreFeatures
from residual_core.method.models import load_model
from residual_core.method.spectral import PCAResult
from residual_core.method.units import unit_table
from residual_core.stages.extract import Params as ExtractParams

CLASSES = ["ant", "bee", "cow", "dog"]


@pytest.fixture(scope="module")
def tiny():
    return load_model(EMBEDDED_MODEL, None, device="cpu", seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # class-dependent mean colour: a random tower carries it, its random classifier does not
    return write_image_folder(tmp_path_factory.mktemp("imgs"), CLASSES, 100, size=32)


@pytest.fixture(scope="module")
def stores(tiny, folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for split in ("train", "val", "test"):
        res = extract(EMBEDDED_MODEL, None, f"imagefolder:{folder}", split,
                      ExtractParams(batch_size=64, rows_per_chunk=32, num_workers=0, device="cpu"),
                      store_root=root, loaded=tiny, progress=False)
        out[split] = FeatureStore.open(res.url)
    return out


@pytest.fixture(scope="module")
def bases(stores):
    return SpectralBases.from_store(stores["train"])


def _fit(method, stores, bases, **kw):
    return training.fit(method, stores["train"], stores["val"], stores["test"], bases,
                     progress=False, **kw)


def _rows(store, module, n=64):
    return torch.from_numpy(store.contributions(module.input_units, rows=slice(0, n)).compute())


def _zero_shot_logits(store, n=64):
    y = store.contributions(rows=slice(0, n)).compute()
    return torch.from_numpy(y.sum(1) @ store.class_weights.T)


def _close(a, b, rtol=1e-4):
    assert torch.linalg.norm(a - b) <= rtol * torch.linalg.norm(b), (a - b).abs().max()


# ------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("kinds, ablation", [(("emb", "mlp", "head"), "zero"),
                                             (("head",), "sum")])
def test_identity_settings_give_zero_shot_logits(stores, bases, kinds, ablation):
    store = stores["val"]
    units = store.units
    embed = store.dims.embed
    k = {u.index: embed for u in units if u.kind in kinds}
    module = ResiDual(units, store.class_weights, bases, k, ablation=ablation, add_mean=True)
    _close(module.logits(_rows(store, module)), _zero_shot_logits(store))
    # Without the mean, the same module is the centred representation.
    centred = ResiDual(units, store.class_weights, bases, k, ablation=ablation)
    shift = torch.as_tensor(bases.mean[[bases.position(i) for i in k]].sum(0), dtype=torch.float32)
    _close(centred(_rows(store, centred)) + shift, module(_rows(store, module)))


def test_coarse_with_ones_and_sum_is_zero_shot(stores):
    store = stores["val"]
    module = build_adapter("coarse", store.units, store.class_weights, ablation="sum")
    assert isinstance(module, CoarseResiDual)
    _close(module.logits(_rows(store, module)), _zero_shot_logits(store))
    linear = build_adapter("linear-identity", store.units, store.class_weights)
    _close(linear.logits(_rows(store, linear)), _zero_shot_logits(store))


def test_linear_adapter_settings_follow_the_authors(stores):
    """conf/train/linear_adapter.gin: lr 1e-3, batch 64, no clipping, nn.Linear's init
    (uniform in ±1/√E, seeded through fit's torch.manual_seed); finetune.gin keeps batch 128
    and clipping 1.0."""
    import math

    store = stores["val"]
    authors, ours = get_preset("linear"), get_preset("linear-identity")
    assert (authors.lr, authors.batch_size, authors.grad_clip, authors.init) == \
        (1e-3, 64, None, "torch")
    assert (ours.batch_size, ours.grad_clip, ours.init) == (64, None, "identity")
    ft = get_preset("finetune")
    assert (ft.lr, ft.batch_size, ft.grad_clip) == (1e-5, 128, 1.0)
    weights = []
    for _ in range(2):
        torch.manual_seed(7)
        weights.append(build_adapter("linear", store.units, store.class_weights).linear.weight)
    bound = 1 / math.sqrt(store.dims.embed)
    assert torch.equal(weights[0], weights[1])  # seeded: reproducible
    largest = float(weights[0].detach().abs().max())
    assert 0.9 * bound < largest <= bound
    assert not torch.allclose(weights[0], torch.eye(store.dims.embed))
    with pytest.raises(AlignInputError, match="init must be one of"):
        LinearAdapter(store.units, store.class_weights, init="zeros")


def test_batched_module_equals_the_per_unit_formula(stores, bases):
    """Padded einsums == Σ_u Φ_uᵀ diag(λ_u) Φ_u (y_u − μ_u) unit by unit, with uneven K_u."""
    store = stores["val"]
    module = build_adapter("residual-full", store.units, store.class_weights, bases,
                           head_dim=store.dims.head_dim, lambda_init="randn", seed=3)
    y = _rows(store, module, 16).double().numpy()
    lam = module.lambdas_by_unit()
    ref = np.zeros((y.shape[0], store.dims.embed))
    for col, unit in enumerate(module.input_units):
        name = store.units[unit].name
        if name not in lam:  # emb, summed unchanged
            ref += y[:, col]
            continue
        pos = bases.position(unit)
        phi = bases.components[pos, :len(lam[name])]
        ref += ((y[:, col] - bases.mean[pos]) @ phi.T * lam[name]) @ phi
    got = module(torch.as_tensor(y, dtype=torch.float32)).detach().double().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_parameter_counts_follow_method(stores, bases):
    assert parameter_count("residual-full", 12, 12, 64, 512) == 12 * 12 * 64 + 12 * 512 == 15_360
    assert parameter_count("coarse", 12, 12, 64, 512) == 144
    assert parameter_count("linear", 12, 12, 64, 512) == 512 * 512 + 512
    assert parameter_count("zero-shot", 12, 12, 64, 512) == 0
    assert parameter_count("residual-star", 12, 12, 64, 512, k=60) == 144 * 60
    with pytest.raises(AlignInputError, match="pass k"):
        parameter_count("residual-star", 12, 12, 64, 512)

    store = stores["train"]
    d = store.dims
    heads = [u.index for u in store.units if u.kind == "head"]
    k90 = bases.k_for_evr(0.9)[[bases.position(h) for h in heads]]
    expected = {"residual-full": None, "coarse": None, "linear": None, "zero-shot": None,
                "residual-star": k90}
    for method, k in expected.items():
        module = build_adapter(method, store.units, store.class_weights, bases,
                               head_dim=d.head_dim)
        assert module.trainable_parameters() == parameter_count(
            method, d.layer, d.head, d.head_dim, d.embed, k=k), method
    # padded slots are neither parameters nor active: residual-star's K_u are uneven here
    star = build_adapter("residual-star", store.units, store.class_weights, bases)
    assert len(set(k90.tolist())) > 1 and star.lambdas.numel() == k90.sum()


# ------------------------------------------------------------------------------ training


# Gains required over max(zero-shot, chance), on validation and on unseen test rows (40 each).
# residual-full (768 λ) can fit the colour classes; residual-star keeps only K_90 = 1-2
# directions per head of a random tower and coarse 16 scalars, so they must gain, by less.
@pytest.mark.parametrize("method, margin", [("residual-full", 0.3), ("residual-star", 0.1),
                                            ("coarse", 0.1)])
def test_training_improves_on_zero_shot(stores, bases, method, margin):
    zs_val, zs_test = training.zero_shot(stores["val"]), training.zero_shot(stores["test"])
    chance = 1 / len(CLASSES)
    result = _fit(method, stores, bases)
    assert 1 <= result.best_epoch <= result.epochs_run <= 30
    assert result.val_acc >= max(zs_val, chance) + margin
    assert result.test_acc >= max(zs_test, chance) + margin
    assert result.history[result.best_epoch - 1]["val_acc"] == result.val_acc


def test_same_seed_same_result_other_seed_differs(stores, bases):
    a = _fit("residual-star", stores, bases, seed=0, lambda_init="randn", epochs=4)
    b = _fit("residual-star", stores, bases, seed=0, lambda_init="randn", epochs=4)
    c = _fit("residual-star", stores, bases, seed=1, lambda_init="randn", epochs=4)
    np.testing.assert_array_equal(a.state["lambdas"], b.state["lambdas"])
    assert (a.val_acc, a.test_acc, a.best_epoch) == (b.val_acc, b.test_acc, b.best_epoch)
    assert not np.allclose(a.state["lambdas"], c.state["lambdas"])


def test_streaming_trains_like_in_memory(stores, bases):
    # the visiting order depends on the seed and the buffer size, not on caching
    cached = _fit("residual-star", stores, bases, epochs=3, buffer_chunks=2)
    streamed = _fit("residual-star", stores, bases, epochs=3, cache_bytes=0, buffer_chunks=2)
    assert cached.params["in_memory"] and not streamed.params["in_memory"]
    np.testing.assert_allclose(streamed.state["lambdas"], cached.state["lambdas"],
                               rtol=1e-5, atol=1e-6)
    assert (streamed.val_acc, streamed.test_acc) == (cached.val_acc, cached.test_acc)
    # every row exactly once per epoch, in the same shuffled order in both modes
    store = stores["train"]
    orders = []
    for budget in (0, 1 << 30):
        feats = StoreFeatures(store, [0, 5], cache_bytes=budget, buffer_chunks=3)
        batches = list(feats.batches(50, torch.Generator().manual_seed(7)))
        orders.append((torch.cat([b[1] for b in batches]), torch.cat([b[0] for b in batches])))
    assert torch.equal(orders[0][0], orders[1][0]) and torch.equal(orders[0][1], orders[1][1])
    assert sorted(orders[0][0].tolist()) == sorted(store.labels.tolist())


@pytest.fixture(scope="module")
def sorted_store(tiny, tmp_path_factory):
    """A store of 10 classes whose rows are sorted by class (as several sources are)."""
    folder = write_image_folder(tmp_path_factory.mktemp("ten"), [f"c{k}" for k in range(10)], 40,
                                size=32, seed=1)
    res = extract(EMBEDDED_MODEL, None, f"imagefolder:{folder}", "train",
                  ExtractParams(batch_size=64, rows_per_chunk=32, num_workers=0, device="cpu"),
                  store_root=tmp_path_factory.mktemp("ten_store"), loaded=tiny, progress=False)
    return FeatureStore.open(res.url)


def _expected_distinct(counts, batch):
    """E[distinct classes] in a uniform random ``batch``-subset of rows with these class
    counts: Σ_c P(class c is drawn) = Σ_c 1 − C(N − n_c, B) / C(N, B)."""
    n = sum(counts)
    return sum(1 - math.comb(n - c, batch) / math.comb(n, batch) for c in counts)


@pytest.mark.parametrize("budget", [0, 1 << 30])  # streamed, cached
def test_batches_are_a_global_shuffle(sorted_store, budget):
    labels = sorted_store.labels
    assert np.all(np.diff(labels) >= 0) and len(set(labels.tolist())) == 10  # class-sorted
    counts = np.bincount(labels).tolist()
    batch = 16
    feats = StoreFeatures(sorted_store, [0], cache_bytes=budget)
    assert feats.in_memory == (budget > 0)
    generator = torch.Generator().manual_seed(0)
    distinct = []
    for _ in range(20):  # epochs
        epoch = [b[1] for b in feats.batches(batch, generator)]
        assert sorted(torch.cat(epoch).tolist()) == sorted(labels.tolist())  # each row once
        distinct += [len(set(b.tolist())) for b in epoch if len(b) == batch]
    expected = _expected_distinct(counts, batch)
    assert abs(np.mean(distinct) - expected) <= 0.05 * expected, (np.mean(distinct), expected)


def test_zero_shot_preset_trains_nothing(stores):
    result = _fit("zero-shot", stores, None)
    assert result.trainable_parameters == 0 and result.epochs_run == 0
    assert result.test_acc == training.zero_shot(stores["test"])


def test_finetune_runs_the_backbone(tiny, folder, stores):
    name = f"imagefolder:{folder}"
    data = {s: load_dataset(name, s, transform=tiny.preprocess) for s in ("train", "val", "test")}
    before = {k: v.clone() for k, v in tiny.model.visual.state_dict().items()}
    untrained = training.finetune(tiny, data["train"], data["val"], data["test"], epochs=0,
                               progress=False)
    # the online tower scores as the cached features do
    assert untrained.val_acc == pytest.approx(training.zero_shot(stores["val"]))
    result = training.finetune(tiny, data["train"], data["val"], data["test"], epochs=2,
                            batch_size=64, progress=False)
    assert result.epochs_run == 2 and 0 <= result.test_acc <= 1
    assert result.trainable_parameters == sum(p.numel() for p in tiny.model.visual.parameters())
    assert any(not np.array_equal(result.state[k], before[k].numpy()) for k in before)
    for k, v in tiny.model.visual.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k])


# ------------------------------------------------------------------------------ bad inputs


def test_unknown_preset_lists_the_known(stores, bases):
    with pytest.raises(UnknownPresetError, match="known methods: .*residual-star"):
        _fit("residual-turbo", stores, bases)
    assert set(PRESETS) >= {"residual-star", "residual-full", "coarse", "linear", "zero-shot"}
    assert get_preset("coarse").lr == 0.8 and get_preset("linear").batch_size == 64


def test_bases_of_another_model_are_refused(stores, bases):
    other = dataclasses.replace(bases, model={**bases.model, "pretrained": "laion2b_s34b_b88k"})
    with pytest.raises(BasisMismatchError, match="another model.*pretrained"):
        _fit("residual-star", stores, other)
    # a 3-layer tower with 48-d outputs (other unit table and embedding dimension)
    units = unit_table(3, 4)
    eye = np.eye(48)
    results = [PCAResult(np.zeros(48), eye, np.linspace(1, 0, 48), 10) for _ in units]
    foreign = SpectralBases.from_pca(results, units, "elsewhere:train")
    with pytest.raises(BasisMismatchError, match="dimension 48"):
        _fit("residual-full", stores, foreign)
    with pytest.raises(AlignInputError, match="needs spectral bases"):
        _fit("residual-star", stores, None)


def _copy_store(store, tmp_path, name):
    shutil.copytree(store.url, tmp_path / name)
    return FeatureStore.open(tmp_path / name)


def test_bad_labels_and_mixed_stores_are_refused(stores, bases, tmp_path):
    bad = _copy_store(stores["val"], tmp_path, "bad.zarr")
    labels = bad.labels
    labels[3] = len(CLASSES) + 2
    bad.group["labels"][...] = labels
    with pytest.raises(AlignInputError, match=r"labels \[6\] are outside its 4 classes"):
        training.fit("coarse", stores["train"], bad, stores["test"], progress=False)
    other = _copy_store(stores["val"], tmp_path, "other.zarr")
    other.set_attrs(dataset="imagefolder:/elsewhere")
    with pytest.raises(StoreError, match="one model and one dataset"):
        training.fit("coarse", stores["train"], other, stores["test"], progress=False)


# ------------------------------------------------------------------------------ head selection


def test_keep_counts_follow_the_authors():
    # the authors' greedy_topks on ViT-B (144 heads) and on the tiny tower (16)
    assert [head_selection.n_kept(k, 144) for k in head_selection.HEAD_KEEP] == [1, 2, 7, 14, 36, 72, 108]
    assert [head_selection.n_kept(k, 16) for k in head_selection.HEAD_KEEP] == [1, 2, 1, 1, 4, 8, 12]
    assert head_selection.n_kept("1%", 300) == 3 and head_selection.n_kept(3, 2) == 2 and head_selection.n_kept("2", 16) == 2
    for bad in ("0", 0, "x%", "150%", "half"):
        with pytest.raises(AlignInputError, match="^keep .*") as info:
            head_selection.n_kept(bad, 16)
        assert "\n" not in str(info.value)


def _pearson_per_direction(y, target, basis):
    """Reference: per head, the mean over basis directions of np.corrcoef of the projections."""
    u, o = y @ basis.T, target @ basis.T  # [N, H, K], [N, K]
    return np.array([np.mean([np.corrcoef(u[:, h, k], o[:, k])[0, 1]
                              for k in range(basis.shape[0])]) for h in range(y.shape[1])])


def test_head_correlations_are_the_authors_statistic(stores):
    store = stores["val"]
    heads = [u.index for u in store.units if u.kind == "head"]
    y_all = store.contributions().compute().astype(np.float64)
    y = y_all[:, heads]
    s = y.sum(1)  # the target: the sum of the heads
    text = np.linalg.qr(store.class_weights.astype(np.float64).T)[0].T
    out = np.linalg.qr(y_all.sum(1).T)[0].T  # the full outputs' basis
    scores = head_selection.rank_heads(store)
    assert list(scores) == list(head_selection.HEAD_SCORES)
    np.testing.assert_allclose(scores["U"], _pearson_per_direction(y, s, np.eye(y.shape[2])),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores["U|T"], _pearson_per_direction(y, s, text),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores["U-out"], _pearson_per_direction(y, s, out),
                               rtol=1e-4, atol=1e-5)
    own = ((y @ store.class_weights.T).argmax(-1) == store.labels[:, None]).mean(0)
    np.testing.assert_allclose(scores["S"], own)
    # the pooled option: one correlation of the centred values over all directions
    pooled = head_selection.rank_heads(store, scores=("U",), statistic="pooled")["U"]
    yc, sc = y - y.mean(0), s - s.mean(0)
    ref = np.einsum("nhe,ne->h", yc, sc) / np.sqrt((yc ** 2).sum((0, 2)) * (sc ** 2).sum())
    np.testing.assert_allclose(pooled, ref, rtol=1e-4, atol=1e-6)
    with pytest.raises(AlignInputError, match="unknown correlation statistic 'spearman'"):
        head_selection.rank_heads(store, statistic="spearman")


def _direct_accuracy(y, weights, labels, keep, ablation):
    """Reference: the kept units summed, each other unit zeroed or replaced by its mean."""
    z = y[:, keep].sum(1)
    if ablation == "mean":
        z = z + y[:, ~keep].mean(0).sum(0)
    return float(((z @ weights.T).argmax(1) == labels).mean())


def test_head_selection_as_the_authors(stores, bases):
    test, val = stores["test"], stores["val"]
    units = test.units
    d = test.dims
    n_heads = d.layer * d.head
    rows = head_selection.head_selection(val, test, random_seeds=3)
    n_refs = 2 * 2 + 1 + d.layer * 2 * 2  # heads, layers (zero, mean), all; per layer two sets
    assert len(rows) == (4 + 3) * len(head_selection.HEAD_KEEP) * 2 + n_refs
    y = test.contributions().compute().astype(np.float64)
    weights, labels = test.class_weights.astype(np.float64), test.labels
    kind = np.array([u.kind for u in units])
    layer = np.array([u.layer for u in units])
    heads = np.flatnonzero(kind == "head")
    scores = head_selection.rank_heads(val)
    for r in range(3):
        scores[f"R{r}"] = torch.randn(n_heads, generator=torch.Generator().manual_seed(r)).numpy()
    refs = {"heads": kind == "head", "layers": kind != "head", "all": np.ones(len(units), bool),
            **{f"layer{l}": (kind == "head") & (layer == l) for l in range(d.layer)},
            **{f"upto_layer{l}": (kind == "head") & (layer <= l) for l in range(d.layer)}}
    seen = set()
    for row in rows:
        if row["keep"] is None:  # a reference row
            keep = refs[row["ranking"]]
            assert row["ablation"] in (("none",) if row["ranking"] == "all" else ("zero", "mean"))
        else:
            name = row["ranking"] + (str(row["seed"]) if row["ranking"] == "R" else "")
            top = np.argsort(-scores[name], kind="stable")[:head_selection.n_kept(row["keep"], n_heads)]
            keep = np.zeros(len(units), bool)
            keep[heads[top]] = True
        assert row["n_heads"] == keep[heads].sum()
        names = [units[i].name for i in (heads[top] if row["keep"] is not None else
                                         heads[keep[heads]])]
        assert row["heads"] == ",".join(names)  # the kept heads, best-ranked first
        assert row["mean_source"] == ("test" if row["ablation"] == "mean" else None)
        assert row["test_acc"] == pytest.approx(
            _direct_accuracy(y, weights, labels, keep, row["ablation"])), row
        seen.add((row["ranking"], row["ablation"]))
    assert {r for r, _ in seen} >= set(head_selection.HEAD_RANKINGS) | set(refs)
    # one head, zero-ablated: exactly that head's own accuracy (no emb, no MLP)
    best = heads[int(np.argmax(scores["S"]))]
    own = float(((y[:, best] @ weights.T).argmax(1) == labels).mean())
    one = next(r for r in rows if (r["ranking"], r["keep"], r["ablation"]) == ("S", "1", "zero"))
    assert one["n_heads"] == 1 and one["test_acc"] == pytest.approx(own)
    full = next(r for r in rows if r["ranking"] == "all")
    assert full["test_acc"] == pytest.approx(training.zero_shot(test))
    # streaming the stores scores the same
    streamed = head_selection.head_selection(val, test, random_seeds=3, cache_bytes=0)
    assert [r["test_acc"] for r in streamed] == [r["test_acc"] for r in rows]
    # the bases' means instead of the test split's, an option recorded in the row
    with_bases = head_selection.head_selection(val, test, bases=bases, rankings=("S",), keep=("50%",),
                                      ablations=("mean",), references=False)
    assert len(with_bases) == 1 and with_bases[0]["n_heads"] == n_heads // 2
    assert with_bases[0]["mean_source"] == f"bases:{bases.basis_dataset}"
    with pytest.raises(AlignInputError, match="unknown rankings"):
        head_selection.head_selection(val, test, rankings=("S", "best"))
