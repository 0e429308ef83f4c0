"""Why simulated and real accuracy differ: the gap chain of one (target, bit-width) row.

The chain runs from the float reference through the simulations to the runtime; each link
changes one thing, so the accuracy change across it is that thing's share of the gap:

    float -> paper fake-quant (batch-statistics BN)            the paper's quantization (context)
          -> paper fake-quant, running-statistics BN             BN statistics
          -> target-scheme fake-quant (the file's encodings)    scheme
          -> integer simulator (the file's integer arithmetic)  integer arithmetic
          -> runtime                                            kernel / platform

The total gap is runtime minus paper fake-quant; its parts telescope, so they add up to it
exactly. A stage that did not run (no integer simulator for ONNX files) merges its part into
the next link's, named as both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# (stage key, label, the part of the gap its incoming link measures); order is the chain's
CHAIN: tuple[tuple[str, str, str | None], ...] = (
    ("float", "float (BN folded)", None),
    ("paper", "paper fake-quant (batch BN)", "quantization (paper)"),
    ("paper_running", "paper fake-quant (running BN)", "BN statistics"),
    ("target", "target-scheme fake-quant", "scheme"),
    ("integer", "integer simulator", "integer arithmetic"),
    ("runtime", "runtime", "kernel / platform"),
)
GAP_START = "paper"  # the total gap is measured from the paper's simulation to the runtime
PARTS = tuple(part for key, _, part in CHAIN if part is not None and key != GAP_START)


@dataclass
class GapStep:
    stage: str
    label: str
    top1: float  # percent
    part: str | None  # the effect the link into this stage measures (None for the first)
    delta_pt: float | None  # top1 minus the previous stage's
    agreement: float | None  # percent of images whose label equals the previous stage's


@dataclass
class GapDecomposition:
    steps: list[GapStep]
    total_pt: float  # runtime top-1 minus paper fake-quant top-1
    parts: dict[str, float] = field(default_factory=dict)  # part -> points; sums to total_pt

    def to_dict(self) -> dict:
        return asdict(self)


def _top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float((np.asarray(logits).argmax(1) == labels).mean())


def decompose(stages: dict[str, np.ndarray | None], labels: np.ndarray) -> GapDecomposition:
    """``stages``: chain key -> logits (any grid: only labels are compared); None or absent = not run.

    The paper and runtime stages are required (they define the gap).
    """
    labels = np.asarray(labels)
    for key in (GAP_START, "runtime"):
        if stages.get(key) is None:
            raise ValueError(f"the gap chain needs the {key!r} stage")
    steps: list[GapStep] = []
    parts: dict[str, float] = {}
    pending: list[str] = []  # parts of skipped stages, merged into the next link
    prev_labels, prev_top1 = None, None
    for key, label, part in CHAIN:
        logits = stages.get(key)
        if logits is None:
            if part is not None:
                pending.append(part)
            continue
        pred = np.asarray(logits).argmax(1)
        if len(pred) != len(labels):
            raise ValueError(f"stage {key!r}: {len(pred)} outputs for {len(labels)} labels")
        top1 = _top1(logits, labels)
        name = " + ".join([*pending, part]) if part is not None else None
        pending = []
        delta = None if prev_top1 is None else top1 - prev_top1
        agreement = None if prev_labels is None else 100.0 * float((pred == prev_labels).mean())
        steps.append(GapStep(key, label, top1, name, delta, agreement))
        if delta is not None and key != GAP_START and any(s.stage == GAP_START for s in steps[:-1]):
            parts[name] = delta
        prev_labels, prev_top1 = pred, top1
    paper = next(s for s in steps if s.stage == GAP_START)
    total = steps[-1].top1 - paper.top1
    return GapDecomposition(steps, total, parts)


def largest_part(gap: dict) -> tuple[str, float] | None:
    """The part with the largest |points| of a decomposition (as a dict), or None if all are zero."""
    parts = gap.get("parts") or {}
    if not parts or not any(parts.values()):
        return None
    name = max(parts, key=lambda k: abs(parts[k]))
    return name, parts[name]


def plot_waterfall(rows: list[dict], path) -> None:
    """One panel per row with a gap: float, paper sim, then each part as a floating bar, then runtime."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from ghnq_deploy.io import atomic_write

    rows = [r for r in rows if r.get("gap")]
    fig, axes = plt.subplots(1, max(1, len(rows)), figsize=(5.2 * max(1, len(rows)), 4.2), squeeze=False)
    for ax, r in zip(axes[0], rows):
        steps = r["gap"]["steps"]
        names, bottoms, heights, colors = [], [], [], []
        for s in steps:
            if s["stage"] in ("float", GAP_START):
                names.append(s["label"].replace(" (", "\n("))
                bottoms.append(0.0)
                heights.append(s["top1"])
                colors.append("#4c72b0")
                continue
            d = s["delta_pt"] or 0.0
            names.append(s["part"].replace(" + ", " +\n"))
            bottoms.append(s["top1"] - d if d >= 0 else s["top1"])
            heights.append(abs(d))
            colors.append("#55a868" if d >= 0 else "#c44e52")
        names.append("runtime")
        bottoms.append(0.0)
        heights.append(steps[-1]["top1"])
        colors.append("#4c72b0")
        ax.bar(range(len(names)), heights, bottom=bottoms, color=colors)
        for i, s in enumerate(steps):
            if s["stage"] in ("float", GAP_START):
                continue
            d = s["delta_pt"] or 0.0
            ax.annotate(f"{d:+.2f}", (i, bottoms[i] + heights[i]), ha="center", va="bottom", fontsize=7)
        tops = [b + h for b, h in zip(bottoms, heights)]
        parts = [h for h, s in zip(heights, steps) if s["stage"] not in ("float", GAP_START)]
        lo = max(0.0, min(s["top1"] for s in steps) - 3 * max(1.0, max(parts, default=1.0)))
        ax.set_ylim(lo, min(100.0, max(tops) + 2))
        ax.set_xticks(range(len(names)), names, fontsize=6.5, rotation=30, ha="right")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{r['target']} {r['bits']}: gap {r['gap']['total_pt']:+.2f} pt (runtime - paper sim)",
                     fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
