"""GHN-Q prediction speed on CPU: graph build / GHN forward / load split, against the previous code.

Run: python benchmarks/predict_speed.py [--checkpoint default] [--repeats 11] [--threads 1] [--folder 100]

Per net (ResNet-20 and MobileNetV2 from examples/, torchvision ResNet-18 and ResNet-50 imported at
3x32x32 / 10 classes): ``graph`` builds the graph from the spec; ``fwd`` is ``predict_params``
under ``torch.no_grad`` as ``ghnq-deploy predict`` runs it; ``load`` is the rest of
``ghn.predict.predict``: the predicted tensors made into the net's state dict with its
unpredicted buffers; ``total`` is ``predict`` end to end. ``old`` columns run the previous
implementation in the same process, interleaved repeat by repeat with the new one: the decoder
of tests/legacy_ghn_model.py (a frozen copy of the model before tiling by repeat) and the old
load (a seeded ``build_model`` per net, whose random init is overwritten). Medians of
``--repeats``, as wall time and as this process's CPU time (the idle-core estimate on a shared
machine). Both give bit-identical parameters (tests/test_ghn_tiling_identical.py).

``--folder N``: N ``id-test`` nets (the checkpoint's space) through ``predict`` one net per call
against meta-batches of 16 (``ghnq-deploy predict``'s default on a folder), ms per net.
Timings on a shared machine are noisy: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from ghnq_deploy.arch.builder import build_model
from ghnq_deploy.arch.importer import import_model, resolve_source
from ghnq_deploy.arch.sampler import sample_split, space_for
from ghnq_deploy.arch.spec import load_spec
from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint
from ghnq_deploy.ghn.graph import build_graph
from ghnq_deploy.arch.spec import analyze
from ghnq_deploy.ghn.predict import _state_dict, predict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import legacy_ghn_model  # noqa: E402  (the frozen previous model, for the same-process baseline)


def _time(fn, clock=time.perf_counter) -> float:
    start = clock()
    fn()
    return 1000 * (clock() - start)


def _interleaved(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and CPU ms of each function, run in turn within every repeat (after a warm-up).

    CPU time (``time.process_time``) counts only the time this process ran: at one thread on a
    machine whose cores other jobs share, it is the better estimate of the wall time on an idle core.
    """
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            wall[k].append(1000 * (time.perf_counter() - w0))
            cpu[k].append(1000 * (time.process_time() - c0))
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def _load(spec, info, params, seed=0):
    return _state_dict(spec, info, {k: v.detach().contiguous() for k, v in params.items()}, seed)


def _old_load(spec, params, seed=0):
    state = build_model(spec, seed=seed).state_dict()
    for name, value in params.items():
        state[name] = value.detach().contiguous()
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--folder", type=int, default=100, help="nets for the meta-batch comparison (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ghn, ghn_info = load_ghn_checkpoint(args.checkpoint)
    old = legacy_ghn_model.GHNQ(legacy_ghn_model.GHNConfig(**vars(ghn.config)))
    old.load_state_dict(ghn.state_dict())
    old.eval()
    cases = {
        "ResNet-20 (examples)": load_spec(ROOT / "examples" / "resnet20.json"),
        "MobileNetV2 (examples)": load_spec(ROOT / "examples" / "mobilenetv2_cifar.json"),
        "ResNet-18 (torchvision)": import_model(resolve_source("torchvision:resnet18", 10), "resnet18", (3, 32, 32), 10),
        "ResNet-50 (torchvision)": import_model(resolve_source("torchvision:resnet50", 10), "resnet50", (3, 32, 32), 10),
    }
    print(f"threads={args.threads} repeats={args.repeats} (median ms; old = previous implementation, same process)")
    header = (f"{'net':24s} {'nodes':>6s} {'params':>10s} {'graph':>7s} {'fwd':>7s} {'old fwd':>8s} {'load':>7s} "
              f"{'old load':>9s} {'total':>7s} {'old total':>10s} {'speed-up':>9s}")
    rows: dict[str, list[str]] = {"wall": [], "cpu": []}
    with torch.no_grad():
        for name, spec in cases.items():
            info = analyze(spec, param_cap=sys.maxsize)
            graph = build_graph(spec, info, s_max=ghn.config.s_max)
            params = ghn.predict_params([graph])[0]
            timings = _interleaved({
                "graph": lambda: build_graph(spec, analyze(spec, param_cap=sys.maxsize), s_max=ghn.config.s_max),
                "fwd": lambda: ghn.predict_params([graph]),
                "old fwd": lambda: old.predict_params([graph]),
                "load": lambda: _load(spec, info, params),
                "old load": lambda: _old_load(spec, params),
            }, args.repeats)
            n = sum(v.numel() for v in params.values())
            for kind, t in zip(("wall", "cpu"), timings):
                total = t["graph"] + t["fwd"] + t["load"]
                old_total = t["graph"] + t["old fwd"] + t["old load"]
                rows[kind].append(f"{name:24s} {graph.num_nodes:6d} {n:10,d} {t['graph']:7.1f} {t['fwd']:7.1f} "
                                  f"{t['old fwd']:8.1f} {t['load']:7.1f} {t['old load']:9.1f} {total:7.1f} "
                                  f"{old_total:10.1f} {old_total / total:8.2f}x")
        for kind, title in (("wall", "wall time"), ("cpu", "CPU time of this process (idle-core estimate)")):
            print(f"\n{title}\n{header}")
            print("\n".join(rows[kind]))
        if args.folder:
            specs = sample_split("id-test", args.folder, 0, space=space_for(ghn.config.num_primitives))
            for clock, title in ((time.perf_counter, "wall"), (time.process_time, "CPU")):
                one = _time(lambda: [predict(ghn, [s], ghn_info=ghn_info) for s in specs], clock) / len(specs)
                meta = _time(lambda: [predict(ghn, specs[i:i + 16], ghn_info=ghn_info)
                                      for i in range(0, len(specs), 16)], clock) / len(specs)
                print(f"\n{args.folder} id-test nets through ghn.predict.predict ({title} time): one net per call "
                      f"{one:.1f} ms/net, meta-batches of 16 {meta:.1f} ms/net ({one / meta:.1f}x)")


if __name__ == "__main__":
    main()
