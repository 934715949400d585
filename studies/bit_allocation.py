"""Produced docs/results.md, "Automatic mixed precision (bit allocation under a size budget)".

At each budget of average weight bits: the automatic allocation (allocation.py: single-layer KL
sensitivity on the calibration images, exact knapsack) against uniform bits -- every weight at the
same width, first and last layer included -- in one run, on the same calibration images, with the same
rounding (nearest, and GPTQ's one-shot second-order rounding). Uniform bits exist at integer widths
only: a fractional budget is shown beside the uniform widths below and above it.

- EfficientNet-Lite0/1/2: fidelity to FP32 (top-1 agreement, mean KL) on held-out crops of
  scikit-image's photos; Fashion-MNIST ResNet-20: top-1 on the test set.

    python studies/bit_allocation.py --model fashion-mnist-resnet20 --samples 256         (CPU, ~2 min)
    python studies/bit_allocation.py --model efficientnet-lite0 --samples 64 --cache /tmp/c (CPU, ~40 min)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from effnet_recipes import photo_sets, synthetic_images  # noqa: E402
from second_order import average_wbits, round_with  # noqa: E402

from dsg_ext import quantization as quant  # noqa: E402
from dsg_ext.data import calibration, fashion_mnist  # noqa: E402
from dsg_ext.evaluation import fidelity, topk_accuracy  # noqa: E402
from dsg_ext.models import load_model  # noqa: E402
from dsg_ext.quantization.algorithms.mixed_precision import allocate, layer_sensitivity, parse_choices  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fashion-mnist-resnet20")
    p.add_argument("--samples", type=int, default=256, help="calibration images")
    p.add_argument("--sensitivity-images", type=int, default=32)
    p.add_argument("--iterations", type=int, default=150, help="synthesis iterations")
    p.add_argument("--source", default="recommended", help="recommended (synthetic), real or noise")
    p.add_argument("--abits", default="8", help="activation bits; a list measures each (one sensitivity: it is weight-only)")
    p.add_argument("--budgets", default="3.5,4,4.5,5,6")
    p.add_argument("--uniform", default="3,4,5,6")
    p.add_argument("--choices", default="2,3,4,5,6,8")
    p.add_argument("--methods", default="nearest,gptq")
    p.add_argument("--eval", type=int, default=10000)
    p.add_argument("--cache", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    loaded = load_model(args.model)
    spec, fp = loaded.input, loaded.model.to(args.device)
    fashion = args.model == "fashion-mnist-resnet20"
    if fashion:
        test_u8, test_y = fashion_mnist.load_split(train=False)
        test_x = fashion_mnist.preprocess(test_u8[:args.eval]).to(args.device)
        test_y = test_y[:args.eval].to(args.device)
        real = calibration.real_fashion_mnist(args.samples, args.seed)

        def measure(q):
            return {"top1": topk_accuracy(q, test_x, test_y, batch_size=500)[0]}
    else:
        eval_x, real = photo_sets(spec, args.samples)
        eval_x = eval_x.to(args.device)

        def measure(q):
            return fidelity(fp, q, eval_x, device=args.device)
    if args.source == "real":
        images = real
    elif args.source == "noise":
        images = calibration.gaussian_noise(spec, args.samples, args.seed)
    else:
        images = synthetic_images(args.model, fp, spec, args.source, args.samples, args.samples, args.iterations,
                                  args.seed, args.device, args.cache)[0]
    images = images.to(args.device)
    print(f"{args.model} FP32: {measure(fp)}", flush=True)
    base = quant.QuantConfig(wbits=8)
    choices = parse_choices(args.choices)
    t = time.perf_counter()
    sens = layer_sensitivity(fp, images[:args.sensitivity_images], base, choices, images[:1], device=args.device,
                             progress=False)
    sens_s = time.perf_counter() - t
    params = {n: fp.get_submodule(n).weight.numel() for n in sens}
    print(f"sensitivity: {len(sens)} layers x {len(choices)} widths on {args.sensitivity_images} images, "
          f"{sens_s:.0f} s", flush=True)
    settings = [(f"uniform {b}", {n: b for n in sens}, None) for b in (parse_choices(args.uniform) if args.uniform else [])]
    for budget in (float(b) for b in args.budgets.split(",")):
        t = time.perf_counter()
        bits = allocate(sens, params, budget)
        settings.append((f"auto {budget:g}", bits, time.perf_counter() - t))
    rows = []
    for abits, (label, bits, alloc_s) in ((a, s) for a in parse_choices(args.abits) for s in settings):
        rules = ",".join(f"{n}={b}" for n, b in bits.items())
        config = quant.QuantConfig(wbits=8, abits=abits, layer_wbits=rules)
        q = quant.quantize_model(fp, config, images[:1])
        t = time.perf_counter()
        quant.calibrate(q, images, device=args.device)
        calib_s = time.perf_counter() - t
        for method in args.methods.split(","):
            rounded, seconds = round_with(method, q, fp, images, 0, 0.0, args.device)
            row = {"setting": label, "abits": abits, "method": method, **measure(rounded), "average_wbits": average_wbits(rounded),
                   "predicted_kl": sum(sens[n][b] for n, b in bits.items()),
                   "seconds": seconds, "calibration_seconds": calib_s, "allocation_seconds": alloc_s}
            rows.append(row)
            shown = (f"top-1 {row['top1']:6.2f}%" if fashion else
                     f"agreement {row['top1_agreement']:5.1f}%  KL {row['mean_kl']:.3f}")
            print(f"W{row['average_wbits']:.2f}A{abits} {label:12s} {method:8s} {shown}  ({seconds:.1f} s)",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "sensitivity": {n: {str(b): v for b, v in s.items()} for n, s in sens.items()},
                       "sensitivity_seconds": sens_s, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
