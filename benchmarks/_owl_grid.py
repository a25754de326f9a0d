"""Shared by the OWL grids (oneshot_owl_minilm.py, oneshot_gpt.py --owl-grid): the rows of an
(M, λ) grid, the block sparsities OWL chose, and a plot of a metric against λ beside uniform."""

from __future__ import annotations

import prunekit as pk

#: OWL's published values (Yin et al. 2024), prunekit's defaults: M, λ.
PAPER = (pk.OWL().outlier_multiplier, pk.OWL().spread)


def grid_label(multiplier: float, spread: float) -> str:
    return f"OWL M={multiplier:g}, λ={spread:g}"


def grid_rows(multipliers, spreads) -> list[tuple[str, pk.OWL]]:
    """(label, ``layer_sparsity``) for every M in ``multipliers`` and λ in ``spreads``, M outermost."""
    return [(grid_label(m, s), pk.OWL(m, s)) for m in multipliers for s in spreads]


def block_sparsities(report) -> str:
    """The target sparsity of each block in ``report`` (a pruner's calibration_report), in block order;
    the block index is the third part of a layer's name (``encoder.layer.<i>.…``, ``transformer.h.<i>.…``)."""
    per_block = {}
    for name, value in report.target_sparsity.items():
        per_block.setdefault(int(name.split(".")[2]), value)
    return " ".join(f"{per_block[i]:.3f}" for i in sorted(per_block))


def plot_grid(metric: dict, multipliers, spreads, criteria, path, ylabel: str, title: str, sparsity: float) -> None:
    """``metric[(label, criterion)]`` against λ, one line per M, beside uniform (the ``"uniform"`` row);
    one panel per criterion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(criteria), figsize=(9, 3.6), sharey=True)
    for ax, criterion in zip(axes, criteria):
        for m in multipliers:
            ax.plot(spreads, [metric[(grid_label(m, s), criterion)] for s in spreads], "o-", label=f"OWL M={m:g}")
        ax.axhline(metric[("uniform", criterion)], color="black", linestyle="--", label="uniform")
        ax.set_title(f"{criterion}, {sparsity:.0%}")
        ax.set_xlabel("λ (spread of block sparsities)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
