"""Produced docs/quantization.md, "Reconstruction variants" (listed in docs/results.md, "Synthesis
recipes, reconstruction variants, bias correction"; the QDrop + bias-correction rows in docs/results/log.md).

Reconstruction variants one by one on the Fashion-MNIST ResNet-20 at W4A4 (weights per channel,
activations min/max at every layer input, first/last layer 8-bit): plain calibration, AdaRound per
layer, BRECQ blocks, + QDrop, + LSQ activation step sizes, + weight scales, and all together (the
Genie recipe at this schedule), each calibrated on the same images and evaluated on the whole
test set. The images: real training images, Gaussian noise, or a synthesis recipe of
studies/synthesis_recipes.py.

    python studies/reconstruction_study.py [--data real,batch+aug+swing+clamp] [--iterations 500] [--json out.json]

With ``--bias-correction`` every variant is also scored after ``correct_bias`` on the same images.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthesis_recipes import MODEL, recipe_config  # noqa: E402

from dsg_ext import quantization as quant  # noqa: E402
from dsg_ext.data import calibration, fashion_mnist  # noqa: E402
from dsg_ext.evaluation import topk_accuracy  # noqa: E402
from dsg_ext.models import load_model  # noqa: E402
from dsg_ext.synthesis import synthesize  # noqa: E402

VARIANTS = {
    "calibration only": None,
    "adaround (layers)": {"unit": "layer"},
    "brecq (blocks)": {"unit": "block"},
    "blocks + qdrop": {"unit": "block", "qdrop": 0.5},
    "blocks + lsq": {"unit": "block", "learn_act_scale": True},
    "blocks + weight scales": {"unit": "block", "learn_weight_scale": True},
    "blocks + qdrop + lsq + weight scales": {"unit": "block", "qdrop": 0.5, "learn_act_scale": True,
                                             "learn_weight_scale": True},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="real")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--synth-iterations", type=int, default=150)
    p.add_argument("--iterations", type=int, default=500, help="reconstruction iterations per unit")
    p.add_argument("--lr", type=float, default=None, help="rounding lr (default AdaRoundConfig's)")
    p.add_argument("--act-scale-lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", type=int, default=10000, help="test images (10000: the whole test set)")
    p.add_argument("--bits", default="4,4")
    p.add_argument("--bias-correction", action="store_true", help="also score each variant bias-corrected")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    wbits, abits = (int(v) for v in args.bits.split(","))
    loaded = load_model(MODEL)
    model = loaded.model.eval()
    spec = loaded.input
    input_range = spec.valid_range()
    test_u8, test_y = fashion_mnist.load_split(train=False)
    test_x = fashion_mnist.preprocess(test_u8[: args.eval])
    test_y = test_y[: args.eval]
    fp_acc = topk_accuracy(model, test_x, test_y, batch_size=500)[0]
    print(f"FP32 top-1 {fp_acc:.2f}; W{wbits}A{abits}, {args.iterations} reconstruction iterations per unit", flush=True)
    extra = " bias-corrected |" if args.bias_correction else ""
    print(f"| data | variant | top-1 | below FP32 |{extra} time |", flush=True)
    rows = []
    for data in args.data.split(","):
        if data == "real":
            images = calibration.real_fashion_mnist(args.samples, args.seed)
        elif data == "noise":
            images = calibration.gaussian_noise(spec, args.samples, args.seed)
        else:
            images = synthesize(model, recipe_config(data, args.synth_iterations, args.samples, args.seed),
                                args.samples, input_range=input_range)
        q0 = quant.quantize_model(model, quant.QuantConfig(wbits=wbits, abits=abits, observer="minmax"), images[:2])
        quant.calibrate(q0, images)
        for name in args.variants.split(","):
            fields = VARIANTS[name]
            q = copy.deepcopy(q0)
            t = time.perf_counter()
            if fields is None:
                quant.finalize_weights(q)
            else:
                extra = {k: v for k, v in (("lr", args.lr), ("act_scale_lr", args.act_scale_lr)) if v is not None}
                config = quant.AdaRoundConfig(iterations=args.iterations, seed=args.seed, **fields, **extra)
                quant.reconstruct(q, model, images, config, progress=False)
            seconds = time.perf_counter() - t
            acc = topk_accuracy(q, test_x, test_y, batch_size=500)[0]
            row = {"data": data, "variant": name, "top1": acc, "seconds": seconds}
            corrected = ""
            if args.bias_correction:
                quant.correct_bias(q, model, images)
                row["top1_bias_corrected"] = topk_accuracy(q, test_x, test_y, batch_size=500)[0]
                corrected = f" {row['top1_bias_corrected']:.2f} |"
            rows.append(row)
            print(f"| {data} | {name} | {acc:.2f} | {fp_acc - acc:+.2f} |{corrected} {seconds:.0f} s |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fp32_top1": fp_acc, "args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
