"""Produced docs/results.md, "EfficientNet-Lite0: the recipes and the bit settings, plain calibration",
"EfficientNet-Lite0 W6A6: a CPU reconstruction schedule", "EfficientNet-Lite0 below 8 bits: where the goals stand" and
"Genie's generator on EfficientNet-Lite0"; the GPU script's `recipes` part runs it.

The synthesis recipes on a real ImageNet network (EfficientNet-Lite0/1/2): diversity measures
(sample spread relative to real photos', classes predicted out of 1000, pixels outside the valid
range) and, per bit setting, fidelity to FP32 (top-1 agreement, mean KL) on held-out crops of
scikit-image's photos after min/max calibration -- and optionally after reconstruction (a named
preset, e.g. Genie's full schedule on a GPU). Real-photo calibration uses the other half of the
photos; Gaussian noise is measured in the same run.

    python studies/effnet_recipes.py --samples 32 --iterations 100                        (CPU, ~25 min)
    python studies/effnet_recipes.py --device cuda --samples 256 --iterations 500 \\
        --reconstruction genie --recon-iterations 20000 --json effnet.json              (GPU)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from safetensors.torch import load_file, save_file  # noqa: E402
from synthesis_recipes import recipe_config  # noqa: E402

from dsg_ext import quantization as quant  # noqa: E402
from dsg_ext.data import calibration, photos  # noqa: E402
from dsg_ext.evaluation import fidelity  # noqa: E402
from dsg_ext.models import load_model  # noqa: E402
from dsg_ext.quantization import parse_bits  # noqa: E402
from dsg_ext.synthesis import synthesize  # noqa: E402
from dsg_ext.synthesis.diversity import diversity  # noqa: E402


def photo_sets(spec, samples, eval_crops=8):
    """The held-out crops every EfficientNet study measures fidelity on (``eval_crops`` per photo of
    the odd-numbered scikit-image photos) and up to ``samples`` real-photo calibration crops (from the
    even-numbered ones; None when ``samples`` is 0)."""
    names = list(photos.SKIMAGE_PHOTOS)
    return (photos.photo_crops(spec, eval_crops, names[1::2], seed=1),
            photos.photo_crops(spec, 8, names[::2], seed=2)[:samples] if samples else None)


def synthetic_images(model_name, fp, spec, recipe, samples, batch, iterations, seed, device="cpu", cache=None):
    """``samples`` images of a synthesis recipe (``synthesis_recipes.recipe_config``) for ``fp``, reused
    from ``cache`` (a directory) when a run with the same settings saved them there. Returns the
    images and the synthesis seconds (None when they were loaded)."""
    key = f"{model_name}-{recipe}-n{samples}-b{batch}-it{iterations}-s{seed}"
    cached = os.path.join(cache, re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".safetensors") if cache else None
    if cached and os.path.exists(cached):
        print(f"loaded {recipe} from {cached}", flush=True)
        return load_file(cached)["images"], None
    config = recipe_config(recipe, iterations, batch, seed, spec.image_size, spec.channels)
    t = time.perf_counter()
    images = synthesize(fp, config, samples, device=device, input_range=spec.valid_range())
    seconds = time.perf_counter() - t
    print(f"synthesised {recipe} (seed {seed}): {seconds:.0f} s", flush=True)
    if cached:
        os.makedirs(cache, exist_ok=True)
        save_file({"images": images.detach().cpu().contiguous()}, cached)
    return images, seconds


def add_single_setting_args(p, recipe="recommended"):
    """The options of the one-bit-setting EfficientNet studies (reconstruction_gap.py, hard_samples.py):
    the model, one synthesis recipe and its schedule, one bit setting, one reconstruction schedule."""
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--recipe", default=recipe)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--iterations", type=int, default=100, help="synthesis iterations")
    p.add_argument("--bits", default="W6A6", help="one bit setting")
    p.add_argument("--reconstruction", default="recommended")
    p.add_argument("--recon-iterations", type=int, default=200)
    p.add_argument("--recon-lr", type=float, default=0.05)
    p.add_argument("--cache", default=None, help="directory for the synthetic images (reused by later runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)


def calibrate_and_reconstruct(fp, qconfig, images, preset=None, iterations=None, lr=None, device="cpu"):
    """``fp`` quantized with ``qconfig`` and calibrated (min/max) on ``images``, weights finalized; with a
    reconstruction ``preset``, also a copy of the calibrated model reconstructed on the same images and
    the seconds that took. Returns (calibrated, reconstructed or None, seconds or None)."""
    q = quant.quantize_model(fp, qconfig, images[:2].to(device))
    quant.calibrate(q, images, device=device)
    qr = seconds = None
    if preset:
        qr = copy.deepcopy(q)
        fields = {k: v for k, v in (("iterations", iterations), ("lr", lr)) if v}
        t = time.perf_counter()
        quant.reconstruct(qr, fp, images, quant.AdaRoundConfig.from_preset(preset, **fields), device=device,
                          progress=False)
        seconds = time.perf_counter() - t
    quant.finalize_weights(q)
    return q, qr, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--recipes", default="recommended,paper-dsg,zeroq")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iterations", type=int, default=100, help="synthesis iterations")
    p.add_argument("--bits", default="W8A8,W6A6,W4A8,W4A4")
    p.add_argument("--observer", default="minmax")
    p.add_argument("--weight-observer", default="minmax")
    p.add_argument("--bias-correction", action="store_true",
                   help="also measure each cell after empirical bias correction on the same source")
    p.add_argument("--reconstruction", default=None, help="a named reconstruction, run on every source and bit setting")
    p.add_argument("--recon-iterations", type=int, default=None)
    p.add_argument("--recon-lr", type=float, default=None, help="rounding learning rate (default: the preset's)")
    p.add_argument("--skip-sources", default="", help="comma-separated: 'real photos', 'noise' (not run)")
    p.add_argument("--cache", default=None, help="a directory: synthetic images are saved there and reused by "
                   "later runs with the same model, recipe, samples, batch, iterations and seed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    loaded = load_model(args.model)
    spec = loaded.input
    fp = loaded.model.to(args.device)
    eval_x, real = photo_sets(spec, args.samples)
    eval_x = eval_x.to(args.device)
    sources = {"real photos": real, "noise": calibration.gaussian_noise(spec, args.samples, args.seed)}
    measured = {"real photos": diversity(loaded, sources["real photos"], device=args.device)}
    real_spread = measured["real photos"]["relative_sample_spread_mean"]
    if args.skip_sources:
        for name in args.skip_sources.split(","):
            sources.pop(name, None)
    timings = {}
    for name in filter(None, args.recipes.split(",")):
        sources[name], seconds = synthetic_images(args.model, fp, spec, name, args.samples, args.batch,
                                                  args.iterations, args.seed, args.device, args.cache)
        if seconds is not None:
            timings[name] = seconds
    rows = []
    for name, images in sources.items():
        d = measured.get(name) or diversity(loaded, images, device=args.device)
        row = {"source": name, "spread": d["relative_sample_spread_mean"],
               "spread_vs_photos": d["relative_sample_spread_mean"] / real_spread,
               "classes": d["classes_predicted"], "outside": d["pixels_outside_valid_range"],
               "synthesis_s": timings.get(name), "bits": {}}
        for wbits, abits in parse_bits(args.bits):
            q, qr, seconds = calibrate_and_reconstruct(
                fp, quant.QuantConfig(wbits=wbits, abits=abits, observer=args.observer,
                                      weight_observer=args.weight_observer),
                images, args.reconstruction, args.recon_iterations, args.recon_lr, args.device)
            cell = {}
            if qr is not None:
                cell["reconstruction_s"] = seconds
                cell["reconstructed"] = fidelity(fp, qr, eval_x)
                if args.bias_correction:
                    quant.correct_bias(qr, fp, images, device=args.device)
                    cell["reconstructed_bias_corrected"] = fidelity(fp, qr, eval_x)
            cell["calibration"] = fidelity(fp, q, eval_x)
            if args.bias_correction:
                quant.correct_bias(q, fp, images, device=args.device)
                cell["bias_corrected"] = fidelity(fp, q, eval_x)
            row["bits"][f"W{wbits}A{abits}"] = cell
            recon = cell.get("reconstructed")
            print(f"{name:12s} W{wbits}A{abits}: calibration {cell['calibration']['top1_agreement']:.1f}% "
                  f"(KL {cell['calibration']['mean_kl']:.3f})"
                  + (f", {args.reconstruction} {recon['top1_agreement']:.1f}% (KL {recon['mean_kl']:.3f}, "
                     f"{cell['reconstruction_s']:.0f} s)"
                     if recon else "")
                  + (f", bias-corrected {cell['bias_corrected']['top1_agreement']:.1f}% "
                     f"(KL {cell['bias_corrected']['mean_kl']:.3f})" if "bias_corrected" in cell else "")
                  + (f", reconstructed + bias-corrected {cell['reconstructed_bias_corrected']['top1_agreement']:.1f}% "
                     f"(KL {cell['reconstructed_bias_corrected']['mean_kl']:.3f})"
                     if "reconstructed_bias_corrected" in cell else ""), flush=True)
        rows.append(row)
        print(f"| {name} | spread {row['spread']:.3f} ({row['spread_vs_photos']:.2f}x photos) | "
              f"{row['classes']} classes of 1000 | {100 * row['outside']:.1f}% pixels outside |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "eval_crops": int(eval_x.shape[0]), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
