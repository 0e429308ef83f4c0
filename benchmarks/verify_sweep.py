"""sim vs real across many nets: every example arch plus seeded sampled nets from every split.

For each net: predict it with the shipped GHN-Q, let ``verify`` export what is missing, and verify
it on the host targets (default: x86-litert = XNNPACK, litert-ref = BUILTIN_REF) at W8A8 and
W4A8 on the shipped 2,000-image evaluation set. Prints one table row per (net, target, bits):
target-sim and real top-1, Δ, logits within one output step, label agreement, clear-margin
agreement and ties; and writes the rows as JSON and a markdown table.

    python benchmarks/verify_sweep.py -o docs/results/verify-sweep            # 5 examples + 10 sampled
    python benchmarks/verify_sweep.py --sampled 2 --no-examples --images 200  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (split, how many) for --sampled 10; scaled down proportionally for fewer
SPLIT_MIX = (("id-test", 4), ("ood-deep", 1), ("ood-wide", 1), ("ood-bnfree", 2), ("ood-mobilenet", 2))


def sampled_specs(count: int, seed: int, space: int) -> list:
    from ghnq_deploy.arch.sampler import sample_split

    plan: list[tuple[str, int]] = []
    remaining = count
    for split, n in SPLIT_MIX:
        take = min(remaining, max(1, round(n * count / 10))) if remaining else 0
        plan.append((split, take))
        remaining -= take
    if remaining > 0:
        plan[0] = (plan[0][0], plan[0][1] + remaining)
    specs = []
    for split, n in plan:
        if n:
            specs += sample_split(split, n, seed, space=space)
    return specs


def row_summary(net: str, row: dict) -> dict:
    s = row["sim_vs_real"]
    return {"net": net, "target": row["target"], "bits": row["bits"], "float": row["float_top1"],
            "target_sim": row["target_sim_top1"], "real": row["real_top1"], "delta": row["delta_top1_pt"],
            "within_one_step": 100.0 * s["within_one_step"], "agreement": s["agreement"],
            "clear_margin_agreement": s["clear_margin_agreement"], "exact_ties": s["exact_ties"],
            "near_ties": s["near_ties"], "max_step_diff": s["max_step_diff"],
            "encodings": row.get("target_sim_encodings", "")}


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| net | target | bits | float | target sim | real | Δ pt | logits ≤1 step | agreement "
             "| clear-margin agr. | exact / near ties | max steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cm = "n/a" if r["clear_margin_agreement"] is None else f"{r['clear_margin_agreement']:.1f} %"
        lines.append(f"| {r['net']} | {r['target']} | {r['bits']} | {r['float']:.2f} | {r['target_sim']:.2f} | "
                     f"{r['real']:.2f} | {r['delta']:+.2f} | {r['within_one_step']:.2f} % | {r['agreement']:.1f} % | "
                     f"{cm} | {r['exact_ties']:.1f} / {r['near_ties']:.1f} % | {r['max_step_diff']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--sampled", type=int, default=10, help="sampled nets, spread over the splits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--space", type=int, default=1, help="sampler space (1: the shipped checkpoint's nets)")
    parser.add_argument("--no-examples", action="store_true")
    parser.add_argument("-d", "--device", action="append", default=None)
    parser.add_argument("--bits", default="w8a8,w4a8")
    parser.add_argument("-o", "--output", type=Path, default=None, help="folder for sweep.json and sweep.md")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from ghnq_deploy.arch.spec import save_spec
    from ghnq_deploy.verify.pipeline import VerifyConfig, verify
    from ghnq_deploy.verify.target import get_target

    devices = args.device or ["x86-litert", "litert-ref"]
    targets = [get_target(d) for d in devices]
    specs = sampled_specs(args.sampled, args.seed, args.space) if args.sampled else []
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as ws:
        archs = Path(ws) / "archs"
        archs.mkdir()
        for spec in specs:
            save_spec(spec, archs / f"{spec.name}.json")
        if not args.no_examples:
            for f in sorted((ROOT / "examples").glob("*.json")):
                (archs / f.name).write_bytes(f.read_bytes())
        env = {**os.environ, "GHNQ_WORKSPACE": ws, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "ghnq_deploy", "predict", str(archs)], env=env,
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"predict failed: {done.stderr.strip()}")
        os.environ["GHNQ_WORKSPACE"] = ws
        for model in sorted(Path(ws).glob("*/model.pt")):
            net = model.parent.name
            t0 = time.perf_counter()
            report, err = verify(model, targets, VerifyConfig(devices=devices, bits=args.bits.split(","),
                                                              limit_images=args.images, timing_runs=5))
            if err is not None:
                print(f"{net}: device error: {err}", file=sys.stderr)
            for row in report["rows"]:
                if row.get("real") and "sim_vs_real" in row:
                    r = row_summary(net, row)
                    rows.append(r)
                    print(f"{net:28s} {r['target']:12s} {r['bits']:5s} sim {r['target_sim']:6.2f} real "
                          f"{r['real']:6.2f} Δ {r['delta']:+5.2f} ≤1step {r['within_one_step']:6.2f}% "
                          f"agr {r['agreement']:5.1f}% clear {r['clear_margin_agreement']}", flush=True)
            print(f"  ({net}: {time.perf_counter() - t0:.0f} s)", flush=True)
            write(args, rows, devices, started)  # after every net: a long sweep keeps what it finished
    print(write(args, rows, devices, started))


def write(args, rows: list[dict], devices: list[str], started: float) -> str:
    header = (f"verify sweep: {len({r['net'] for r in rows})} nets, {args.images} images of the shipped evaluation set "
              f"(CIFAR-10 test (JPEG copy)), targets {', '.join(devices)}, bits {args.bits}, "
              f"{os.cpu_count()} CPUs, {time.perf_counter() - started:.0f} s")
    if args.output:
        from ghnq_deploy.io import atomic_write_text

        args.output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output / "sweep.json", json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
        atomic_write_text(args.output / "sweep.md", markdown(rows, header))
    return header


if __name__ == "__main__":
    main()
