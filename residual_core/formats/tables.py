"""The result tables' contracts: each Parquet table's columns, declared once, with their types and
what they mean.

Every writer goes through :meth:`TableSpec.conform` (:func:`residual_core.tables.write_rows`
does), so a row with an undeclared column is refused at the source instead of appearing in one
partition and not another; the descriptions are written into each file's Parquet schema (field
metadata ``description``) and printed by ``residual results --describe TABLE``. Imports only
pyarrow: the CLI reads this without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from residual_core.errors import ResidualError
from residual_core.identity import RANDOM_WEIGHTS

__all__ = ["Column", "TABLES", "TableSpec", "table_spec"]


@dataclass(frozen=True)
class Column:
    """One column: its name, Arrow type and meaning."""

    name: str
    type: pa.DataType
    description: str
    null_as: object = None  # what a null is written as (e.g. "random" for seeded weights)


@dataclass(frozen=True)
class TableSpec:
    """A table's columns (in order) and the stage whose rerun rewrites it."""

    name: str
    description: str
    stage: str
    columns: tuple[Column, ...]

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema, each field's description in its metadata."""
        return pa.schema([pa.field(c.name, c.type, metadata={"description": c.description})
                          for c in self.columns],
                         metadata={"residual.table": self.name,
                                   "description": self.description})

    def conform(self, tbl: pa.Table, strict: bool = True) -> pa.Table:
        """``tbl`` with the declared columns, in order and cast to their types (an absent one
        is all null); an undeclared column is a :class:`ResidualError` naming it (``strict``,
        for writing) or dropped (reading files written by an older version)."""
        declared = {c.name for c in self.columns}
        unknown = [n for n in tbl.column_names if n not in declared]
        if unknown and not strict:
            tbl = tbl.drop_columns(unknown)
        elif unknown:
            raise ResidualError(
                f"rows for table {self.name!r} have undeclared columns {unknown}: declare them "
                "in residual_core/formats/tables.py")
        arrays = []
        for c in self.columns:
            if c.name not in tbl.column_names:
                arrays.append(pa.nulls(tbl.num_rows, c.type) if c.null_as is None else
                              pa.array([c.null_as] * tbl.num_rows, c.type))
                continue
            column = tbl.column(c.name)
            try:
                column = column.cast(c.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ResidualError(f"table {self.name!r}: column {c.name!r} of type "
                                    f"{column.type} is not {c.type} ({exc})") from None
            if c.null_as is not None and column.null_count:
                column = pa.array([c.null_as if v is None else v for v in column.to_pylist()],
                                  c.type)
            arrays.append(column)
        return pa.Table.from_arrays(arrays, schema=self.schema)


def _columns(*spec: tuple) -> tuple[Column, ...]:
    return tuple(Column(*c) for c in spec)


_STR, _INT, _FLOAT = pa.string(), pa.int64(), pa.float64()
_TIME = pa.timestamp("ms", tz="UTC")  # what Parquet stores (it has no seconds unit)

_WHO = _columns(
    ("model", _STR, "architecture name (open_clip), a partition key"),
    ("dataset", _STR, "task: a registered dataset name or imagefolder:PATH, a partition key"),
    ("pretrained", _STR, f"the weights: pretrained tag, checkpoint path, or {RANDOM_WEIGHTS!r} "
     "for seeded random weights (never null)", RANDOM_WEIGHTS),
)
_PROVENANCE = _columns(
    ("config_hash", _STR, "content identity of what produced the row (inputs' config hashes "
     "and the parameters): a row with the same hash is the same result"),
    ("code_version", _STR, "package version and git commit that wrote the row"),
    ("created_at", _TIME, "when the row was written (a UTC timestamp, to the second)"),
)
_UNIT = _columns(
    ("split", _STR, "the split whose feature store the statistics come from"),
    ("feature_config_hash", _STR, "config hash of that feature store"),
    ("unit", _STR, "residual unit: emb, L{l}.mlp or L{l}H{h}"),
    ("unit_index", _INT, "position of the unit in the store's unit table"),
    ("kind", _STR, "emb, mlp or head"),
    ("layer", _INT, "layer of the unit (null for emb)"),
    ("head", _INT, "head index within its layer (null unless a head)"),
)

_CLASSIFIER = ("the frozen classifier: text (zero-shot text classifier), centroid (plain class "
               "means of the train encodings, the authors') or centroid-l2 (null in rows "
               "written before: text)")

TABLES: dict[str, TableSpec] = {t.name: t for t in (
    TableSpec("evaluations", "one row per fit: a method on a task with one seed", "align",
              _WHO + _columns(
                  ("method", _STR, "align method (preset): zero-shot, residual-star, linear, ..."),
                  ("preset_params", _STR, "the fit's training settings, as JSON"),
                  ("trainable_parameters", _INT, "parameters the method trains"),
                  ("val_acc", _FLOAT, "accuracy on the validation split (model selection)"),
                  ("test_acc", _FLOAT, "accuracy on the test split"),
                  ("epochs", _INT, "epochs run (early stopping may end before the maximum)"),
                  ("best_epoch", _INT, "epoch of the best validation accuracy (kept weights)"),
                  ("fit_seconds", _FLOAT, "wall time of the fit"),
                  ("seed", _INT, "seed of the fit"),
                  ("basis_dataset", _STR, "dataset whose principal bases the method used "
                   "(null: none)"),
                  ("n_train", _INT, "rows of the train split (null in rows written before)"),
                  ("n_val", _INT, "rows of the validation split"),
                  ("n_test", _INT, "rows of the test split"),
                  ("n_classes", _INT, "classes of the task"),
                  ("checkpoint_sha256", _STR, "SHA-256 of the checkpoint file (null for a "
                   "pretrained tag or random weights)"),
                  ("classifier", _STR, _CLASSIFIER),
              ) + _PROVENANCE),
    TableSpec("head_selection", "test accuracy with only some heads kept (the others ablated)",
              "align", _WHO + _columns(
                  ("ranking", _STR, "how heads were ranked on val before keeping the top "
                   "ones (S, U|T, U, U-out, R), or a reference set (heads, layers, all, "
                   "layer{l}, upto_layer{l})"),
                  ("seed", _INT, "seed of a random ranking R (null otherwise)"),
                  ("keep", _STR, "the keep rule as given, e.g. 1 or 1% (null for references)"),
                  ("n_heads", _INT, "heads kept (emb and MLPs are ablated too, as the authors)"),
                  ("fraction", _FLOAT, "heads kept / all heads"),
                  ("ablation", _STR, "how the other units were removed: zero, mean, or none"),
                  ("mean_source", _STR, "mean ablation: the split whose means replace the "
                   "units (null otherwise)"),
                  ("statistic", _STR, "correlation statistic of the U rankings (pearson: the "
                   "authors'; pooled)"),
                  ("test_acc", _FLOAT, "zero-shot test accuracy with those units"),
                  ("classifier", _STR, _CLASSIFIER),
                  ("heads", _STR, "the kept heads, comma-separated (best-ranked first; "
                   "references in head order; null in rows written before)"),
              ) + _PROVENANCE),
    TableSpec("head_scores", "one row per head: the head-selection scores it was ranked by "
              "on the validation split", "align", _WHO + _UNIT + _columns(
                  ("S", _FLOAT, "the head's own zero-shot accuracy"),
                  ("U|T", _FLOAT, "correlation with the sum of the heads in the classifier's "
                   "basis (class text embeddings or prototypes)"),
                  ("U", _FLOAT, "correlation with the sum of the heads"),
                  ("U-out", _FLOAT, "correlation with the sum of the heads in the full "
                   "outputs' basis"),
                  ("statistic", _STR, "correlation statistic (pearson: the authors'; pooled)"),
                  ("classifier", _STR, _CLASSIFIER),
              ) + _PROVENANCE),
    TableSpec("spectra", "one row per unit and principal component of a feature store",
              "spectral", _WHO + _UNIT + _columns(
                  ("component", _INT, "principal component index (by decreasing eigenvalue)"),
                  ("eigenvalue", _FLOAT, "variance along the component"),
                  ("evr", _FLOAT, "explained variance ratio of the component"),
                  ("cumulative_evr", _FLOAT, "explained variance ratio of components 0..this"),
              ) + _PROVENANCE),
    TableSpec("unit_stats", "one row per unit of a feature store: spectral statistics",
              "spectral", _WHO + _UNIT + _columns(
                  ("k90", _INT, "components explaining 90% of the unit's variance"),
                  ("k99", _INT, "components explaining 99% of the unit's variance"),
                  ("evr1", _FLOAT, "explained variance ratio of the first component"),
                  ("participation_ratio", _FLOAT, "(Σλ)² / Σλ²"),
                  ("total_variance", _FLOAT, "Σλ, the unit's total variance"),
                  ("twonn", _FLOAT, "TwoNN intrinsic dimension (seeded subsample)"),
                  ("n_samples", _INT, "rows the PCA used"),
              ) + _PROVENANCE),
    TableSpec("basis_similarity", "one row per unit: similarity of its principal bases on two "
              "datasets (or splits), or in two models of one output width", "similarity",
              _WHO + _columns(
                  ("other_model", _STR, "architecture of the other spectral store"),
                  ("other_pretrained", _STR, "weights of the other spectral store (as "
                   "pretrained)", RANDOM_WEIGHTS),
                  ("other_dataset", _STR, "the dataset compared with"),
                  ("split", _STR, "split of the first spectral store"),
                  ("other_split", _STR, "split of the other"),
                  ("evr_threshold", _FLOAT, "bases truncated at this explained variance ratio"),
                  ("unit", _STR, "residual unit"),
                  ("similarity", _FLOAT, "subspace score (eigenvalue-weighted)"),
                  ("similarity_greedy", _FLOAT, "METHOD's greedy one-to-one score"),
                  ("authors", _FLOAT, "the paper's score, the ResiDual authors' "
                   "normalized_spectral_cosine: bases cut where cumulative EVR exceeds the "
                   "threshold, eigenvalue weights, greedy one-to-one matching, normalised by "
                   "||(w_i v_i)_i||"),
                  ("k_a", _INT, "components kept of the first basis"),
                  ("k_b", _INT, "components kept of the other"),
              ) + _PROVENANCE),
    TableSpec("head_texts", "one row per head and picked description: heads explained in "
              "text (TextSpan or SOMP over a dictionary)", "explain", _WHO + _columns(
                  ("split", _STR, "the split whose feature store the contributions come from"),
                  ("feature_config_hash", _STR, "config hash of that feature store"),
                  ("unit", _STR, "the head: L{l}H{h}"),
                  ("layer", _INT, "layer of the head"),
                  ("head", _INT, "head index within its layer"),
                  ("method", _STR, "textspan or somp"),
                  ("dictionary", _STR, "the dictionary as given: textspan, world or a file"),
                  ("dictionary_sha1", _STR, "SHA-1 of the dictionary's descriptions"),
                  ("rank", _INT, "pick order (0 first)"),
                  ("text_index", _INT, "line of the description in the dictionary"),
                  ("text", _STR, "the description"),
                  ("score", _FLOAT, "textspan: std of the head's (deflated) data along the "
                   "text's projection when picked; somp: the atom's weight (L2 norm of its "
                   "coefficients)"),
                  ("explained_variance", _FLOAT, "fraction of the head's variance this pick "
                   "explains (somp: gain of the refit's explained variance)"),
                  ("class_separation", _FLOAT, "eta^2 of the dataset's classes along the "
                   "pick's direction (textspan: the deflated text; somp: the atom): the share "
                   "of the head's variance there that the class means account for, 0 to 1"),
              ) + _PROVENANCE),
    TableSpec("cross_model", "one row per statistic: correlation across heads of a per-head "
              "spectral statistic between two models on one dataset", "similarity",
              _WHO + _columns(
                  ("split", _STR, "split of both spectral stores"),
                  ("other_model", _STR, "architecture of the other model"),
                  ("other_pretrained", _STR, "weights of the other model (as pretrained)",
                   RANDOM_WEIGHTS),
                  ("statistic", _STR, "k90, twonn, or cumulative_evr (each head's cumulative "
                   "EVR at 1, 2, 4, ... components, powers of two below the width, "
                   "concatenated over heads)"),
                  ("pearson", _FLOAT, "Pearson correlation of the statistic across heads"),
                  ("spearman", _FLOAT, "Spearman rank correlation of the statistic across "
                   "heads"),
                  ("n_heads", _INT, "heads matched by name (only those both models have)"),
              ) + _PROVENANCE),
)}
"""Every result table, by name."""


def table_spec(name: str) -> TableSpec:
    """The spec of table ``name`` (a one-line error listing the tables otherwise)."""
    try:
        return TABLES[name]
    except KeyError:
        raise ResidualError(f"unknown table {name!r}; tables: {', '.join(TABLES)}") from None
