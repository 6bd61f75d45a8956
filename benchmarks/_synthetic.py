"""Synthetic feature stores for the benchmarks: the shapes of a real model's store, rows of
low-rank signal plus noise, written straight through the store API (claims, done flags and
finalisation as extraction does them), no model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

RANK = 8


@dataclass(frozen=True)
class Shape:
    """A store's unit layout: ``layers`` × ``heads`` heads of ``head_dim``, residual ``width``,
    output ``embed``; rows written in chunks of ``rows_per_chunk``."""

    layers: int
    heads: int
    head_dim: int
    width: int
    embed: int
    rows_per_chunk: int

    def dims(self, n: int):
        from residual_core.formats.feature_store import StoreDims

        return StoreDims(n=n, layer=self.layers, head=self.heads, head_dim=self.head_dim,
                         width=self.width, embed=self.embed, n_class=10, n_template=1,
                         rows_per_chunk=self.rows_per_chunk)


SHAPES = {
    # one head of ViT-B: units emb, L0.mlp, L0H0
    "vit-b-head": Shape(1, 1, 64, 768, 512, 8192),
    # every unit of ViT-B/16 (157), at extraction's default chunking
    "vit-b-16": Shape(12, 12, 64, 768, 512, 1024),
    "tiny": Shape(4, 4, 32, 128, 64, 1024),
}


def _chunk(store, shape: Shape, chunk: int) -> dict[str, np.ndarray]:
    """Row chunk ``chunk``: rank-8 signal plus noise per unit, seeded by the chunk."""
    rows = store.chunk_rows(chunk)
    n = rows.stop - rows.start
    rng = np.random.default_rng(chunk)
    basis = np.random.default_rng(0)  # the same directions in every chunk

    def field(units: int, dim: int) -> np.ndarray:
        mixing = basis.standard_normal((units, RANK, dim), dtype=np.float32)
        signal = np.einsum("nur,urd->nud", rng.standard_normal((n, units, RANK),
                                                               dtype=np.float32), mixing)
        noise = rng.standard_normal((n, units, dim), dtype=np.float32)
        return (signal + 0.1 * noise).astype(np.float16)

    return {"heads": field(shape.layers * shape.heads, shape.head_dim).reshape(
                n, shape.layers, shape.heads, shape.head_dim),
            "mlp": field(shape.layers, shape.width), "emb": field(1, shape.width)[:, 0],
            "ln_mean": rng.standard_normal(n, dtype=np.float32),
            "ln_inv_std": 1 + 0.1 * rng.random(n, dtype=np.float32),
            "labels": np.arange(rows.start, rows.stop, dtype=np.int64) % 10,
            "indices": np.arange(rows.start, rows.stop, dtype=np.int64)}


def write_part(url: str, n: int, part: str, shape_name: str) -> None:
    """Part ``part`` (``I/P``) of the synthetic store of ``n`` rows at ``url`` (created by
    whichever part comes first)."""
    from residual_core.engines.extract import claim_part, finalize_when_done
    from residual_core.formats.claims import store_claims
    from residual_core.formats.feature_store import FeatureStore
    from residual_core.method.decompose import ReadoutMaps
    from residual_core.stages.extract import Part

    shape = SHAPES[shape_name]
    rng = np.random.default_rng(1)
    lh, dh, e = (shape.layers, shape.heads), shape.head_dim, shape.embed
    maps = ReadoutMaps.from_numpy({
        "head_maps": rng.standard_normal((*lh, dh, e), dtype=np.float32) / np.sqrt(dh),
        "head_bias": 0.01 * rng.standard_normal((*lh, e), dtype=np.float32),
        "resid_map": rng.standard_normal((shape.width, e), dtype=np.float32)
        / np.sqrt(shape.width),
        "gamma_proj": rng.standard_normal(e, dtype=np.float32),
        "beta_proj": rng.standard_normal(e, dtype=np.float32)})
    with store_claims(url) as claims:
        claims.hold_store(exclusive=False)
        with claims.metadata():
            if not Path(url).exists():
                FeatureStore.create(
                    url, dims=shape.dims(n), feature_dtype="float16",
                    attrs={"config_hash": f"synthetic-{shape_name}-{n}", "model": "synthetic",
                           "pretrained": "random", "dataset": "synthetic", "split": "train",
                           "config": {}, "classnames": [str(c) for c in range(10)],
                           "templates": ["{}"], "text_tower": False,
                           "units": [u.as_dict() for u in maps.units]},
                    maps=maps, text={"class_weights": np.zeros((10, e), np.float32)},
                    labels=np.arange(n, dtype=np.int64) % 10,
                    indices=np.arange(n, dtype=np.int64))
            store = FeatureStore.open(url, require_complete=False)
        pending, _ = claim_part(store, claims, Part.parse(part))
        for chunk in pending:
            store.write_chunk(int(chunk), _chunk(store, shape, int(chunk)))
            claims.release(int(chunk))
        finalize_when_done(store, claims)


def write_in_parts(url: str, n: int, shape_name: str, parts: int = 2) -> None:
    """The synthetic store written by ``parts`` processes at once."""
    import subprocess
    import sys

    code = ("import sys; from benchmarks._synthetic import write_part as w; "
            "w(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])")
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(n), f"{i}/{parts}",
                               shape_name], stderr=subprocess.PIPE, text=True)
             for i in range(parts)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(err)
