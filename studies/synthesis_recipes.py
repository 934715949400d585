"""Produced docs/synthesis.md, "Synthesis recipes: the table that chose `--recipe recommended`"
(listed in docs/results.md, "Synthesis recipes, reconstruction variants, bias correction").

Which synthesis recipe gives the most diverse, most useful calibration data: every recipe below
synthesises the same number of images for the Fashion-MNIST ResNet-20, then each set is measured
(sample spread relative to the real images', classes the FP32 network predicts, pixels outside the
valid range) and used for min/max W4A4 calibration (the demo's quantizer, no reconstruction),
evaluated on the whole test set. Real training images and Gaussian noise are measured in the same
run. This is the table that chose `--recipe recommended`.

    python studies/synthesis_recipes.py [--recipes a,b] [--samples 256] [--iterations 150] [--seeds 0,1,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from dsg_ext import quantization as quant
from dsg_ext.data import calibration, fashion_mnist
from dsg_ext.evaluation import topk_accuracy
from dsg_ext.models import load_model
from dsg_ext.synthesis import RECIPES, SynthesisConfig, synthesize
from dsg_ext.synthesis.diversity import diversity

MODEL = "fashion-mnist-resnet20"

# Candidates beyond the named presets: a method, then "+"-joined modifiers (e.g. batch+aug+swing+clamp).
METHOD_NAMES = ("zeroq", "dsg", "batch", "batch-dsg")
MODIFIERS = {
    "clamp": {"clamp_pixels": True},
    "crop": {"crop_pad": 2},
    "flip": {"flip": True},
    "smooth": {"smoothing": 0.5},
    "aug": {"crop_pad": 2, "flip": True, "smoothing": 0.5},
    "swing": {"swing": True},
    "ce": {"ce_weight": 0.1, "ce_labels": "balanced"},
    "initial": {"layer_weighting": "initial"},
    "gen": {"generator": True, "lr": 0.1},  # Genie's generator + latent (latent lr 0.1, generator 0.01)
    "hostrng": {"augment_rng": "host"},  # the augmentation's draws made on the host each step (the earlier path)
}
DEFAULT_CANDIDATES = ("zeroq", "dsg", "batch", "batch-dsg", "batch+clamp", "batch+aug", "batch+swing",
                      "batch+aug+swing+clamp")


def recipe_config(name: str, iterations: int, batch: int, seed: int, image_size: int = 28,
                  channels: int = 1) -> SynthesisConfig:
    """A named preset (RECIPES) or METHOD+modifier+..., at this schedule."""
    if name in RECIPES:
        fields = dict(RECIPES[name])
    else:
        method, *mods = name.split("+")
        if method not in METHOD_NAMES or any(m not in MODIFIERS for m in mods):
            raise SystemExit(f"unknown recipe {name!r}: a preset {sorted(RECIPES)} or one of {METHOD_NAMES} "
                             f"followed by +modifiers from {sorted(MODIFIERS)}")
        fields = {"method": method}
        for m in mods:
            fields.update(MODIFIERS[m])
    fields.update(iterations=iterations, batch_size=batch, seed=seed, image_size=image_size, channels=channels)
    return SynthesisConfig(**fields).validate()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default=",".join(DEFAULT_CANDIDATES))
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seeds", default="0", help="comma-separated: every source is made and measured per seed")
    p.add_argument("--eval", type=int, default=10000, help="test images (10000: the whole test set)")
    p.add_argument("--bits", default="4,4")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    seeds = [int(v) for v in args.seeds.split(",")]
    wbits, abits = (int(v) for v in args.bits.split(","))
    loaded = load_model(MODEL)
    model = loaded.model.eval()
    spec = loaded.input
    input_range = spec.valid_range()
    test_u8, test_y = fashion_mnist.load_split(train=False)
    test_x = fashion_mnist.preprocess(test_u8[: args.eval])
    test_y = test_y[: args.eval]
    fp_acc = topk_accuracy(model, test_x, test_y, batch_size=500)[0]
    print(f"FP32 top-1 {fp_acc:.2f} on {test_x.shape[0]} test images; W{wbits}A{abits} min/max calibration", flush=True)

    def source(name: str, seed: int):
        if name == "real":
            return (lambda: calibration.real_fashion_mnist(args.samples, seed)), None
        if name == "noise":
            return (lambda: calibration.gaussian_noise(spec, args.samples, seed)), None
        config = recipe_config(name, args.iterations, args.batch, seed)
        return (lambda: synthesize(model, config, args.samples, input_range=input_range)), dataclasses.asdict(config)

    rows = []
    real_spread = {}
    for name in ["real", "noise", *args.recipes.split(",")]:
        for seed in seeds:
            make, config = source(name, seed)
            t = time.perf_counter()
            images = make()
            seconds = time.perf_counter() - t
            d = diversity(loaded, images)
            q = quant.quantize_model(model, quant.QuantConfig(wbits=wbits, abits=abits, observer="minmax"), images[:2])
            quant.calibrate(q, images)
            quant.finalize_weights(q)
            acc = topk_accuracy(q, test_x, test_y, batch_size=500)[0]
            spread = d["relative_sample_spread_mean"]
            real_spread.setdefault(seed, spread)  # real comes first
            row = {"source": name, "seed": seed, "top1": acc, "spread": spread,
                   "spread_vs_real": spread / real_spread[seed], "classes": d["classes_predicted"],
                   "pixel_min": d["pixel_min"], "pixel_max": d["pixel_max"],
                   "outside": d["pixels_outside_valid_range"], "seconds": seconds, "config": config}
            rows.append(row)
            print(f"  {name} seed {seed}: top-1 {acc:.2f}, spread {spread:.3f}, {row['classes']} classes, pixels "
                  f"{row['pixel_min']:.2f}..{row['pixel_max']:.2f} ({100 * row['outside']:.1f}% outside), {seconds:.0f} s",
                  flush=True)
    print(f"\n| source | W{wbits}A{abits} top-1, mean (min..max over seeds {args.seeds}) | spread vs real | "
          "classes predicted | pixels outside 0..1 | synthesis s |\n|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["source"] for r in rows):
        rs = [r for r in rows if r["source"] == name]
        top = [r["top1"] for r in rs]
        print(f"| {name} | {sum(top) / len(top):.2f} ({min(top):.2f}..{max(top):.2f}) | "
              f"{sum(r['spread_vs_real'] for r in rs) / len(rs):.2f}x | {min(r['classes'] for r in rs)}"
              f"..{max(r['classes'] for r in rs)} | {100 * max(r['outside'] for r in rs):.1f}% | "
              f"{sum(r['seconds'] for r in rs) / len(rs):.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fp32_top1": fp_acc, "args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
