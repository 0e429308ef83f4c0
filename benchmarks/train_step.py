"""Seconds per GHN-Q meta-training step on CPU (meta-batch 4, 32 images; issue #3 target: < 1 s).

Run: python benchmarks/train_step.py [--steps 12] [--threads 2] [--data DIR]
Prints the median step time and its parts (sampling, graph build, GHN forward, nets forward,
backward + Adam), and the ratio of the whole step to the GHN forward measured in this process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ghnq_deploy.data import load_cifar10
from ghnq_deploy.ghn.graph import build_graph
from ghnq_deploy.ghn.model import GHNQ
from ghnq_deploy.ghn.train import MetaBatchSource, TrainConfig, net_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(meta_batch=args.meta_batch, batch_size=args.batch_size)
    source = MetaBatchSource(cfg, load_cifar10("train", args.data).subset(2048))
    ghn = GHNQ().train()
    optimizer = torch.optim.Adam(ghn.parameters(), lr=1e-3)
    parts: dict[str, list[float]] = {k: [] for k in ("sample", "graph", "ghn", "nets", "backward", "step")}
    for step in range(args.steps + 2):
        t0 = time.perf_counter()
        specs, x, y, _ = source(step)
        t1 = time.perf_counter()
        graphs = [build_graph(s) for s in specs]
        t2 = time.perf_counter()
        params = ghn.predict_params(graphs)
        t3 = time.perf_counter()
        loss = sum(net_loss(p, s, x, y)[0] for p, s in zip(params, specs)) / len(specs)
        t4 = time.perf_counter()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        t5 = time.perf_counter()
        if step >= 2:  # skip warm-up
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)):
                parts[k].append(v)
    med = {k: statistics.median(v) for k, v in parts.items()}
    print(f"threads={args.threads} meta-batch={args.meta_batch} batch={args.batch_size} steps={args.steps}")
    for k, v in med.items():
        print(f"  {k:9s} {1000 * v:8.1f} ms")
    print(f"seconds per step: {med['step']:.3f} (target < 1 s); step / GHN forward = {med['step'] / med['ghn']:.1f}x")


if __name__ == "__main__":
    main()
