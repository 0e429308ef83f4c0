"""Equal-step comparison of two training runs that differ only in --precision (same seed).

Run: python benchmarks/train_precision_compare.py RUN_A RUN_B [--upto 100] [--nets 10] [--images 1024]
     [-o summary.json]

Both runs draw the same nets and images at every step (a pure function of (seed, step)), so
their training losses pair up step by step. Prints, per block of steps, the mean raw loss of
each and the mean paired difference, the seconds per step, and the held-out loss / top-1 of
each run's last.pt on fixed unseen nets (``id-test`` split) and the held-out 5,000 validation
images, evaluated in float32 with batch-statistics BatchNorm, batches of 64 (the paper protocol).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ghnq_deploy.arch.builder import ArchNet
from ghnq_deploy.arch.sampler import sample_arch
from ghnq_deploy.data import load_cifar10, normalize
from ghnq_deploy.ghn.graph import build_graph
from ghnq_deploy.ghn.model import GHNQ, GHNConfig


def _log(run: Path, upto: int) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line]
    return {r["step"]: r for r in rows if r["step"] <= upto}


def held_out(run: Path, nets: int, images: int, space: int) -> dict:
    """Mean loss and top-1 of the run's last.pt on ``nets`` id-test nets x ``images`` val images."""
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    ghn = GHNQ(GHNConfig.from_checkpoint(state["ghn"]["config"]))
    ghn.load_state_dict(state["ghn"]["state_dict"])
    ghn.eval()
    val = load_cifar10("val").subset(images)
    x, y = normalize(val.images), torch.from_numpy(val.labels)
    specs = [sample_arch("id-test", 0, k, space=space) for k in range(nets)]
    losses, accs = [], []
    with torch.no_grad():
        params = ghn.predict_params([build_graph(s, s_max=ghn.config.s_max) for s in specs])
        for p, spec in zip(params, specs):
            with torch.device("meta"):
                net = ArchNet(spec, bn_running_stats=False)
            logits = torch.cat([torch.func.functional_call(net, p, (x[i:i + 64],)) for i in range(0, len(y), 64)])
            losses.append(float(F.cross_entropy(logits, y)))
            accs.append(float((logits.argmax(1) == y).float().mean()))
    return {"step": state["step"], "loss": float(np.mean(losses)), "top1": float(np.mean(accs)),
            "top1_sem": float(np.std(accs, ddof=1) / np.sqrt(len(accs))), "nets": nets, "images": images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs=2, type=Path)
    parser.add_argument("--upto", type=int, default=200, help="compare steps 1..UPTO")
    parser.add_argument("--block", type=int, default=25)
    parser.add_argument("--nets", type=int, default=10)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--output", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    a_run, b_run = args.runs
    a, b = _log(a_run, args.upto), _log(b_run, args.upto)
    steps = sorted(set(a) & set(b))
    name = {run: (_log(run, args.upto)[steps[0]].get("precision", "fp32")) for run in args.runs}
    print(f"A = {a_run} ({name[a_run]}), B = {b_run} ({name[b_run]}); paired logged steps: {len(steps)}")
    blocks = []
    print(f"{'steps':>9s} {'A loss':>8s} {'B loss':>8s} {'B - A':>8s} {'A s/step':>9s} {'B s/step':>9s}")
    for lo in range(0, args.upto, args.block):
        sel = [s for s in steps if lo < s <= lo + args.block]
        if not sel:
            continue
        row = {"steps": f"{lo + 1}-{lo + args.block}",
               "a_loss": statistics.mean(a[s]["raw_loss"] for s in sel),
               "b_loss": statistics.mean(b[s]["raw_loss"] for s in sel),
               "a_seconds": statistics.median(a[s]["seconds"] for s in sel),
               "b_seconds": statistics.median(b[s]["seconds"] for s in sel)}
        row["diff"] = row["b_loss"] - row["a_loss"]
        blocks.append(row)
        print(f"{row['steps']:>9s} {row['a_loss']:8.4f} {row['b_loss']:8.4f} {row['diff']:+8.4f} "
              f"{row['a_seconds']:9.2f} {row['b_seconds']:9.2f}")
    diffs = np.array([b[s]["raw_loss"] - a[s]["raw_loss"] for s in steps])
    print(f"paired B - A over {len(diffs)} logged steps: mean {diffs.mean():+.4f} "
          f"(SEM {diffs.std(ddof=1) / np.sqrt(len(diffs)):.4f})")
    space = json.loads((a_run / "train_config.json").read_text()).get("space", 2)
    evals = {}
    for run in args.runs:
        evals[str(run)] = held_out(run, args.nets, args.images, space)
        e = evals[str(run)]
        print(f"held out ({name[run]}, last.pt step {e['step']}): loss {e['loss']:.4f}, "
              f"top-1 {100 * e['top1']:.2f} % +- {100 * e['top1_sem']:.2f} ({e['nets']} id-test nets x "
              f"{e['images']} val images)")
    if args.output:
        args.output.write_text(json.dumps({"runs": {str(r): name[r] for r in args.runs}, "blocks": blocks,
                                           "paired_diff_mean": float(diffs.mean()),
                                           "paired_diff_sem": float(diffs.std(ddof=1) / np.sqrt(len(diffs))),
                                           "held_out": evals}, indent=1))


if __name__ == "__main__":
    main()
