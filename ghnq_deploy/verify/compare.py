"""Simulated vs real outputs, measured in output quantization steps.

Label agreement alone misleads on int8 outputs: many images have their top two int8 logits
equal (the label is then the argmax tie-break) or within one step. So next to agreement this
reports exact ties, near ties (within one step) and agreement on the images with a clear
margin, plus the per-logit difference in steps (max, mean, histogram).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

HIST_BINS = ("0", "1", "2", "3", ">3")


def _hist(steps: np.ndarray) -> dict[str, float]:
    steps = np.asarray(steps)
    counts = [(steps == k).sum() for k in range(4)] + [(steps > 3).sum()]
    return {b: float(c) / max(1, steps.size) for b, c in zip(HIST_BINS, counts)}


def top_two_margin(q: np.ndarray) -> np.ndarray:
    """Per image: the gap between the largest and second-largest output (in the array's units)."""
    part = np.sort(np.asarray(q, np.float64), axis=1)
    return part[:, -1] - part[:, -2]


@dataclass
class Comparison:
    """``reference`` (a simulation) against ``real`` (the runtime), both on the output step grid."""

    images: int
    reference_top1: float  # percent
    real_top1: float
    delta_top1_pt: float  # real - reference, points
    agreement: float  # percent of images with the same label
    max_step_diff: float
    mean_step_diff: float
    within_one_step: float  # share of logits within one output step
    step_histogram: dict[str, float]  # share of logits by |difference| in steps
    exact_ties: float  # percent of images whose real top two outputs are equal
    near_ties: float  # percent whose real top two are within one step
    clear_margin_images: int
    clear_margin_agreement: float | None  # percent, on images with a real margin above one step

    def to_dict(self) -> dict:
        return asdict(self)


def compare(reference_steps: np.ndarray, real_steps: np.ndarray, labels: np.ndarray) -> Comparison:
    """Both inputs are outputs divided by the output scale (integers for int8 files, reals for float)."""
    ref = np.asarray(reference_steps, np.float64)
    real = np.asarray(real_steps, np.float64)
    labels = np.asarray(labels)
    if ref.shape != real.shape or len(ref) != len(labels) or not len(labels):
        raise ValueError(f"shapes differ: reference {ref.shape}, real {real.shape}, labels {labels.shape}")
    diff = np.abs(ref - real)
    rounded = np.round(diff)
    ref_label, real_label = ref.argmax(1), real.argmax(1)
    margin = top_two_margin(real)
    clear = margin > 1 + 1e-9
    ref_top1 = 100.0 * float((ref_label == labels).mean())
    real_top1 = 100.0 * float((real_label == labels).mean())
    return Comparison(
        images=len(labels), reference_top1=ref_top1, real_top1=real_top1, delta_top1_pt=real_top1 - ref_top1,
        agreement=100.0 * float((ref_label == real_label).mean()),
        max_step_diff=float(diff.max()), mean_step_diff=float(diff.mean()),
        within_one_step=float((diff <= 1 + 1e-9).mean()), step_histogram=_hist(rounded),
        exact_ties=100.0 * float((margin == 0).mean()), near_ties=100.0 * float((margin <= 1 + 1e-9).mean()),
        clear_margin_images=int(clear.sum()),
        clear_margin_agreement=100.0 * float((ref_label[clear] == real_label[clear]).mean()) if clear.any() else None)


def to_steps(logits: np.ndarray, scale: float, zero_point: int, quantize: bool) -> np.ndarray:
    """Float logits on the output grid: ``logits / scale + zero_point``, rounded (half away) if ``quantize``."""
    v = np.asarray(logits, np.float64) / scale + zero_point
    if quantize:
        v = np.clip(np.trunc(v + np.copysign(0.5, v)), -128, 127)
    return v


def latency_summary(latency_ms: np.ndarray) -> dict:
    lat = np.asarray(latency_ms, np.float64)
    if not lat.size:
        return {"runs": 0, "p50_ms": None, "p90_ms": None, "mean_ms": None}
    return {"runs": int(lat.size), "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "mean_ms": float(lat.mean())}
