"""What ``plrd.decompose`` did: one row per targeted layer, totals, and a printable table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def _rank_text(rank: int | None) -> str:
    return "dense" if rank is None else str(rank)


@dataclass
class LayerChange:
    """One targeted layer. ``rank_* = None`` means dense (full weight matrix)."""

    name: str
    in_features: int
    out_features: int
    rank_before: int | None
    rank_after: int | None
    params_before: int
    params_after: int
    ridge: float = 0.0
    """Relative Cholesky ridge added to this layer's Gram (0.0: none needed or no Gram used)."""

    @property
    def changed(self) -> bool:
        return self.rank_before != self.rank_after

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("rank_before", "rank_after"):
            if d[key] is None:
                d[key] = "dense"
        return d


@dataclass
class DecompositionReport:
    """Result of ``plrd.decompose``: per-layer changes and whole-model parameter totals.

    ``params_before``/``params_after`` count the whole model (tied tensors once);
    ``target_params`` = keep × params_before.
    """

    keep: float
    method: str
    allocation: str
    params_before: int
    params_after: int
    target_params: int
    layers: list[LayerChange] = field(default_factory=list)

    @property
    def kept_fraction(self) -> float:
        """params_after / params_before."""
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def relative_error(self) -> float:
        """(params_after − target) / target: how far the result landed from the budget."""
        return (self.params_after - self.target_params) / self.target_params

    @property
    def ridges(self) -> dict[str, float]:
        """Layers whose Gram needed a Cholesky ridge, with the relative ridge added."""
        return {c.name: c.ridge for c in self.layers if c.ridge > 0}

    def to_dict(self) -> dict[str, Any]:
        return {
            "keep": self.keep,
            "method": self.method,
            "allocation": self.allocation,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "target_params": self.target_params,
            "kept_fraction": self.kept_fraction,
            "layers": [c.to_dict() for c in self.layers],
        }

    def __str__(self) -> str:
        header = ("layer", "shape", "rank", "params", "ridge")
        rows = []
        for c in self.layers:
            rank = f"{_rank_text(c.rank_before)} -> {_rank_text(c.rank_after)}"
            params = f"{c.params_before:,} -> {c.params_after:,}"
            ridge = f"{c.ridge:.0e}" if c.ridge > 0 else "-"
            rows.append((c.name, f"{c.out_features}x{c.in_features}", rank, params, ridge))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        out = [line(header), line(tuple("-" * w for w in widths))]
        out += [line(r) for r in rows]
        changed = sum(c.changed for c in self.layers)
        out.append("")
        out.append(
            f"{changed} of {len(self.layers)} targeted layers changed ({self.method}, "
            f"{self.allocation} allocation)"
        )
        out.append(
            f"model parameters: {self.params_before:,} -> {self.params_after:,} "
            f"({100 * self.kept_fraction:.2f}% kept; target {self.target_params:,} = "
            f"{100 * self.keep:.2f}%, off by {100 * self.relative_error:+.2f}%)"
        )
        note = self.ridge_note()
        if note:
            out.append(note)
        return "\n".join(out)

    def ridge_note(self) -> str:
        """A sentence on the layers whose Gram needed a ridge ("" when none did)."""
        ridges = self.ridges
        if not ridges:
            return ""
        worst = max(ridges, key=ridges.get)
        return (
            f"note: {len(ridges)} layer(s) had a singular calibration Gram and were whitened with "
            f"a Cholesky ridge (largest {ridges[worst]:.0e}·mean(diag) on {worst!r}): some "
            "directions of their calibration inputs are missing or below float32 resolution "
            "(dead features, too few tokens); a ridge up to 1e-06 only rounds those away, a "
            "larger one says more calibration tokens would whiten more faithfully"
        )
