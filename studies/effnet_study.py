"""Produced docs/results.md, "Earlier demo measurements" (the EfficientNet-Lite0 W4A4 reading) and the
dated entry "EfficientNet-Lite0 (real ImageNet weights)" of docs/results/log.md.

EfficientNet-Lite0 (real ImageNet weights): does synthetic calibration beat noise at W4A4?

Synthesises small ZeroQ / DSG datasets (paper recipes, plus DSG with our recipe options), then
quantizes W4A4 (first and last layer 8-bit) calibrated on each source and measures the fidelity
to FP32 -- top-1 agreement and mean KL -- on crops of real photos (scikit-image's sample images;
no ImageNet labels exist offline). Real-photo calibration uses a disjoint half of the photos.

    python studies/effnet_study.py --out /tmp/effnet --samples 32 --iterations 100    (~20 min, 2 CPU cores)
"""

import argparse
import json
import os
import time

from dsg_ext import data as pipeline
from dsg_ext import quantization as quantize
from dsg_ext.evaluation import fidelity
from dsg_ext.models import load_model
from dsg_ext.synthesis import SynthesisConfig, generate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/effnet_study")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--observers", default="minmax,mse")
    args = ap.parse_args()
    t0 = time.time()
    loaded = load_model("efficientnet-lite0")
    fp = loaded.model.to(args.device)
    photos = list(pipeline.SKIMAGE_PHOTOS)
    calib_photos, eval_photos = photos[::2], photos[1::2]
    eval_x = pipeline.photo_crops(loaded.input, 8, eval_photos, seed=1)
    sources = {
        "real_photos": pipeline.photo_crops(loaded.input, 8, calib_photos, seed=2)[: args.samples],
        "noise": pipeline.gaussian_noise(loaded.input, args.samples),
    }
    recipes = {
        "zeroq": SynthesisConfig(method="zeroq"),
        "dsg": SynthesisConfig(method="dsg"),
        "dsg_tuned": SynthesisConfig(method="dsg", lr=0.1, clamp_pixels=True, layer_weighting="initial"),
    }
    synth_info = {}
    for name, cfg in recipes.items():
        cfg.iterations, cfg.batch_size = args.iterations, args.samples
        t = time.time()
        m = generate("efficientnet-lite0", os.path.join(args.out, name), cfg, args.samples, device=args.device,
                     show_progress=False, image_size=None)
        s = m.get("summary", {})
        synth_info[name] = {"seconds": time.time() - t, "loss_start": s.get("layer_loss_initial_mean"),
                            "loss_end": s.get("layer_loss_final_mean")}
        sources[name] = pipeline.synthetic_calibration(os.path.join(args.out, name), loaded, args.samples)
        print(f"{name}: {synth_info[name]}", flush=True)
    rows = []
    example = eval_x[:1]
    for obs in args.observers.split(","):
        for name, images in sources.items():
            q = quantize.quantize_model(fp, quantize.QuantConfig(wbits=4, abits=4, observer=obs), example)
            quantize.calibrate(q, images, batch_size=16, device=args.device)
            quantize.finalize_weights(q)
            fid = fidelity(fp, q, eval_x, batch_size=32, device=args.device)
            rows.append({"observer": obs, "source": name, **fid})
            print(f"W4A4 {obs:7s} {name:12s} agreement {fid['top1_agreement']:6.2f}%  KL {fid['mean_kl']:.4f}", flush=True)
    result = {"eval_images": int(eval_x.shape[0]), "samples": args.samples, "iterations": args.iterations,
              "synthesis": synth_info, "rows": rows, "seconds": time.time() - t0}
    with open(os.path.join(args.out, "study.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
