"""Produced docs/results.md, "The demo's W4A4 recommended row: seed spread".

Is a change of the demo's W4A4 ``recommended`` row (whole Fashion-MNIST test set) a change of the
recipe or its seed spread? The demo's row (256 images of ``--recipe recommended`` at 150 iterations,
W4A4 min/max calibration, then the recommended reconstruction at 80 iterations per block) for several
seeds, with today's recipe and with the recipe as it ran before 2026-12-07 (augmentation drawn on the
host, contiguous memory: ``augment_rng="host"``, ``channels_last=False``), in one run.

    python studies/demo_seed_spread.py --seeds 0,1,2,3 --json spread.json          (CPU, ~15 min)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from dsg_ext import quantization as quant
from dsg_ext.data import calibration, fashion_mnist
from dsg_ext.demo import DemoConfig, measure_cell
from dsg_ext.evaluation import topk_accuracy
from dsg_ext.models import load_model
from dsg_ext.synthesis import SynthesisConfig, generate

MODEL = "fashion-mnist-resnet20"
VARIANTS = {"today": {}, "before 2026-12-07": {"augment_rng": "host", "channels_last": False}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3", help="comma list of seeds")
    p.add_argument("--eval-samples", type=int, default=10000, help="first N test images (10000 = all)")
    p.add_argument("--samples", type=int, default=DemoConfig.samples)
    p.add_argument("--synth-iters", type=int, default=DemoConfig.synth_iterations)
    p.add_argument("--adaround-iters", type=int, default=DemoConfig.adaround_iterations)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    fp = load_model(MODEL).model
    test_u8, test_y = fashion_mnist.load_split(train=False)
    test_x = fashion_mnist.preprocess(test_u8[: args.eval_samples])
    test_y = test_y[: args.eval_samples]
    def accuracy(model) -> float:
        return topk_accuracy(model, test_x, test_y, batch_size=500)[0]

    rows = []
    print(f"W4A4, {test_x.shape[0]} test images: top-1 plain calibration / reconstruction")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            for seed in seeds:
                cfg = DemoConfig(samples=args.samples, synth_iterations=args.synth_iters,
                                 adaround_iterations=args.adaround_iters, seed=seed)
                sconf = SynthesisConfig.from_recipe("recommended", iterations=cfg.synth_iterations,
                                                    batch_size=min(cfg.synth_batch, cfg.samples), seed=seed,
                                                    **VARIANTS[variant])
                out = os.path.join(tmp, f"{variant.replace(' ', '_')}-{seed}")
                t = time.perf_counter()
                generate(MODEL, out, sconf, cfg.samples, show_progress=False, image_size=None)
                images = calibration.synthetic_calibration(out, load_model(MODEL), cfg.samples)
                ada = quant.AdaRoundConfig.from_preset(cfg.reconstruction, iterations=cfg.adaround_iterations,
                                                       seed=seed)
                cell = measure_cell(fp, quant.QuantConfig(wbits=4, abits=4, observer=cfg.observer), "recommended",
                                    images, images[:2], ada, cfg, accuracy)
                plain, recon = cell["calibration"], cell["adaround"]
                rows.append({"variant": variant, "seed": seed, "calibration": plain, "reconstruction": recon,
                             "seconds": time.perf_counter() - t})
                print(f"{variant:18s} seed {seed}: {plain:.2f} / {recon:.2f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    for variant in dict.fromkeys(r["variant"] for r in rows):
        got = [r for r in rows if r["variant"] == variant]
        for key in ("calibration", "reconstruction"):
            vals = [r[key] for r in got]
            spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
            print(f"{variant:18s} {key:15s} mean {statistics.mean(vals):.2f}  sd {spread:.2f}  "
                  f"range {min(vals):.2f}..{max(vals):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"eval_images": int(test_x.shape[0]), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
