"""Produced docs/results.md, "Second-order rounding (GPTQ) and reconstruction started from it".

Per calibration source (real images, our recommended synthetic data, Gaussian noise) and bit setting,
in one run on the same images: nearest rounding after calibration, GPTQ's one-shot second-order
rounding, and BRECQ's block reconstruction on a short CPU schedule started from nearest rounding
(`recommended`) and from GPTQ's decision (`gptq-brecq`). Each cell with its wall time.

- EfficientNet-Lite0/1/2: fidelity to FP32 (top-1 agreement, mean KL) on held-out crops of
  scikit-image's photos (effnet_recipes.photo_sets); real calibration = the other photos' crops.
- Fashion-MNIST ResNet-20: top-1 on the test set (10000 = all); real calibration = training images.

    python studies/second_order.py --model fashion-mnist-resnet20 --samples 256          (CPU, ~3 min)
    python studies/second_order.py --model efficientnet-lite0 --samples 64 --cache /tmp/c (CPU, ~40 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from effnet_recipes import photo_sets, synthetic_images  # noqa: E402

from dsg_ext import quantization as quant  # noqa: E402
from dsg_ext.data import calibration, fashion_mnist  # noqa: E402
from dsg_ext.evaluation import fidelity, topk_accuracy  # noqa: E402
from dsg_ext.models import load_model  # noqa: E402
from dsg_ext.quantization import parse_bits  # noqa: E402

METHODS = ("nearest", "gptq", "recommended", "gptq-brecq")


def round_with(method, q, fp, images, iterations, lr, device):
    """A copy of the calibrated ``q`` rounded by ``method``, and the seconds the rounding took."""
    q = copy.deepcopy(q)
    t = time.perf_counter()
    if method == "nearest":
        quant.finalize_weights(q)
    else:
        fields = {} if method == "gptq" else {"iterations": iterations, "lr": lr}
        quant.reconstruct(q, fp, images, quant.AdaRoundConfig.from_preset(method, **fields), device=device,
                          progress=False)
        quant.finalize_weights(q)
    return q, time.perf_counter() - t


def average_wbits(qmodel) -> float:
    """Weight bits averaged over every quantized weight (what the file's integers cost)."""
    pairs = [(wq.bits, wq.w_int.numel()) for wq in quant.weight_quantizers(qmodel).values()]
    return sum(b * n for b, n in pairs) / sum(n for _, n in pairs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fashion-mnist-resnet20")
    p.add_argument("--samples", type=int, default=256, help="calibration images per source")
    p.add_argument("--batch", type=int, default=None, help="synthesis batch (default: --samples)")
    p.add_argument("--iterations", type=int, default=150, help="synthesis iterations")
    p.add_argument("--bits", default="W4A4,W3A4", help="bit settings, e.g. W4A8,W6A6")
    p.add_argument("--observer", default="mse")
    p.add_argument("--layer-wbits", default="", help="mixed precision by rule, e.g. depthwise=8")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sources", default="real,recommended,noise")
    p.add_argument("--recon-iterations", type=int, default=80, help="iterations per block of the BRECQ columns")
    p.add_argument("--recon-lr", type=float, default=0.05)
    p.add_argument("--eval", type=int, default=10000, help="Fashion-MNIST test images (10000 = all)")
    p.add_argument("--cache", default=None, help="directory for the synthetic images (reused by later runs)")
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
    sources = {}
    for name in args.sources.split(","):
        if name == "real":
            sources[name] = real
        elif name == "noise":
            sources[name] = calibration.gaussian_noise(spec, args.samples, args.seed)
        else:
            sources[name] = synthetic_images(args.model, fp, spec, name, args.samples, args.batch or args.samples,
                                             args.iterations, args.seed, args.device, args.cache)[0]
    reference = measure(fp)
    print(f"{args.model} FP32: {reference}", flush=True)
    rows = []
    for wbits, abits in parse_bits(args.bits):
        qconfig = quant.QuantConfig(wbits=wbits, abits=abits, observer=args.observer, layer_wbits=args.layer_wbits)
        for source, images in sources.items():
            images = images.to(args.device)
            q = quant.quantize_model(fp, qconfig, images[:2])
            t = time.perf_counter()
            quant.calibrate(q, images, device=args.device)
            calib_s = time.perf_counter() - t
            for method in args.methods.split(","):
                rounded, seconds = round_with(method, q, fp, images, args.recon_iterations, args.recon_lr,
                                              args.device)
                row = {"bits": qconfig.label(), "source": source, "method": method, **measure(rounded),
                       "average_wbits": average_wbits(rounded),
                       "seconds": seconds, "calibration_seconds": calib_s}
                rows.append(row)
                shown = (f"top-1 {row['top1']:6.2f}%" if fashion else
                         f"agreement {row['top1_agreement']:5.1f}%  KL {row['mean_kl']:.3f}")
                print(f"{row['bits']:6s} {source:12s} {method:12s} {shown}  ({seconds:.1f} s; "
                      f"{row['average_wbits']:.2f} weight bits on average)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "fp32": reference, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
