"""ResiDual (METHOD §3): spectral reweighting of residual units, its variants and baselines.

Every module here maps cached unit contributions ``y [B, U_in, E]`` (the exact output-space
``y_u`` of :meth:`FeatureStore.contributions`, for the units in the module's ``input_units``,
in that order) to a representation ``z [B, E]``, scored by the frozen zero-shot classifier:
``logits = z @ class_weights.T`` (no logit scale, as in the authors' reported runs).

- :class:`ResiDual`: for each adapted unit ``u``, ``ŷ_u = Φ_uᵀ diag(λ_u) Φ_u (y_u − μ_u)`` with
  ``Φ_u`` the first ``K_u`` principal directions (rows) of the unit on a basis dataset
  (:class:`SpectralBases`) and one trainable ``λ`` per kept direction. This is the intended map;
  the authors' code applies ``Φ diag(λ) Φ`` to zero-padded square bases (a transposition slip).
- :class:`CoarseResiDual`: one scalar per adapted unit, ``ŷ_u = λ_u y_u`` (no centring).
- :class:`LinearAdapter`: ``z = A (Σ_u y_u) + b``, ``nn.Linear``'s init as the authors
  (``linear``) or the identity, the zero-shot model (``linear-identity``).
- :class:`UnitAdapter` (the base) with nothing adapted and the ``sum`` ablation: zero-shot.

Units that are not adapted are handled by the *ablation*: ``sum`` (added unchanged), ``zero``
(dropped) or ``mean`` (replaced by their basis-dataset mean ``μ_u``).

Named configurations are data (:data:`PRESETS`), built by :func:`build_adapter`; their parameter
counts follow METHOD §3 (:func:`parameter_count`). Training lives in :mod:`residual_core.method.training`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from residual_core.errors import ResidualError, ShapeError
from residual_core.identity import WeightsId
from residual_core.method.spectral import (  # _k_at: spectral's own K-at-EVR rule
    PCAResult,
    _k_at,
)
from residual_core.method.units import KINDS, Unit

if TYPE_CHECKING:  # only for annotations: the store module pulls in zarr and dask
    from residual_core.formats.feature_store import FeatureStore

__all__ = [
    "ABLATIONS",
    "LAMBDA_INITS",
    "LINEAR_INITS",
    "PRESETS",
    "AlignInputError",
    "BasisMismatchError",
    "CoarseResiDual",
    "LinearAdapter",
    "Preset",
    "ResiDual",
    "SpectralBases",
    "UnitAdapter",
    "UnknownPresetError",
    "build_adapter",
    "get_preset",
    "parameter_count",
    "resolve_k",
]

ABLATIONS = ("sum", "zero", "mean")
"""What happens to units that are not adapted: added unchanged, dropped, replaced by their mean."""

LAMBDA_INITS = ("ones", "randn")
"""``ones`` (= the zero-shot model when nothing is dropped) or ``randn``: N(1, 1), seeded."""


class AlignInputError(ResidualError, ValueError):
    """Inputs the align stage cannot use: bad options, labels outside the classes, shapes."""


class BasisMismatchError(AlignInputError):
    """Spectral bases that do not belong to the model (or the units) of a feature store."""


class UnknownPresetError(ResidualError, KeyError):
    """A method name that is not in :data:`PRESETS`."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# ------------------------------------------------------------------------------ spectral bases


@dataclass
class SpectralBases:
    """Per-unit PCA of a basis dataset, stacked (METHOD §2-3).

    Attributes:
        units: the units the bases cover (any subset of a model's units), in row order.
        mean: ``[U, E]`` each unit's mean ``μ_u`` on the basis dataset.
        components: ``[U, E, E]`` orthonormal principal directions as rows, sorted by
            decreasing eigenvalue (``PCAResult.components`` of each unit).
        eigenvalues: ``[U, E]`` the matching covariance eigenvalues.
        basis_dataset: a label of where the bases were fitted (``imagenet:train``).
        model: ``{"model", "pretrained", "checkpoint_sha256"}`` of the model the bases were fitted
            on (checked against stores by :meth:`check_compatible`); ``None`` skips that check.

    Memory: ``U·E²`` floats of components (ViT-B/16 in float64: 157·512²·8 B = 330 MB; pass
    ``dtype=np.float32`` to the constructors to halve it).
    """

    units: tuple[Unit, ...]
    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    basis_dataset: str
    model: dict[str, Any] | None = None
    _position: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.units = tuple(self.units)
        n = len(self.units)
        if n == 0:
            raise ShapeError("spectral bases need at least one unit")
        e = self.mean.shape[-1] if self.mean.ndim == 2 else -1
        expected = {"mean": (n, e), "components": (n, e, e), "eigenvalues": (n, e)}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ShapeError(f"spectral bases: {name} must be {shape} for {n} units of "
                                 f"dimension {e}, got {getattr(self, name).shape}")
        self._position = {u.index: i for i, u in enumerate(self.units)}

    @property
    def embed_dim(self) -> int:
        return int(self.mean.shape[1])

    @classmethod
    def from_pca(cls, results: Sequence[PCAResult], units: Sequence[Unit], basis_dataset: str,
                 model: Mapping[str, Any] | None = None, dtype=np.float64) -> "SpectralBases":
        """Stack per-unit :class:`PCAResult` objects (one per unit, same order)."""
        if len(results) != len(units):
            raise ShapeError(f"{len(results)} PCA results for {len(units)} units")
        return cls(tuple(units),
                   np.stack([r.mean for r in results]).astype(dtype),
                   np.stack([r.components for r in results]).astype(dtype),
                   np.stack([r.eigenvalues for r in results]).astype(dtype),
                   basis_dataset, dict(model) if model is not None else None)

    @classmethod
    def from_store(cls, store: "FeatureStore", units: Sequence[int | str] | None = None,
                   dtype=np.float64) -> "SpectralBases":
        """Fit the bases of ``units`` (default all) on a store: one out-of-core PCA pass."""
        sel = store._unit_indices(units)
        results = store.pca(sel)
        return cls.from_pca(results, [store.units[i] for i in sel],
                            f"{store.attrs.get('dataset')}:{store.attrs.get('split')}",
                            WeightsId.from_attrs(store.attrs).as_dict(), dtype)

    def position(self, unit: Unit | int) -> int:
        """Row of ``unit`` (a :class:`Unit` or its index) in these bases."""
        index = unit.index if isinstance(unit, Unit) else int(unit)
        if index not in self._position:
            raise BasisMismatchError(
                f"the bases (fitted on {self.basis_dataset}) have no unit with index {index}; "
                f"they cover {len(self.units)} units: fit them for every unit you adapt or "
                "mean-ablate")
        return self._position[index]

    def k_for_evr(self, threshold: float) -> np.ndarray:
        """``[U]`` int: per unit, the fewest components reaching ``threshold`` cumulative EVR
        (0 for a unit with zero variance), as ``k90`` of :func:`spectral.unit_stats`."""
        if not 0 < threshold <= 1:
            raise AlignInputError(f"an EVR threshold must be in (0, 1], got {threshold}")
        return np.array([_k_at(ev, threshold) for ev in self.eigenvalues], dtype=np.int64)

    def check_compatible(self, store: "FeatureStore") -> None:
        """Raise :class:`BasisMismatchError` unless these bases can be used on ``store``: same
        weights (identity attributes), same embedding dimension, and units of its unit table.

        Two random-weight models of the same architecture have the same identity, so bases of
        one are not told apart from the other's.
        """
        where = f"bases fitted on {self.basis_dataset}"
        if self.model is not None:
            ours = WeightsId.from_attrs(self.model).as_dict()
            theirs = WeightsId.from_attrs(store.attrs).as_dict()
            if ours != theirs:
                diff = ", ".join(f"{k}: {ours[k]!r} vs {theirs[k]!r}" for k in WeightsId.FIELDS
                                 if ours[k] != theirs[k])
                raise BasisMismatchError(
                    f"{where} belong to another model than {store.url} ({diff}); fit the bases "
                    "with the same model and weights as the features")
        if self.embed_dim != store.dims.embed:
            raise BasisMismatchError(f"{where} have dimension {self.embed_dim}, {store.url} has "
                                     f"embed dimension {store.dims.embed}: another model")
        table = store.units
        foreign = [u.name for u in self.units if u.index >= len(table) or table[u.index] != u]
        if foreign:
            raise BasisMismatchError(
                f"{where} name units that {store.url} does not have at those positions "
                f"({', '.join(foreign[:5])}{'...' if len(foreign) > 5 else ''}): another model")


# ------------------------------------------------------------------------------ modules


def _lambda_init(n: int, how: str, seed: int) -> torch.Tensor:
    if how not in LAMBDA_INITS:
        raise AlignInputError(f"lambda_init must be one of {LAMBDA_INITS}, got {how!r}")
    if how == "ones":
        return torch.ones(n)
    return 1.0 + torch.randn(n, generator=torch.Generator().manual_seed(seed))


class UnitAdapter(nn.Module):
    """Base of the adapters: ablation of the units that are not adapted, frozen classifier.

    Used directly with nothing adapted and the ``sum`` ablation it is the zero-shot model.

    Args:
        units: the model's full unit table (``FeatureStore.units``).
        class_weights: ``[C, E]`` zero-shot classifier (frozen buffer).
        adapted: indices of the units a subclass transforms, in the order ``_adapt`` expects.
        ablation: ``sum`` | ``zero`` | ``mean`` for the other units.
        bases: needed for ``mean`` (the basis means of the other units).

    Attributes:
        input_units: unit indices of the columns ``forward`` expects: the adapted units, then
            (``sum`` ablation only) the other units. Read exactly these from a store.
    """

    def __init__(self, units: Sequence[Unit], class_weights, adapted: Sequence[int] = (),
                 ablation: str = "sum", bases: SpectralBases | None = None):
        super().__init__()
        if ablation not in ABLATIONS:
            raise AlignInputError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
        weights = torch.as_tensor(np.asarray(class_weights), dtype=torch.float32)
        if weights.ndim != 2:
            raise ShapeError(f"class_weights must be [C, E], got {tuple(weights.shape)}")
        self.units = tuple(units)
        self.ablation = ablation
        self.n_adapted = len(adapted)
        chosen = set(adapted)
        rest = [u.index for u in self.units if u.index not in chosen]
        self.input_units: tuple[int, ...] = tuple(adapted) + (
            tuple(rest) if ablation == "sum" else ())
        offset = torch.zeros(weights.shape[1], dtype=torch.float64)
        if ablation == "mean" and rest:
            offset += _basis_means(bases, rest, weights.shape[1], "the mean ablation").sum(0)
        self.register_buffer("class_weights", weights)
        self.register_buffer("offset", offset.float())  # constant part of z: ablated means

    @property
    def embed_dim(self) -> int:
        return self.class_weights.shape[1]

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """``y [B, len(input_units), E]`` -> ``z [B, E]``."""
        if y.ndim != 3 or y.shape[1:] != (len(self.input_units), self.embed_dim):
            raise ShapeError(f"expected y [B, {len(self.input_units)}, {self.embed_dim}] (the "
                             f"module's input_units), got {tuple(y.shape)}")
        a = self.n_adapted
        z = self.offset + y[:, a:].sum(1)
        return z + self._adapt(y[:, :a]) if a else z

    def _adapt(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, A, E]`` contributions of the adapted units -> their ``[B, E]`` sum."""
        raise NotImplementedError

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        """``y [B, len(input_units), E]`` -> ``[B, C]`` scores ``z @ class_weights.T``."""
        return self(y) @ self.class_weights.T

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def state(self) -> dict[str, np.ndarray]:
        """The trainable parameters as numpy arrays (copies)."""
        return {n: p.detach().cpu().numpy().copy() for n, p in self.named_parameters()
                if p.requires_grad}


def _basis_means(bases: SpectralBases | None, units: Sequence[int], dim: int,
                 why: str) -> torch.Tensor:
    """``[len(units), E]`` float64 basis means of ``units``."""
    if bases is None:
        raise AlignInputError(f"{why} needs spectral bases (their means); pass bases=")
    if bases.embed_dim != dim:
        raise BasisMismatchError(f"bases have dimension {bases.embed_dim}, the classifier {dim}")
    return torch.as_tensor(np.stack([bases.mean[bases.position(u)] for u in units]),
                           dtype=torch.float64)


class _SpectralGroup(nn.Module):
    """Adapted units of one kind, zero-padded to the group's largest ``K``.

    Buffers: ``components [A, Kmax, E]`` (rows beyond a unit's ``K`` are zero), ``mean [A, E]``,
    ``index [A, Kmax]`` positions in the parent's flat ``λ`` (padded slots point at an extra
    zero, so they neither act nor count as parameters).
    """

    def __init__(self, components: torch.Tensor, mean: torch.Tensor, index: torch.Tensor,
                 start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop  # columns of the group in the adapted block
        self.register_buffer("components", components)
        self.register_buffer("mean", mean)
        self.register_buffer("index", index)

    def forward(self, y: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
        """``y [B, A, E]``, padded ``lambdas [A, Kmax]`` -> ``[B, E]``:
        ``Σ_u Φ_uᵀ diag(λ_u) Φ_u (y_u − μ_u)``."""
        coef = torch.einsum("bae,ake->bak", y - self.mean, self.components)  # Φ_u (y_u − μ_u)
        return torch.einsum("bak,ake->be", coef * lambdas, self.components)


class ResiDual(UnitAdapter):
    """Spectral ResiDual over cached unit contributions (METHOD §3).

    ``z = Σ_{u adapted} Φ_uᵀ diag(λ_u) Φ_u (y_u − μ_u) [+ μ_u if add_mean] + rest``.
    Adapted units are grouped by kind; each group is two batched einsums over zero-padded
    components (no loop over units). ``λ`` is one flat parameter of ``Σ_u K_u`` values (in the
    order of ``adapted_units``, each unit's components in eigenvalue order).

    Args:
        units: the model's unit table.
        class_weights: ``[C, E]`` frozen zero-shot classifier.
        bases: spectral bases covering the adapted units (and the others for ``mean``).
        k: ``{unit index: K_u}`` for every adapted unit (``0 <= K_u <= E``); see
            :func:`resolve_k` for EVR thresholds and fixed counts.
        ablation: ``sum`` | ``zero`` | ``mean`` for units not in ``k``.
        add_mean: add ``μ_u`` back after each adapted unit (then ``λ = 1`` with all ``E``
            components is the identity: a check, not the method).
        lambda_init: ``ones`` or ``randn`` (``1 + N(0, 1)`` from a generator seeded by ``seed``).
        seed: seed of the ``randn`` init.
    """

    def __init__(self, units: Sequence[Unit], class_weights, bases: SpectralBases,
                 k: Mapping[int, int], *, ablation: str = "zero", add_mean: bool = False,
                 lambda_init: str = "ones", seed: int = 0):
        if bases is None:
            raise AlignInputError("ResiDual needs spectral bases (pass bases=)")
        table = tuple(units)
        adapted = sorted(k, key=lambda i: (KINDS.index(table[i].kind), i))
        super().__init__(table, class_weights, adapted, ablation, bases)
        dim = self.embed_dim
        bad = {i: kk for i, kk in k.items() if not 0 <= kk <= dim}
        if bad:
            raise AlignInputError(f"K_u must be in [0, {dim}], got {bad}")
        self.adapted_units = tuple(adapted)
        self.k = tuple(int(k[i]) for i in adapted)
        total = sum(self.k)
        groups, first, start = [], 0, 0  # first: next free slot of the flat λ
        for kind in KINDS:
            members = [i for i in adapted if table[i].kind == kind]
            if not members:
                continue
            ks = [int(k[i]) for i in members]
            kmax = max(max(ks), 1)
            comps = torch.zeros(len(members), kmax, dim)
            index = torch.full((len(members), kmax), total, dtype=torch.long)
            for a, (unit, kk) in enumerate(zip(members, ks)):
                comps[a, :kk] = torch.as_tensor(bases.components[bases.position(unit), :kk])
                index[a, :kk] = torch.arange(first, first + kk)
                first += kk
            mean = _basis_means(bases, members, dim, "ResiDual").float()  # checks the dimension
            groups.append(_SpectralGroup(comps, mean, index, start, start + len(members)))
            start += len(members)
        self.groups = nn.ModuleList(groups)
        self.lambdas = nn.Parameter(_lambda_init(total, lambda_init, seed))
        if add_mean and adapted:
            self.offset += _basis_means(bases, adapted, dim, "add_mean").sum(0).float()

    def _adapt(self, y: torch.Tensor) -> torch.Tensor:
        padded = F.pad(self.lambdas, (0, 1))  # the extra 0 is what padded slots gather
        out = 0
        for g in self.groups:  # at most one group per kind (3)
            out = out + g(y[:, g.start:g.stop], padded[g.index])
        return out

    def lambdas_by_unit(self) -> dict[str, np.ndarray]:
        """``{unit name: λ_u [K_u]}`` (numpy copies)."""
        flat = self.lambdas.detach().cpu().numpy()
        ends = np.cumsum((0,) + self.k)
        return {self.units[u].name: flat[a:b].copy()
                for u, a, b in zip(self.adapted_units, ends[:-1], ends[1:])}


class CoarseResiDual(UnitAdapter):
    """Coarse variant: one scalar per adapted unit, ``z = Σ_u λ_u y_u + rest`` (no centring).

    Args:
        units, class_weights, ablation, bases: as :class:`UnitAdapter`.
        adapted: the unit indices that get a scalar (the heads, for the ``coarse`` preset).
        lambda_init, seed: as :class:`ResiDual`.
    """

    def __init__(self, units: Sequence[Unit], class_weights, adapted: Sequence[int], *,
                 ablation: str = "zero", bases: SpectralBases | None = None,
                 lambda_init: str = "ones", seed: int = 0):
        super().__init__(units, class_weights, tuple(adapted), ablation, bases)
        self.adapted_units = tuple(adapted)
        self.lambdas = nn.Parameter(_lambda_init(len(self.adapted_units), lambda_init, seed))

    def _adapt(self, y: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bae,a->be", y, self.lambdas)

    def lambdas_by_unit(self) -> dict[str, np.ndarray]:
        """``{unit name: λ_u [1]}`` (numpy copies)."""
        flat = self.lambdas.detach().cpu().numpy()
        return {self.units[u].name: flat[i:i + 1].copy() for i, u in enumerate(self.adapted_units)}


LINEAR_INITS = ("torch", "identity")
"""How :class:`LinearAdapter` starts: ``torch`` (``nn.Linear``'s default, the authors'
``build_proj_out_adapter``) or ``identity`` (``A = I``, ``b = 0``: the zero-shot model)."""


class LinearAdapter(UnitAdapter):
    """Linear adapter baseline on the output embedding: ``z = A (Σ_u y_u) + b``.

    ``init="torch"`` (the authors') draws ``A`` and ``b`` as ``nn.Linear`` does (uniform in
    ``±1/√E``, from torch's global generator, which :func:`align.fit` seeds); ``"identity"``
    starts at the zero-shot model (our variant, preset ``linear-identity``: the untrained adapter
    then scores as zero-shot, which makes short runs comparable). ``E² + E`` trainable parameters.
    """

    def __init__(self, units: Sequence[Unit], class_weights, init: str = "torch"):
        if init not in LINEAR_INITS:
            raise AlignInputError(f"linear adapter init must be one of {LINEAR_INITS}, "
                                  f"got {init!r}")
        super().__init__(units, class_weights, (), "sum")
        self.init = init
        self.linear = nn.Linear(self.embed_dim, self.embed_dim)
        if init == "identity":
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(self.embed_dim))
                self.linear.bias.zero_()

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.linear(super().forward(y))


# ------------------------------------------------------------------------------ presets

KRule = tuple[str, Any]
"""How many components a unit keeps: ``("evr", 0.9)`` (fewest reaching 90% explained variance),
``("count", n)`` with ``n`` an int, ``"head_dim"`` or ``"embed"`` (capped at ``E``)."""


@dataclass(frozen=True)
class Preset:
    """A named method: which units are adapted and how, the rest's ablation, training settings.

    ``variant``: ``spectral`` (:class:`ResiDual`), ``coarse`` (:class:`CoarseResiDual`, one
    scalar per unit of the adapted kinds), ``linear`` (:class:`LinearAdapter`), ``none``
    (zero-shot, nothing trained) or ``finetune`` (runs the backbone: :func:`align.finetune`).
    ``adapt``: ``((kind, KRule), ...)``; kinds absent are not adapted.
    """

    name: str
    variant: str
    adapt: tuple[tuple[str, KRule], ...]
    ablation: str
    lr: float
    batch_size: int
    grad_clip: float | None
    description: str
    init: str | None = None  # linear variant: LINEAR_INITS

    @property
    def needs_bases(self) -> bool:
        return self.variant == "spectral" and bool(self.adapt) or self.ablation == "mean"


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("zero-shot", "none", (), "sum", 0.0, 64, None,
           "the frozen model, no training"),
    Preset("residual-star", "spectral", (("head", ("evr", 0.90)),), "zero", 0.8, 64, None,
           "ResiDual*: all heads at K_90, other units dropped"),
    Preset("residual-full", "spectral",
           (("head", ("count", "head_dim")), ("mlp", ("count", "embed"))), "sum", 0.8, 64, None,
           "ResiDual (full): heads with dh components, MLPs with E, emb kept unchanged"),
    Preset("coarse", "coarse", (("head", ("count", 1)),), "zero", 0.8, 64, None,
           "one scalar per head, other units dropped"),
    # The authors' conf/train: linear_adapter.gin (lr 1e-3, batch 64, no clipping, nn.Linear's
    # init) and finetune.gin (lr 1e-5, batch 128, clipping 1.0).
    Preset("linear", "linear", (), "sum", 1e-3, 64, None,
           "linear adapter (E x E + bias) on the output embedding, the authors' settings",
           init="torch"),
    Preset("linear-identity", "linear", (), "sum", 1e-3, 64, None,
           "the linear adapter started at the identity (the zero-shot model)", init="identity"),
    Preset("finetune", "finetune", (), "sum", 1e-5, 128, 1.0,
           "full fine-tuning of the image tower, text classifier frozen"),
)}
"""The methods of METHOD §3, by name."""


def get_preset(method: str | Preset) -> Preset:
    """The :class:`Preset` of a name (a Preset passes through); unknown names list the known."""
    if isinstance(method, Preset):
        return method
    if method not in PRESETS:
        raise UnknownPresetError(f"unknown method {method!r}; known methods: "
                                 f"{', '.join(PRESETS)}")
    return PRESETS[method]


def resolve_k(rule: KRule, *, head_dim: int | None, embed_dim: int,
              evr_k: int | None = None) -> int:
    """``K`` of one unit under ``rule``; ``evr_k`` is the unit's K at the rule's threshold."""
    how, value = rule
    if how == "evr":
        if evr_k is None:
            raise AlignInputError(f"rule {rule} needs the unit's eigenvalues (bases) or k=")
        return int(evr_k)
    if how == "count":
        if value == "head_dim":
            if head_dim is None:
                raise AlignInputError("rule ('count', 'head_dim') needs head_dim")
            value = head_dim
        elif value == "embed":
            value = embed_dim
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise AlignInputError(f"a count must be a non-negative int, 'head_dim' or 'embed', "
                                  f"got {value!r}")
        return min(int(value), embed_dim)
    raise AlignInputError(f"unknown K rule {rule!r}: use ('evr', threshold) or ('count', n)")


def build_adapter(method: str | Preset, units: Sequence[Unit], class_weights,
                  bases: SpectralBases | None = None, *, head_dim: int | None = None,
                  ablation: str | None = None, adapt: Mapping[str, KRule] | None = None,
                  add_mean: bool = False, lambda_init: str = "ones", seed: int = 0) -> UnitAdapter:
    """The adapter module of a method.

    Args:
        method: a preset name or :class:`Preset`.
        units: the model's unit table (``store.units``).
        class_weights: ``[C, E]`` zero-shot classifier (``store.class_weights``).
        bases: spectral bases (spectral variants and the ``mean`` ablation).
        head_dim: the model's ``dh`` (for ``("count", "head_dim")``; ``store.dims.head_dim``).
        ablation, adapt: override the preset's.
        add_mean, lambda_init, seed: see :class:`ResiDual`.
    """
    preset = get_preset(method)
    ablation = ablation or preset.ablation
    rules = dict(preset.adapt if adapt is None else adapt)
    unknown = set(rules) - set(KINDS)
    if unknown:
        raise AlignInputError(f"unknown unit kinds {sorted(unknown)}; kinds are {KINDS}")
    embed = np.asarray(class_weights).shape[-1]
    members = [u for u in units if u.kind in rules]
    if preset.variant == "none":
        return UnitAdapter(units, class_weights, (), ablation, bases)
    if preset.variant == "linear":
        return LinearAdapter(units, class_weights, init=preset.init or "torch")
    if preset.variant == "coarse":
        return CoarseResiDual(units, class_weights, [u.index for u in members], ablation=ablation,
                              bases=bases, lambda_init=lambda_init, seed=seed)
    if preset.variant == "spectral":
        if bases is None:
            raise AlignInputError(f"method {preset.name!r} needs spectral bases (pass bases=)")
        evr = {t: bases.k_for_evr(t) for t in {r[1] for r in rules.values() if r[0] == "evr"}}
        k = {u.index: resolve_k(rules[u.kind], head_dim=head_dim, embed_dim=embed,
                                evr_k=(evr[rules[u.kind][1]][bases.position(u)]
                                       if rules[u.kind][0] == "evr" else None))
             for u in members}
        return ResiDual(units, class_weights, bases, k, ablation=ablation, add_mean=add_mean,
                        lambda_init=lambda_init, seed=seed)
    raise AlignInputError(f"method {preset.name!r} runs the backbone, not cached features: "
                          "use residual_core.method.training.finetune")


def parameter_count(method: str | Preset, n_layers: int, n_heads: int, head_dim: int,
                    embed_dim: int, k: int | Sequence[int] | None = None) -> int:
    """Trainable parameters of a method by METHOD §3's formulas.

    ``residual-full``: ``L·H·dh + L·E`` (ViT-B/16: 12·12·64 + 12·512 = 15,360); ``coarse``:
    ``L·H`` (144); ``linear``: ``E² + E``; ``zero-shot``: 0; ``residual-star``: ``Σ_h K_h``,
    so pass ``k``: one int for every head, or the ``L·H`` per-head values (e.g. from
    :meth:`SpectralBases.k_for_evr`). ``finetune`` depends on the whole tower: not covered.
    """
    preset = get_preset(method)
    if preset.variant == "finetune":
        raise AlignInputError("fine-tuning trains every weight of the image tower: count "
                              "them on the model (sum of p.numel())")
    if preset.variant == "none":
        return 0
    if preset.variant == "linear":
        return embed_dim * embed_dim + embed_dim
    n_units = {"emb": 1, "mlp": n_layers, "head": n_layers * n_heads}
    total = 0
    for kind, rule in preset.adapt:
        if rule[0] == "evr":
            if k is None:
                raise AlignInputError(f"{preset.name} keeps K_u at {rule[1]:.0%} EVR per unit: "
                                      "pass k (one int, or one value per unit)")
            ks = np.broadcast_to(np.asarray(k), (n_units[kind],)) if np.ndim(k) == 0 \
                else np.asarray(k)
            if ks.shape != (n_units[kind],):
                raise AlignInputError(f"k must have one value per {kind} ({n_units[kind]}), "
                                      f"got {ks.shape}")
            total += int(ks.sum())
        else:
            total += n_units[kind] * resolve_k(rule, head_dim=head_dim, embed_dim=embed_dim)
    return total
