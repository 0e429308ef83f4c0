"""Accuracy vs bit-width, one line per split with SEM error bars (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from ghnq_deploy.io import atomic_write
from ghnq_deploy.report.table1 import METRICS, Table1, bits_label, split_label


def plot_accuracy(table: Table1, path: str | Path, title: str | None = None) -> Path:
    """Two panels (top-1, top-5); x = bit-widths in the table's order; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.5 * len(METRICS), 4), squeeze=False)
    xs = list(range(len(table.bits)))
    for ax, (metric, label) in zip(axes[0], METRICS):
        for split in table.splits:
            cells = [table.cell(metric, b, split) for b in table.bits]
            pts = [(x, c) for x, c in zip(xs, cells) if c is not None]
            ax.errorbar([x for x, _ in pts], [c.mean for _, c in pts], yerr=[c.sem or 0.0 for _, c in pts],
                        marker="o", capsize=3, label=f"{split_label(split)} (n={table.nets.get(split, 0)})")
        ax.set_xticks(xs, [bits_label(b) for b in table.bits])
        ax.set_ylabel(label)
        ax.set_xlabel("bit-width")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path
