"""Evaluation speed: images/s of the float net vs the fake-quant simulator at each bit-width.

Float and every bit-width run on the same nets and the same batches in this process.
Timing is interleaved at the finest grain: for every batch of every round, float and
each bit-width run back to back, and a bit-width's ratio is the median over all
(round, batch) pairs of its time divided by the float time on that batch. On a machine
shared with a background job this cancels the job's load swings, which a median of whole
runs does not (measured: whole-run ratios of the same net varied 1.1x-2.6x).

``--clock cpu`` (default) measures this process's CPU time (use with ``--threads 1``);
``--clock wall`` measures elapsed time. ``--tune-malloc`` keeps freed buffers in the heap
(glibc mallopt) and denormals are flushed, as ``ghnq-deploy evaluate`` does: without the
first, every large activation is a fresh mmap and page faults can cost more than the
convolutions. Images are the channels_last batches ``data.normalize`` returns, as in the
evaluation (oneDNN convs run faster on them, and so must the quantizers).

    python benchmarks/eval_speed.py --split id-test -n 6 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _images(n: int) -> tuple[torch.Tensor, str]:
    try:
        from ghnq_deploy.data import load_cifar10, normalize
        from ghnq_deploy.report.evaluate import eval_order

        data = load_cifar10("test")
        return normalize(data.images[eval_order(len(data))[:n]]), data.description
    except Exception as exc:  # noqa: BLE001 - speed does not depend on pixel values
        return torch.randn(n, 3, 32, 32), f"random normal images ({exc})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="id-test")
    parser.add_argument("-n", type=int, default=4, help="nets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bits", default="w8a8,w4a8,w4a4,w2a2")
    parser.add_argument("--scheme", default="paper")
    parser.add_argument("--bn", default="batch", choices=("batch", "running"))
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=3, help="batches per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--tune-malloc", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    from ghnq_deploy.arch.sampler import sample_split
    from ghnq_deploy.cli.evaluate_cmd import tune_malloc
    from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint
    from ghnq_deploy.ghn.predict import predict
    from ghnq_deploy.quant.simulate import QuantSim
    from ghnq_deploy.calibration import load_calibration
    from ghnq_deploy.report.evaluate import prepare_bn

    tuned = tune_malloc() if args.tune_malloc else False
    torch.set_flush_denormal(True)  # as ghnq-deploy evaluate does
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    bits = [b.strip() for b in args.bits.split(",") if b.strip()]
    ghn, info = load_ghn_checkpoint(args.checkpoint)
    models = predict(ghn, sample_split(args.split, args.n, args.seed), ghn_info=info)
    x, source = _images(args.batch_size * args.batches)
    batches = [x[i:i + args.batch_size] for i in range(0, len(x), args.batch_size)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, malloc tuned: {tuned}; {args.split} "
          f"x{args.n}, scheme '{args.scheme}', BN {args.bn}, batch {args.batch_size} x{args.batches} x{args.repeats} "
          f"rounds, {args.clock} clock; {source}")
    print(f"{'net':24s} {'params':>9s} {'float img/s':>12s} " + " ".join(f"{b:>8s}" for b in bits))
    all_ratios: dict[str, list[float]] = {b: [] for b in bits}
    float_total, count = 0.0, 0
    with torch.no_grad():
        for pm in models:
            net = pm.build(bn_mode="batch")
            if args.bn == "running":
                prepare_bn(net, load_calibration())  # the export's calibration set and BN routine
            runners = {"float": net, **{b: QuantSim(net, args.scheme, b, bn=args.bn) for b in bits}}
            for k, r in runners.items():
                if k != "float" and r.scheme.range_source == "calibrated":
                    r.calibrate(batches)
                r(batches[0])  # warm-up: oneDNN primitives, weight cache
            ratios: dict[str, list[float]] = {b: [] for b in bits}
            float_times = []
            for _ in range(args.repeats):
                for xb in batches:
                    t = {}
                    for k, r in runners.items():
                        start = clock()
                        r(xb)
                        t[k] = clock() - start
                    float_times.append(t["float"])
                    for b in bits:
                        ratios[b].append(t[b] / t["float"])
            for b in bits:
                all_ratios[b] += ratios[b]
            float_total += sum(float_times)
            count += len(float_times)
            params = sum(v.numel() for k, v in pm.state_dict.items() if "running" not in k and "num_batches" not in k)
            ips = args.batch_size / statistics.median(float_times)
            print(f"{pm.spec.name:24s} {params:9,d} {ips:12.0f} " + " ".join(
                f"{statistics.median(ratios[b]):7.2f}x" for b in bits))
    print(f"{'median over all batches':24s} {'':9s} {args.batch_size * count / float_total:12.0f} " + " ".join(
        f"{statistics.median(all_ratios[b]):7.2f}x" for b in bits))


if __name__ == "__main__":
    main()
