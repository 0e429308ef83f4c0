"""The verify report on disk: ``<run>/verify/<device>/report.json`` and ``report.png``, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from ghnq_deploy.io import atomic_write, atomic_write_text
from ghnq_deploy.verify.compare import HIST_BINS
from ghnq_deploy.verify.gap import plot_waterfall

STAGES = (("float_top1", "float"), ("paper_sim_top1", "paper sim"), ("target_sim_top1", "target sim"),
          ("real_top1", "real"))


def report_dir(model_path: Path, device: str) -> Path:
    return model_path.parent / "verify" / device


def write_json(report: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "report.json"
    atomic_write_text(path, json.dumps(report, indent=1, default=str) + "\n")
    return path


def plot(report: dict, folder: Path) -> Path:
    """Left: top-1 per stage for every (target, bit-width) row; right: the sim-vs-real step histogram."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(STAGES)
    for k, (key, label) in enumerate(STAGES):
        xs = [i + (k - 1.5) * width for i, r in enumerate(rows) if r.get(key) is not None]
        ys = [r[key] for r in rows if r.get(key) is not None]
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(rows)), [f"{r['target']}\n{r['bits']}" for r in rows], fontsize=7)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{report['model']['arch']}: accuracy per stage ({report['images']['count']} images)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    real_rows = [r for r in rows if r.get("sim_vs_real")]
    for j, r in enumerate(real_rows):
        hist = r["sim_vs_real"]["step_histogram"]
        hx.bar([b + (j - len(real_rows) / 2) * 0.8 / max(1, len(real_rows)) for b in range(len(HIST_BINS))],
               [100 * hist[b] for b in HIST_BINS], 0.8 / max(1, len(real_rows)), label=f"{r['target']} {r['bits']}")
    hx.set_xticks(range(len(HIST_BINS)), HIST_BINS)
    hx.set_xlabel("|target sim - real| (output steps)")
    hx.set_ylabel("% of logits")
    hx.set_yscale("log")
    hx.set_title("sim vs real: difference per logit", fontsize=9)
    if real_rows:
        hx.legend(fontsize=7)
    fig.tight_layout()
    path = folder / "report.png"
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


def plot_gap(report: dict, folder: Path) -> Path | None:
    """``gap.png``: the waterfall of every row with a gap chain (None when no row has one)."""
    if not any(r.get("gap") for r in report["rows"]):
        return None
    path = folder / "gap.png"
    plot_waterfall(report["rows"], path)
    return path
