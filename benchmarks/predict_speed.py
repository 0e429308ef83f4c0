"""GHN-Q prediction speed on CPU: graph build and GHN forward, median of repeats.

Run: python benchmarks/predict_speed.py [--checkpoint default] [--repeats 15] [--threads 2]
Target (issue #3): under 30 ms for a ResNet-20-sized net on 2 cores.

Columns: ``graph`` builds the graphs from the specs; ``GHN fwd`` is ``predict_params`` (meta-batch
assembly, embeddings, both GNN sweeps, every decoder and the normalisation), run under
``torch.no_grad`` as ``ghnq-deploy predict`` does; ``GNN`` is the two sweeps alone, level by level
(in inference mode, as inside ``predict_params``);
``node-by-node`` is the same GNN run one node per step in GHN-2's sequential order, written out
here as a baseline measured in this process, so the ratio shows what level batching and the
message table buy. Timings on a shared machine are noisy: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ghnq_deploy.arch.sampler import sample_split
from ghnq_deploy.arch.spec import load_spec
from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint
from ghnq_deploy.ghn.graph import GraphBatch, build_graph
from ghnq_deploy.ghn.model import GHNQ

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _node_steps(batch: GraphBatch, graphs) -> list[list[tuple]]:
    """Per sweep, one step per node in topological (backward: reverse) order, with its inputs."""
    edges = np.concatenate([g.edges + np.array([off, off, 0]) for g, off in zip(graphs, batch.offsets)])
    sweeps = []
    for reverse in (False, True):
        src, dst = (edges[:, 1], edges[:, 0]) if reverse else (edges[:, 0], edges[:, 1])
        order = range(batch.num_nodes - 1, -1, -1) if reverse else range(batch.num_nodes)
        steps = []
        for v in order:
            into = dst == v
            real, virt = into & (edges[:, 2] == 1), into & (edges[:, 2] > 1)
            weight = torch.from_numpy((1.0 / edges[virt, 2].astype(np.float32))[:, None])
            steps.append((v, torch.from_numpy(src[real]), torch.from_numpy(src[virt]), weight))
        sweeps.append(steps)
    return sweeps


def _node_by_node(gnn, h: torch.Tensor, sweeps) -> torch.Tensor:
    """GHN-2's sequential sweep: each node's messages from its (already updated) neighbours."""
    h = h.clone()
    for steps in sweeps:
        for v, real, virt, weight in steps:
            m = h.new_zeros(1, h.shape[1])
            if len(real):
                m = m + gnn.message(h[real]).sum(0, keepdim=True)
            if len(virt):
                m = m + (gnn.virtual_message(h[virt]) * weight).sum(0, keepdim=True)
            h[v:v + 1] = gnn.gru(m, h[v:v + 1])
    return h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        ghn, _ = load_ghn_checkpoint(args.checkpoint)
    except ValueError:
        ghn = GHNQ().eval()
    cases = {
        "resnet20": [load_spec(EXAMPLES / "resnet20.json")],
        "mobilenetv2": [load_spec(EXAMPLES / "mobilenetv2_cifar.json")],
        "50 id-test nets (one meta-batch)": sample_split("id-test", 50, 0),
    }
    print(f"threads={args.threads} repeats={args.repeats} (median ms)")
    print(f"{'case':34s} {'nodes':>6s} {'levels':>7s} {'graph':>7s} {'GHN fwd':>8s} {'GNN':>7s} "
          f"{'node-by-node':>13s} {'speed-up':>9s}")
    with torch.no_grad():
        for name, specs in cases.items():
            graphs = [build_graph(s) for s in specs]
            graph_ms = _median_ms(lambda: [build_graph(s) for s in specs], args.repeats)
            forward_ms = _median_ms(lambda: ghn.predict_params(graphs), args.repeats)
            batch = GraphBatch.from_graphs(graphs)
            sweeps = _node_steps(batch, graphs)
            with torch.inference_mode():  # as inside predict_params
                h0 = ghn.op_embedding(batch.primitives) + ghn.shape_encoder(batch.shapes)
                level_ms = _median_ms(lambda: ghn.gnn(h0, batch), args.repeats)
                node_ms = _median_ms(lambda: _node_by_node(ghn.gnn, h0, sweeps), max(1, args.repeats // 3))
                torch.testing.assert_close(ghn.gnn(h0, batch), _node_by_node(ghn.gnn, h0, sweeps), rtol=1e-4, atol=1e-5)
            nodes = sum(g.num_nodes for g in graphs)
            levels = len(batch.forward.levels) + len(batch.backward.levels)
            print(f"{name:34s} {nodes:6d} {levels:7d} {graph_ms:7.1f} {forward_ms:8.1f} {level_ms:7.1f} "
                  f"{node_ms:13.1f} {node_ms / level_ms:8.1f}x")


if __name__ == "__main__":
    main()
