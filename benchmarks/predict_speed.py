"""GHN-Q prediction speed on CPU: graph build and GHN forward, median of repeats.

Run: python benchmarks/predict_speed.py [--checkpoint default] [--repeats 15] [--threads 2]
Target (issue #3): under 30 ms for a ResNet-20-sized net on 2 cores. The baseline printed
for the ratios is the same GHN run node-by-node (GHN-2's sequential sweep order), measured in
this process, so the ratio shows what level-batching buys.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

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


def _node_by_node(batch: GraphBatch) -> GraphBatch:
    """The same graphs with one node per sweep step (GHN-2's update order)."""
    def split(plans):
        out = []
        for plan in plans:
            for k in range(len(plan.nodes)):
                real = plan.real_pos == k
                virt = plan.virt_pos == k
                out.append(type(plan)(plan.nodes[k:k + 1], plan.real_src[real], torch.zeros(int(real.sum()), dtype=torch.long),
                                      plan.virt_src[virt], torch.zeros(int(virt.sum()), dtype=torch.long),
                                      plan.virt_weight[virt]))
        return out
    return GraphBatch(batch.graphs, batch.primitives, batch.shapes, batch.offsets, split(batch.forward_plan),
                      split(batch.backward_plan), batch.graph_index)


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
    print(f"{'case':34s} {'nodes':>6s} {'graph':>8s} {'GHN fwd':>8s} {'node-by-node':>13s} {'speed-up':>9s}")
    with torch.no_grad():
        for name, specs in cases.items():
            graphs = [build_graph(s) for s in specs]
            graph_ms = _median_ms(lambda: [build_graph(s) for s in specs], args.repeats)
            forward_ms = _median_ms(lambda: ghn.predict_params(graphs), args.repeats)
            batch = GraphBatch.from_graphs(graphs)
            h0 = ghn.op_embedding(batch.primitives) + ghn.shape_encoder(batch.shapes)
            slow = _node_by_node(batch)
            level_ms = _median_ms(lambda: ghn.gnn(h0, batch), args.repeats)
            node_ms = _median_ms(lambda: ghn.gnn(h0, slow), args.repeats)
            nodes = sum(g.num_nodes for g in graphs)
            print(f"{name:34s} {nodes:6d} {graph_ms:8.1f} {forward_ms:8.1f} {node_ms:13.1f} "
                  f"{node_ms / level_ms:8.1f}x (GNN only: {level_ms:.1f} ms by level)")


if __name__ == "__main__":
    main()
