"""Time to accuracy: fine-tuning from GHN-Q's prediction vs from the builder's random init.

For each net and bit-width, the same recipe and seed run from both starts (``finetune
--init ghn`` and ``--init random``) under budgets of 1, 5 and 15 minutes (default). A step
costs the same from either start (same net, same arithmetic), so on a shared machine whose
speed drifts the budgets are turned into steps once per net and bit-width, from the measured
seconds per training step of a short timed run, and both starts get exactly those steps: the
same schedule, the same compute.
Reported, from the longest budget's validation log: steps and training seconds until the
held-out validation top-1 (deployed form: tflite-int8 with calibrated BN and ranges) first
reaches the GHN init's own accuracy, 60 %, 70 % and 80 %; and the accuracy each start reaches
at every budget. The ratio printed is random-init steps / GHN-init steps to each level (the
baseline, random init, runs in the same process).

Runs already finished in ``--output`` are reused (the script can be stopped and re-run);
one killed midway is resumed exactly.

    python benchmarks/finetune_time_to_accuracy.py --nets resnet20 --bits w8a8 --budgets 1,5,15
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ghnq_deploy.arch.sampler import sample_arch, space_for  # noqa: E402
from ghnq_deploy.arch.spec import load_spec  # noqa: E402
from ghnq_deploy.finetune.loop import FinetuneConfig, finetune, read_log  # noqa: E402

PROBE_STEPS = 8
from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint  # noqa: E402
from ghnq_deploy.ghn.predict import predict, save_predicted  # noqa: E402

EXAMPLES = {"resnet20": "resnet20.json", "mobilenetv2": "mobilenetv2_cifar.json", "bnfree": "bnfree_cnn.json"}


def specs(names: list[str], space: int):
    for name in names:
        if name in EXAMPLES:
            yield name, load_spec(ROOT / "examples" / EXAMPLES[name])
        elif name.startswith("idtest"):
            yield name, sample_arch("id-test", 0, int(name[len("idtest"):]), space=space)
        else:
            raise SystemExit(f"unknown net {name!r}: {', '.join(EXAMPLES)} or idtestK")


def reach(log: list[dict], level: float) -> tuple[int, float] | None:
    """(steps, training seconds) of the first validation at or above ``level``."""
    for r in log:
        if r.get("event") == "val" and r["val_top1"] >= level:
            return r["step"], r["train_seconds"]
    return None


def seconds_per_step(model_file: Path, out: Path, bits: str, args) -> float:
    """Training seconds per step of this net at ``bits`` (a short timed run; validation excluded)."""
    marker = out / "seconds_per_step.json"
    if marker.exists():
        return json.loads(marker.read_text())["seconds_per_step"]
    cfg = FinetuneConfig(model=str(model_file), out_dir=str(out), data=args.data, bits=bits, scheme=args.scheme,
                         steps=PROBE_STEPS + 2, seed=args.seed, val_every=10**6, val_count=100, log_every=1,
                         float_fraction=args.float_fraction)
    result = finetune(cfg)
    log = read_log(result.log_file)
    at = {r["step"]: r["train_seconds"] for r in log if r.get("event") == "train"}
    value = (result.train_seconds - at.get(2, 0.0)) / PROBE_STEPS  # the first two steps warm up
    marker.write_text(json.dumps({"seconds_per_step": value, "steps_timed": PROBE_STEPS}) + "\n")
    return value


def run_one(model_file: Path, out: Path, bits: str, init: str, steps: int, args) -> dict:
    cfg = FinetuneConfig(model=str(model_file), out_dir=str(out), data=args.data, bits=bits, scheme=args.scheme,
                         steps=steps, init=init, seed=args.seed, val_every=args.val_every, val_count=args.val_count,
                         log_every=1, lr=args.lr, grad_clip=args.grad_clip, float_fraction=args.float_fraction)
    if not (out / "model.pt").exists():
        finetune(cfg, resume=(out / "state.pt").exists())
    log = read_log(out / "finetune_log.jsonl")
    vals = [r for r in log if r.get("event") == "val"]
    trains = [r for r in log if r.get("event") == "train"]
    return {"init": init, "steps": trains[-1]["step"] if trains else 0,
            "start_top1": vals[0]["val_top1"], "final_top1": vals[-1]["val_top1"],
            "train_seconds": trains[-1]["train_seconds"] if trains else 0.0, "log": log}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nets", default="resnet20", help="comma list: resnet20, mobilenetv2, bnfree, idtest0, ...")
    p.add_argument("--bits", default="w8a8", help="comma list of bit-widths")
    p.add_argument("--budgets", default="1,5,15", help="comma list of minutes")
    p.add_argument("--steps", default=None, help="comma list of step budgets instead of --budgets (no timing run)")
    p.add_argument("--lr", type=float, default=FinetuneConfig.lr, help="peak rate of the one-cycle schedule, every start")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the global gradient norm, every start")
    p.add_argument("--inits", default=f"{FinetuneConfig.init},random")
    p.add_argument("--float-fraction", type=float, default=FinetuneConfig.float_fraction,
                   help="first fraction of each run in float (the timed run has the same phases)")
    p.add_argument("--scheme", default="tflite-int8")
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--data", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--val-count", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results/finetune"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ghn, info = load_ghn_checkpoint(args.checkpoint)
    space = space_for(ghn.config.num_primitives)
    budgets = [float(b) for b in (args.steps or args.budgets).split(",")]
    unit = "steps" if args.steps else "min"
    inits = args.inits.split(",")
    results = []
    for name, spec in specs(args.nets.split(","), space):
        folder = args.output / name
        model_file = folder / "prediction.pt"
        if not model_file.exists():
            folder.mkdir(parents=True, exist_ok=True)
            save_predicted(model_file, predict(ghn, [spec], ghn_info=info)[0])
        for bits in args.bits.split(","):
            if args.steps:
                per_step, steps = None, {m: int(m) for m in budgets}
            else:
                per_step = seconds_per_step(model_file, folder / bits / "timing", bits, args)
                steps = {m: max(1, round(m * 60 / per_step)) for m in budgets}
            runs = {(init, m): run_one(model_file, folder / bits / f"{init}-{m:g}{unit}", bits, init, steps[m], args)
                    for m in budgets for init in inits}
            longest = max(budgets)
            ghn_start = runs[("ghn", longest)]["start_top1"] if "ghn" in inits else None
            levels = {"ghn_init": ghn_start, "60%": 0.60, "70%": 0.70, "80%": 0.80}
            row = {"net": name, "bits": bits, "longest_budget": f"{longest:g}{unit}", "seconds_per_step": per_step,
                   "budget_steps": {f"{m:g}{unit}": steps[m] for m in budgets}, "lr": args.lr, "reach": {},
                   "budget_top1": {}}
            for init in inits:
                log = runs[(init, longest)]["log"]
                row["reach"][init] = {k: reach(log, v) if v is not None else None for k, v in levels.items()}
                row["budget_top1"][init] = {f"{m:g}{unit}": {"top1": runs[(init, m)]["final_top1"],
                                                          "steps": runs[(init, m)]["steps"]} for m in budgets}
                row.setdefault("start_top1", {})[init] = runs[(init, longest)]["start_top1"]
            results.append(row)
            print_row(row, levels)
    out = args.output / "summary.json"
    out.write_text(json.dumps({"checkpoint": info["path"], "scheme": args.scheme, "seed": args.seed,
                               "threads": args.threads, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


def print_row(row: dict, levels: dict) -> None:
    speed = "" if row["seconds_per_step"] is None else f"{row['seconds_per_step']:.2f} s per step, "
    print(f"\n{row['net']} {row['bits']} (peak lr {row['lr']:g}): {speed}budgets {row['budget_steps']} "
          f"(steps / training s to reach, in the {row['longest_budget']} run)")
    for init, reached in row["reach"].items():
        cells = []
        for k in levels:
            r = reached[k]
            cells.append(f"{k}: " + ("not reached" if r is None else f"{r[0]} steps / {r[1]:.0f} s"))
        print(f"  {init:>7} start {row['start_top1'][init]:.1%}; " + "; ".join(cells))
    if {"ghn", "random"} <= set(row["reach"]):
        for k in levels:
            g, r = row["reach"]["ghn"][k], row["reach"]["random"][k]
            if k == "ghn_init":  # the GHN run starts there: the saving is the random run's steps
                print(f"  random init needs {r[0]} steps / {r[1]:.0f} s to reach the GHN init's accuracy" if r
                      else "  random init does not reach the GHN init's accuracy in this budget")
            elif g and r:
                print(f"  ratio random/ghn steps to {k}: {r[0] / max(1, g[0]):.2f}x")
            else:
                print(f"  ratio random/ghn steps to {k}: n/a (ghn {'reached' if g else 'not reached'}, "
                      f"random {'reached' if r else 'not reached'})")
    for init, b in row["budget_top1"].items():
        print(f"  {init:>7} top-1 at budgets: " + ", ".join(f"{m}: {v['top1']:.1%} ({v['steps']} steps)"
                                                          for m, v in b.items()))


if __name__ == "__main__":
    main()
