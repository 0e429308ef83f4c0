"""Why BN-free nets predicted by a GHN are at chance: activation scales, collapse and rescaling.

Run: python benchmarks/bnfree_scales.py [--checkpoint default] [-n 10] [--images 1000]

For ``examples/bnfree_cnn.json`` and ``n`` nets of ``ood-bnfree`` (the checkpoint's space), on the
first ``images`` CIFAR-10 test (JPEG copy) images of the evaluation order, it prints:
* per conv / linear / add output: RMS over the batch and the share of it that is the per-channel
  mean (``mean share`` = ||E_batch x||^2 / E||x||^2 over channels; 1.0 = every image gives the
  same activations, i.e. the net has collapsed to a constant);
* top-1 as predicted, and after two rescalings of the predicted weights (no retraining):
  ``scale``: each layer's weight multiplied so its output has unit RMS (a data-dependent
  per-layer gain: the best any per-tensor gain can do), and ``center+scale``: per channel, the
  batch mean subtracted (folded into the bias) and unit variance, i.e. the BatchNorm the net lacks,
  calibrated once on 256 train images and frozen; ``WS``: each output channel of every predicted
  weight made zero-mean and He-scaled over its fan-in (weight standardisation, after the fact).
Argmax is invariant to a global weight scale in a ReLU net without biases, so "huge logits" alone
cannot make a net wrong; the two rescalings separate scale from centering.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ghnq_deploy.arch.sampler import sample_split, space_for
from ghnq_deploy.arch.spec import load_spec
from ghnq_deploy.data import load_cifar10
from ghnq_deploy.ghn.checkpoint import load_ghn_checkpoint
from ghnq_deploy.ghn.predict import predict
from ghnq_deploy.report.evaluate import EvalConfig, load_test_images
from ghnq_deploy.data import normalize

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _record(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Outputs of every conv / linear / add module on ``x``, and the logits."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=n: seen.__setitem__(name, out.detach()))
             for n, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear)) or type(m).__name__ == "Add"]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return seen, logits


def _stats(t: torch.Tensor) -> tuple[float, float]:
    """(RMS, share of the mean square that is the per-channel batch mean)."""
    c = t.transpose(0, 1).reshape(t.shape[1], -1) if t.dim() == 4 else t.t()
    total = c.square().mean()
    mean = c.mean(1).square().mean()
    return float(total.sqrt()), float(mean / total.clamp_min(1e-30))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((torch.cat([model(b).argmax(1) for b in x.split(250)]) == y).float().mean())


def _rescale(model: nn.Module, calib: torch.Tensor, center: bool) -> None:
    """Layer by layer in order: gain (and per-channel centering) from the calibration batch."""
    for name, layer in _layers(model):
        out = _record(model, calib)[0][name]
        dims = (0, 2, 3) if out.dim() == 4 else (0,)
        with torch.no_grad():
            if center:
                mean = out.mean(dims)
                std = (out.var(dims) + 1e-5).sqrt()
                shape = (-1,) + (1,) * (layer.weight.dim() - 1)
                layer.weight.div_(std.view(shape))
                bias = layer.bias if layer.bias is not None else torch.zeros_like(mean)
                new_bias = (bias - mean) / std
                if layer.bias is None:
                    layer.bias = nn.Parameter(new_bias)
                else:
                    layer.bias.copy_(new_bias)
            else:
                rms = out.square().mean().sqrt().clamp_min(1e-12)
                layer.weight.div_(rms)
                if layer.bias is not None:
                    layer.bias.div_(rms)


def _standardize(model: nn.Module) -> None:
    """Weight standardisation after the fact: each output channel zero-mean, He-scale over its fan-in."""
    for _, layer in _layers(model):
        with torch.no_grad():
            w = layer.weight.flatten(1)
            beta = 1.0 if layer.weight.dim() == 4 and layer.weight.shape[1] == 1 else 2.0
            w = (w - w.mean(1, keepdim=True)) / (w.var(1, unbiased=False, keepdim=True) + 1e-8).sqrt()
            layer.weight.copy_((w * (beta / w.shape[1]) ** 0.5).view_as(layer.weight))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("-n", "--count", type=int, default=10)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="per-layer table for every net, not only the example")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ghn, info = load_ghn_checkpoint(args.checkpoint)
    images = load_test_images(EvalConfig(limit_images=args.images))
    train = load_cifar10("train")
    calib = normalize(train.images[np.random.default_rng(0).permutation(len(train))[:256]])
    specs = [load_spec(EXAMPLES / "bnfree_cnn.json")] + sample_split(
        "ood-bnfree", args.count, args.seed, space=space_for(ghn.config.num_primitives))
    rows = []
    for k, spec in enumerate(specs):
        model = predict(ghn, [spec], ghn_info=info)[0].build()
        seen, logits = _record(model, images.x[:256])
        if k == 0 or args.verbose:
            print(f"\n{spec.name}: per-layer output on 256 test images")
            print(f"{'layer':28s} {'RMS':>10s} {'mean share':>11s}")
            for name, out in seen.items():
                rms, share = _stats(out)
                print(f"{name:28s} {rms:10.3g} {share:11.3f}")
        logit_rms, logit_share = _stats(logits)
        acc = _accuracy(model, images.x, images.y)
        classes = int(torch.cat([model(b).argmax(1) for b in images.x.split(250)]).bincount(minlength=10).max())
        _rescale(model, calib, center=False)
        acc_scale = _accuracy(model, images.x, images.y)
        model = predict(ghn, [spec], ghn_info=info)[0].build()
        _rescale(model, calib, center=True)
        acc_center = _accuracy(model, images.x, images.y)
        model = predict(ghn, [spec], ghn_info=info)[0].build()
        _standardize(model)
        acc_ws = _accuracy(model, images.x, images.y)
        ws_logits = _record(model, images.x[:256])[1]
        rows.append((spec.name, logit_rms, logit_share, classes / len(images.y), acc, acc_scale, acc_center, acc_ws,
                     _stats(ws_logits)[1]))
    print(f"\ncheckpoint {info['path']}; CIFAR-10 test (JPEG copy), first {args.images} images of the fixed order")
    print(f"{'net':24s} {'logit RMS':>10s} {'mean share':>11s} {'top class':>10s} {'top-1':>7s} "
          f"{'scale':>7s} {'center+scale':>13s} {'WS':>7s} {'WS mean share':>14s}")
    for name, lr, ls, top, a, b, c, d, e in rows:
        print(f"{name:24s} {lr:10.3g} {ls:11.3f} {top:10.1%} {a:7.1%} {b:7.1%} {c:13.1%} {d:7.1%} {e:14.3f}")
    means = np.array([r[4:8] for r in rows[1:]]).mean(0) if len(rows) > 1 else None
    if means is not None:
        print(f"{'mean of ood-bnfree':24s} {'':10s} {'':11s} {'':10s} {means[0]:7.1%} {means[1]:7.1%} {means[2]:13.1%} {means[3]:7.1%}")


if __name__ == "__main__":
    main()
