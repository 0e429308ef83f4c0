"""GHN-Q Table 1: rows bit-widths, columns splits, cells ``mean ± SEM; max`` (percent).

The table is plain data (:class:`Table1`) built from an evaluation's aggregates; the
renderers (rich, markdown) and writers (JSON with every number and the exact
configuration, per-network CSV, PNG plot) only read it. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from ghnq_deploy.io import atomic_write_text
from ghnq_deploy.report.evaluate import Aggregate, EvalReport

SPLIT_LABELS = {"id-test": "ID Test", "ood-deep": "OOD Deep", "ood-wide": "OOD Wide", "ood-bnfree": "BN-Free",
                "ood-mobilenet": "OOD MobileNet", "id-train": "ID Train", "files": "Files"}
METRICS = (("top1", "Top-1 accuracy (%)"), ("top5", "Top-5 accuracy (%)"))


def bits_label(bits: str) -> str:
    """"fp32" -> "Float32", "w4a8" -> "W4/A8" (the paper's row names)."""
    if bits == "fp32":
        return "Float32"
    w, _, a = bits[1:].partition("a")
    return f"W{w}/A{a}"


def split_label(split: str) -> str:
    return SPLIT_LABELS.get(split, split)


@dataclass(frozen=True)
class Cell:
    mean: float
    sem: float | None  # None when n < 2
    max: float
    n: int

    def text(self, digits: int = 1) -> str:
        sem = "n/a" if self.sem is None else f"{self.sem:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {sem}; {self.max:.{digits}f}"


@dataclass
class Table1:
    splits: list[str]
    bits: list[str]
    cells: dict[str, dict[str, dict[str, Cell]]] = field(default_factory=dict)  # metric -> bits -> split
    nets: dict[str, int] = field(default_factory=dict)  # split -> networks

    def cell(self, metric: str, bits: str, split: str) -> Cell | None:
        return self.cells.get(metric, {}).get(bits, {}).get(split)

    def to_dict(self) -> dict:
        return {"splits": self.splits, "bits": self.bits, "nets": self.nets,
                "cells": {m: {b: {s: vars(c) for s, c in row.items()} for b, row in rows.items()}
                          for m, rows in self.cells.items()}}


def build_table1(aggregates: list[Aggregate]) -> Table1:
    """Arrange per-(split, bits) aggregates into the paper's layout, keeping their order."""
    splits: list[str] = []
    bits: list[str] = []
    table = Table1(splits, bits, {m: {} for m, _ in METRICS})
    for a in aggregates:
        if a.split not in splits:
            splits.append(a.split)
        if a.bits not in bits:
            bits.append(a.bits)
        table.nets[a.split] = a.n
        table.cells["top1"].setdefault(a.bits, {})[a.split] = Cell(a.top1_mean, a.top1_sem, a.top1_max, a.n)
        table.cells["top5"].setdefault(a.bits, {})[a.split] = Cell(a.top5_mean, a.top5_sem, a.top5_max, a.n)
    return table


def table1_from_report(report: EvalReport) -> Table1:
    return build_table1(report.aggregates())


# ----------------------------------------------------------------------------- renderers


def render_rich(table: Table1, title: str | None = None) -> Table:
    """A rich table: one section per metric, rows bit-widths, columns splits."""
    out = Table(title=title or "GHN-Q Table 1 (mean ± SEM; max, %)", show_lines=False)
    out.add_column("Bit-width", style="bold")
    for s in table.splits:
        out.add_column(f"{split_label(s)} (n={table.nets.get(s, 0)})", justify="right")
    for metric, label in METRICS:
        out.add_section()
        out.add_row(f"[italic]{label}[/]", *[""] * len(table.splits))
        for b in table.bits:
            cells = [table.cell(metric, b, s) for s in table.splits]
            out.add_row(bits_label(b), *[c.text() if c else "-" for c in cells])
    return out


def render_markdown(table: Table1) -> str:
    """GitHub markdown, one table per metric, the paper's cell format."""
    lines: list[str] = []
    head = "| " + " | ".join([""] + [f"{split_label(s)} (n={table.nets.get(s, 0)})" for s in table.splits]) + " |"
    rule = "|" + "|".join(["---"] + ["---:"] * len(table.splits)) + "|"
    for metric, label in METRICS:
        lines += [f"**{label}** (mean ± SEM; max)", "", head, rule]
        for b in table.bits:
            cells = [table.cell(metric, b, s) for s in table.splits]
            lines.append("| " + " | ".join([bits_label(b)] + [c.text() if c else "-" for c in cells]) + " |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- writers


def _finite(value: Any) -> Any:
    """JSON has no NaN / Infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def report_json(report: EvalReport) -> str:
    data = report.to_dict()
    data["table1"] = table1_from_report(report).to_dict()
    return json.dumps(_finite(data), indent=1, allow_nan=False, default=str) + "\n"


CSV_COLUMNS = ("split", "name", "spec_sha256", "params", "macs", "images", "bits", "top1", "top5", "float_top1",
               "float_top5", "drop_top1", "drop_top5", "logits_mse", "top1_agreement", "weight_absmax",
               "max_channel_range_spread")


def report_csv(report: EvalReport) -> str:
    """One row per (network, bit-width)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for n in report.nets:
        absmax = max((layer.absmax for layer in n.layers), default=math.nan)
        spread = max((layer.channel_range_spread for layer in n.layers), default=math.nan)
        for b, r in n.bits.items():
            writer.writerow([n.split, n.name, n.spec_sha256, n.params, n.macs, n.images, b, f"{r.top1:.4f}",
                             f"{r.top5:.4f}", f"{n.float_top1:.4f}", f"{n.float_top5:.4f}", f"{r.drop_top1:.4f}",
                             f"{r.drop_top5:.4f}", f"{r.logits_mse:.6g}", f"{r.top1_agreement:.4f}",
                             f"{absmax:.6g}", f"{spread:.6g}"])
    return buf.getvalue()


def write_outputs(report: EvalReport, out_dir: str | Path) -> dict[str, Path]:
    """evaluation.json, per_network.csv, table1.md and accuracy_vs_bits.png in ``out_dir``."""
    from ghnq_deploy.report.plot import plot_accuracy

    out = Path(out_dir)
    table = table1_from_report(report)
    paths = {"json": out / "evaluation.json", "csv": out / "per_network.csv", "markdown": out / "table1.md",
             "png": out / "accuracy_vs_bits.png"}
    atomic_write_text(paths["json"], report_json(report))
    atomic_write_text(paths["csv"], report_csv(report))
    atomic_write_text(paths["markdown"], render_markdown(table))
    plot_accuracy(table, paths["png"], title=f"GHN-Q, scheme '{report.config.scheme}', {report.data.get('images')} "
                                              f"test images")
    return paths
