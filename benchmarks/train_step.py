"""GHN-Q meta-training step on CPU: each speed change as a same-process ratio against today's step.

Run: OMP_NUM_THREADS=1 python benchmarks/train_step.py [--steps 4] [--threads 1] [--blocks 2]

"today" is the step as train.py ran it before issue 12's changes (module tree on the meta
device + torch.func.functional_call, NCHW, float32, inputs prepared in the loop, glibc's
default malloc). Every variant is a whole step (sample, graph build, GHN forward, nets
forward, backward, clip, Adam) on its own copy of the same fresh GHN, and the variants run
interleaved step by step, so the machine's load moves them alike. Prefetching and the
allocator setting act across steps and on the whole process, so they are timed in
alternating blocks of consecutive steps instead. Prints medians, ratios to "today" and
steps per hour, and the parts of today's and the new step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ghnq_deploy.arch.builder import ArchNet
from ghnq_deploy.arch.functional import ForwardOptions, run_with_params
from ghnq_deploy.data import load_cifar10
from ghnq_deploy.ghn.allocator import keep_freed_memory
from ghnq_deploy.ghn.graph import build_graph
from ghnq_deploy.ghn.precision import native_bf16, net_autocast
from ghnq_deploy.ghn.prefetch import Prefetcher
from ghnq_deploy.ghn.train import MetaBatchSource, TrainConfig, make_ghn, prepare_step, step_loss

PARTS = ("inputs", "ghn", "nets", "backward", "adam")


class Trainer:
    """One GHN copy + Adam; ``step`` runs a whole training step and returns its parts' seconds."""

    def __init__(self, ghn, cfg: TrainConfig, source: MetaBatchSource, nets: Callable | None, precision: str):
        self.ghn, self.cfg, self.source, self.nets, self.precision = ghn, cfg, source, nets, precision
        self.optimizer = torch.optim.Adam(ghn.parameters(), lr=cfg.lr)

    def step(self, step: int, inputs=None) -> dict[str, float]:
        t = [time.perf_counter()]
        if self.nets is None:  # the new path: train.py's own functions
            inputs = inputs if inputs is not None else prepare_step(self.source, step, self.ghn.config.s_max)
            t.append(time.perf_counter())
            loss, _, _ = step_loss(self.ghn.predict_params, inputs, self.cfg, "paper", self.precision)
            t += [t[-1], time.perf_counter()]  # GHN and nets not separable here
        else:
            specs, x, y, _ = self.source(step)
            graphs = [build_graph(s, s_max=self.ghn.config.s_max) for s in specs]
            t.append(time.perf_counter())
            params = self.ghn.predict_params(graphs)
            t.append(time.perf_counter())
            loss = sum(self.nets(p, s, x, y) for p, s in zip(params, specs)) / len(specs)
            t.append(time.perf_counter())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(self.ghn.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        t.append(time.perf_counter())
        return {**{k: b - a for k, a, b in zip(PARTS, t, t[1:])}, "step": t[-1] - t[0]}


def today_nets(p, spec, x, y) -> torch.Tensor:
    """The nets' loss as train.py computed it before issue 12."""
    with torch.device("meta"):
        net = ArchNet(spec, bn_running_stats=False)
    return F.cross_entropy(torch.func.functional_call(net, p, (x,)), y)


def functional_nets(options: ForwardOptions, precision: str = "fp32") -> Callable:
    def nets(p, spec, x, y) -> torch.Tensor:
        with torch.device("meta"):
            net = ArchNet(spec, bn_running_stats=False)
        with net_autocast(precision):
            logits = run_with_params(net, p, x, options)
        return F.cross_entropy(logits.float(), y)
    return nets


def _median(rows: list[dict[str, float]], key: str = "step") -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant (after 1 warm-up)")
    parser.add_argument("--blocks", type=int, default=2, help="alternating blocks per side for prefetch / allocator")
    parser.add_argument("--block-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory(False)
    cfg = TrainConfig(meta_batch=args.meta_batch, batch_size=args.batch_size)
    source = MetaBatchSource(cfg, load_cifar10("train", args.data).subset(4096))
    fresh = make_ghn(cfg).train()
    bf16 = "bf16" if native_bf16() else None
    variants: dict[str, tuple[Callable | None, str]] = {
        "today": (today_nets, "fp32"),
        "functional forward": (functional_nets(ForwardOptions()), "fp32"),
        "+ channels_last": (functional_nets(ForwardOptions(channels_last=True)), "fp32"),
    }
    if bf16:
        variants["+ bf16 (depthwise bf16 too)"] = (functional_nets(ForwardOptions(channels_last=True), bf16), bf16)
        variants["+ bf16, depthwise fp32"] = (functional_nets(ForwardOptions(True, True), bf16), bf16)
    trainers = {name: Trainer(copy.deepcopy(fresh), cfg, source, nets, prec) for name, (nets, prec) in variants.items()}
    new_precision = bf16 or "fp32"
    trainers["new step (train.py)"] = Trainer(copy.deepcopy(fresh), cfg, source, None, new_precision)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in trainers}
    names = list(trainers)
    for i, step in enumerate(range(args.steps + 1)):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate who runs first
        for name in order:
            r = trainers[name].step(step)
            if i:  # the first step warms up
                rows[name].append(r)

    # prefetch and allocator: alternating blocks of consecutive steps of the new step
    blocks: dict[str, list[dict[str, float]]] = {k: [] for k in ("today", "new, no prefetch", "new + prefetch",
                                                                   "new + prefetch + keep-freed malloc")}
    trainer = trainers["new step (train.py)"]
    step = 1000
    for _ in range(args.blocks):
        for name in blocks:
            keep_freed_memory(name.endswith("malloc"))
            end = step + args.block_steps
            if name == "today":
                for s in range(step, end):
                    blocks[name].append(trainers["today"].step(s))
            elif "prefetch" in name:
                with Prefetcher(lambda s: prepare_step(source, s, trainer.ghn.config.s_max), step, end) as ahead:
                    for s in range(step, end):
                        t0 = time.perf_counter()
                        trainer.step(s, ahead.get(s))
                        blocks[name].append({"step": time.perf_counter() - t0})
            else:
                for s in range(step, end):
                    blocks[name].append(trainer.step(s))
            step = end
    keep_freed_memory(False)

    base = _median(rows["today"])
    print(f"threads={args.threads} meta-batch={args.meta_batch} batch={args.batch_size} steps={args.steps} "
          f"native bf16={native_bf16()} (new step runs {new_precision})")
    print(f"{'variant':38s} {'s/step':>8s} {'x today':>8s} {'steps/h':>8s}")
    for name, r in rows.items():
        m = _median(r)
        print(f"{name:38s} {m:8.3f} {base / m:8.2f} {3600 / m:8.0f}")
    block_today, block_base = _median(blocks["today"]), _median(blocks["new, no prefetch"])
    print(f"alternating blocks of {args.block_steps} consecutive steps x {args.blocks} "
          "(ratios: to the 'today' blocks / to the blocks without prefetch)")
    for name, r in blocks.items():
        m = _median(r)
        print(f"{name:38s} {m:8.3f} {block_today / m:8.2f} {3600 / m:8.0f}   {block_base / m:5.2f}x")
    print("parts (median ms): " + " ".join(f"{k:>9s}" for k in PARTS))
    for name in ("today", "new step (train.py)"):
        print(f"  {name:18s}" + " ".join(f"{1000 * _median(rows[name], k):9.1f}" for k in PARTS)
              + ("   (new: 'ghn' is GHN forward + nets forward)" if name != "today" else ""))


if __name__ == "__main__":
    main()
