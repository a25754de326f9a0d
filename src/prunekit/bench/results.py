"""Tidy benchmark results and what is made of them: mean ± std tables in Markdown and plots.

Every measurement is one row (a dict): ``method``, ``point`` (the operating point asked for, e.g. a
target compression or a pruning round), ``seed``, ``compression`` (achieved: total / non-zero pruned
parameters), ``accuracy`` (fraction in [0, 1]) and whatever else the study records. Accuracies in
tables and plots are shown in **percent**.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Aggregate:
    """Mean and sample standard deviation over seeds of one (method, point)."""

    method: str
    point: float
    n: int
    accuracy: float
    accuracy_std: float
    compression: float
    extra: dict[str, float] = field(default_factory=dict)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class SweepResult:
    """Rows of a sweep plus the dense baseline: ``dense`` holds one row per seed (``accuracy`` of the
    dense model, before any pruning). ``settings`` describes the protocol (printed with the table)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    dense: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(row["method"] for row in self.rows))

    @property
    def points(self) -> list[float]:
        return sorted({row["point"] for row in self.rows})

    def dense_accuracy(self) -> tuple[float, float]:
        """Mean and std over seeds of the dense model's accuracy (fraction)."""
        return _mean_std([row["accuracy"] for row in self.dense])

    def aggregate(self, key: str = "accuracy") -> list[Aggregate]:
        """One :class:`Aggregate` per (method, point), in method then point order. Other numeric
        columns (e.g. ``accuracy_before_finetune``) are averaged into ``extra``."""
        groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
        for row in self.rows:
            groups.setdefault((row["method"], row["point"]), []).append(row)
        found = []
        for method in self.methods:
            for point in self.points:
                rows = groups.get((method, point))
                if not rows:
                    continue
                mean, std = _mean_std([r[key] for r in rows])
                numeric = {
                    k
                    for r in rows
                    for k, v in r.items()
                    if isinstance(v, (int, float)) and k not in ("point", "seed", key, "compression")
                }
                extra = {
                    k: statistics.fmean(r[k] for r in rows) for k in numeric if all(r.get(k) is not None for r in rows)
                }
                compression = statistics.fmean(r["compression"] for r in rows)
                found.append(Aggregate(method, point, len(rows), mean, std, compression, extra))
        return found

    def best_within(self, points_below_dense: float, method: str) -> Aggregate | None:
        """The highest-compression point of ``method`` whose mean accuracy is at most
        ``points_below_dense`` percentage points below the dense mean, or None."""
        dense, _ = self.dense_accuracy()
        # Accuracies are whole numbers of images: a tolerance keeps float rounding from moving the boundary.
        ok = [
            a
            for a in self.aggregate()
            if a.method == method and 100 * (dense - a.accuracy) <= points_below_dense + 1e-9
        ]
        return max(ok, key=lambda a: a.compression, default=None)

    def to_markdown(
        self, point_label: Callable[[float], str] | None = None, points_are_compressions: bool = True
    ) -> str:
        """A table: one row per method, one column per point, cells "mean ± std" accuracy in percent,
        and the dense baseline. When points are target compressions, a cell whose mean achieved
        compression differs by more than 2% also shows that compression."""
        label = point_label or (lambda p: f"{p:g}×")
        aggregates = {(a.method, a.point): a for a in self.aggregate()}
        dense, dense_std = self.dense_accuracy()
        seeds = len(self.dense)
        header = "| method | " + " | ".join(label(p) for p in self.points) + " |"
        lines = [header, "|---|" + "---:|" * len(self.points)]
        lines.append(
            f"| dense (no pruning), {seeds} seed{'s' * (seeds != 1)} | "
            + " | ".join(f"{100 * dense:.2f} ± {100 * dense_std:.2f}" for _ in self.points)
            + " |"
        )
        for method in self.methods:
            cells = []
            for point in self.points:
                a = aggregates.get((method, point))
                if a is None:
                    cells.append("")
                    continue
                cell = f"{100 * a.accuracy:.2f} ± {100 * a.accuracy_std:.2f}"
                if points_are_compressions and abs(a.compression - point) > 0.02 * point:
                    cell += f" ({a.compression:.1f}×)"
                cells.append(cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_json(self, path: str | Path) -> Path:
        """Write settings, dense rows and all rows as JSON (the raw numbers behind tables and plots)."""
        path = Path(path)
        path.write_text(json.dumps({"settings": self.settings, "dense": self.dense, "rows": self.rows}, indent=1))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> SweepResult:
        raw = json.loads(Path(path).read_text())
        return cls(raw["rows"], raw["dense"], raw.get("settings", {}))

    def plot(
        self,
        path: str | Path | None = None,
        title: str = "",
        x: str = "compression",
        xlabel: str = "compression (total / non-zero pruned weights, log scale)",
        methods: list[str] | None = None,
        ylim: tuple[float, float] | None = None,
        ax=None,
    ):
        """Accuracy (%) against compression (log scale), one line per method, error bars = std over
        seeds, the dense model as a dotted line with its ±std band. With ``x="remaining"`` the x axis is
        the percentage of weights remaining instead (lottery-ticket style, 100% on the left).

        Writes ``path`` (PNG, or any format matplotlib knows by the extension) and returns it; with
        ``ax`` (a matplotlib Axes) draws there instead, e.g. one panel of a larger figure, and returns ``ax``."""
        if ax is None:
            if path is None:
                raise ValueError("give the plot a path to write, or an ax to draw into")
            Figure = require_matplotlib()
            fig = Figure(figsize=(8, 5), dpi=120, layout="constrained")
            ax = fig.add_subplot()
        dense, dense_std = self.dense_accuracy()
        ax.axhline(100 * dense, color="0.4", linestyle=":", linewidth=1, label=f"dense ({100 * dense:.2f}%)")
        ax.axhspan(100 * (dense - dense_std), 100 * (dense + dense_std), color="0.85", alpha=0.5)
        ticks: set[float] = set()
        for method in methods or self.methods:
            points = [a for a in self.aggregate() if a.method == method]
            if not points:
                continue
            xs = [a.compression if x == "compression" else 100 / a.compression for a in points]
            ys = [100 * a.accuracy for a in points]
            ticks.update(round(v, 1) for v in xs)
            ax.errorbar(
                xs, ys, yerr=[100 * a.accuracy_std for a in points], marker="o", markersize=4, capsize=3, label=method
            )
        ax.set_xscale("log", base=2 if x == "compression" else 10)
        # Ticks at the measured points, labelled plainly (8×, 21.1%) rather than as powers; points
        # closer than 5% (12× and a per-layer recipe's 12.2×) share the first one's tick.
        shown: list[float] = []
        for tick in sorted(ticks):
            if not shown or tick > 1.05 * shown[-1]:
                shown.append(tick)
        ax.set_xticks(shown, [f"{t:g}{'×' if x == 'compression' else '%'}" for t in shown])
        ax.minorticks_off()
        ax.tick_params(axis="x", labelsize=7 if len(shown) > 8 else 9)
        if x == "remaining":
            ax.invert_xaxis()
        ax.set_xlabel(xlabel)
        ax.set_ylabel("evaluation accuracy (%)")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        if path is None:
            return ax
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ax.figure.savefig(path)
        return path


def require_matplotlib():
    """matplotlib's Figure class (Agg backend unless one is set), or an ImportError saying what to install."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure  # a bare Figure leaves pyplot's global state alone
    except ImportError as err:
        raise ImportError('plots need matplotlib: pip install "prunekit[bench]"') from err
    return Figure
