"""The residual units of a ViT image tower and their canonical order.

Order (as in the ResiDual authors' code): ``emb``, then ``L{l}.mlp`` for every layer, then the
attention heads ``L{l}H{h}`` layer-major. ``U = 1 + L + L*H``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

UnitKind = Literal["emb", "mlp", "head"]
KINDS: tuple[str, ...] = get_args(UnitKind)
"""Unit kinds, in canonical order (the order adapted units are grouped in inside a module)."""


@dataclass(frozen=True)
class Unit:
    """One residual unit: its position in the stack, name, kind, layer and head (-1 if none)."""

    index: int
    name: str
    kind: UnitKind
    layer: int
    head: int

    def as_dict(self) -> dict:
        return asdict(self)


def unit_table(n_layers: int, n_heads: int) -> tuple[Unit, ...]:
    """All units of a tower with ``n_layers`` blocks of ``n_heads`` heads, in canonical order."""
    if n_layers < 1 or n_heads < 1:
        raise ValueError(f"need n_layers >= 1 and n_heads >= 1, got {n_layers}, {n_heads}")
    units = [Unit(0, "emb", "emb", -1, -1)]
    units += [Unit(1 + l, f"L{l}.mlp", "mlp", l, -1) for l in range(n_layers)]
    base = 1 + n_layers
    units += [
        Unit(base + l * n_heads + h, f"L{l}H{h}", "head", l, h)
        for l in range(n_layers)
        for h in range(n_heads)
    ]
    return tuple(units)


def format_unit_table(units: tuple[Unit, ...], limit: int | None = None) -> str:
    """A plain-text table of units (index, name, kind, layer, head), optionally truncated."""
    rows = list(units) if limit is None or len(units) <= limit else list(units[:limit])
    lines = [f"{'index':>5}  {'name':<8}  {'kind':<4}  {'layer':>5}  {'head':>4}"]
    for u in rows:
        layer = "-" if u.layer < 0 else str(u.layer)
        head = "-" if u.head < 0 else str(u.head)
        lines.append(f"{u.index:>5}  {u.name:<8}  {u.kind:<4}  {layer:>5}  {head:>4}")
    if len(rows) < len(units):
        lines.append(f"  ... {len(units) - len(rows)} more units")
    return "\n".join(lines)
