"""Produced docs/results.md, "Why data-free reconstruction trails real photos".

Where does data-free reconstruction lose against real photos: overfitting to the calibration
images, or the wrong image distribution? Each model (calibrated, then reconstructed, on real photos
and on synthetic images) is measured against FP32 on four image sets: the photos and the synthetic
images it was calibrated on, held-out photos, and fresh synthetic images (another seed). A model
that fits its own images but not fresh ones of the same kind overfits; one that does as well on
fresh synthetic images as on its own but not on photos has learnt the synthetic distribution.

    python studies/reconstruction_gap.py --bits W6A6 --cache /tmp/effcache          (CPU, ~35 min)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from effnet_recipes import (  # noqa: E402
    add_single_setting_args,
    calibrate_and_reconstruct,
    photo_sets,
    synthetic_images,
)

from dsg_ext import quantization as quant  # noqa: E402
from dsg_ext.evaluation import fidelity  # noqa: E402
from dsg_ext.models import load_model  # noqa: E402
from dsg_ext.quantization import parse_bits  # noqa: E402

SETS = ("own calibration images", "held-out photos", "fresh synthetic")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_single_setting_args(p)
    p.add_argument("--eval-crops", type=int, default=8, help="crops per held-out photo")
    args = p.parse_args(argv)
    (wbits, abits), = parse_bits(args.bits)
    loaded = load_model(args.model)
    spec = loaded.input
    fp = loaded.model.to(args.device)
    held_out, real = photo_sets(spec, args.samples, args.eval_crops)
    fresh, _ = synthetic_images(args.model, fp, spec, args.recipe, args.samples, args.batch, args.iterations,
                                args.seed + 1, args.device, args.cache)
    sources = {"real photos": real}
    sources[args.recipe], _ = synthetic_images(args.model, fp, spec, args.recipe, args.samples, args.batch,
                                               args.iterations, args.seed, args.device, args.cache)
    rows = []
    print(f"| calibration source | stage | {' | '.join(SETS)} |  (W{wbits}A{abits}: agreement % / KL to FP32; "
          f"{held_out.shape[0]} held-out crops, {fresh.shape[0]} fresh synthetic images)")
    for source, images in sources.items():
        q, qr, seconds = calibrate_and_reconstruct(fp, quant.QuantConfig(wbits=wbits, abits=abits), images,
                                                   args.reconstruction, args.recon_iterations, args.recon_lr,
                                                   args.device)
        for stage, model in (("calibrated", q), (f"{args.reconstruction} reconstruction", qr)):
            cells = {}
            for name, x in zip(SETS, (images, held_out, fresh)):
                cells[name] = fidelity(fp, model, x.to(args.device), device=args.device)
            rows.append({"source": source, "stage": stage, "sets": cells,
                         "reconstruction_s": seconds if stage != "calibrated" else None})
            print(f"| {source} | {stage} | " + " | ".join(
                f"{c['top1_agreement']:.1f} / {c['mean_kl']:.3f}" for c in cells.values()) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "held_out_crops": int(held_out.shape[0]), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
