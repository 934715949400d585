"""Produced docs/results.md, "Earlier demo measurements" (the EfficientNet-Lite0 reading) and
"AdaRound examined layer by layer" in docs/results/log.md.

AdaRound one layer at a time on EfficientNet-Lite0 (real ImageNet weights): reconstruction error of
nearest rounding vs AdaRound's hard rounding, on the calibration images and on held-out real-photo
crops, for several schedule lengths. The rest of the network stays nearest-rounded.

    python studies/adaround_layer_study.py --calib DIR --layers 1,2,4,7,10,19 --iterations 50,200,800
    (DIR: a `dsg generate --model efficientnet-lite0` dataset; ~25 min on 2 CPU cores for the above)
"""

import argparse
import copy
import json
import time

import torch

from dsg_ext import data as P
from dsg_ext import quantization as Q
from dsg_ext.models import load_model
from dsg_ext.quantization.algorithms.reconstruct import unit_inputs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", required=True, help="a dsg generate directory made for efficientnet-lite0")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--layers", default="1,2,4,7,10,19", help="indices in execution order")
    ap.add_argument("--iterations", default="50,200,800")
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    loaded = load_model("efficientnet-lite0")
    fp = loaded.model
    held_out = P.photo_crops(loaded.input, 8, list(P.SKIMAGE_PHOTOS)[1::2], seed=1)[: args.samples]
    calib = P.synthetic_calibration(args.calib, loaded, args.samples)
    base = Q.quantize_model(fp, Q.QuantConfig(4, 4, observer="mse"), held_out[:1])
    Q.calibrate(base, calib, batch_size=16)
    for k in (int(a) for a in args.layers.split(",")):
        name = base.dsg_quant_order[k]
        for its in (int(a) for a in args.iterations.split(",")):
            q = copy.deepcopy(base)
            t = time.time()
            (rec,) = Q.reconstruct(q, fp, calib, Q.AdaRoundConfig(iterations=its, batch_size=16, lr=args.lr,
                                                                keep_better=False), progress=False, layers=[name])
            layer, wq = q.get_submodule(name), Q.weight_quantizers(q)[name]
            x_fp = unit_inputs(fp, name, held_out, 16, "cpu")
            x_q = unit_inputs(q, name, held_out, 16, "cpu")
            with torch.no_grad():
                target = fp.get_submodule(name)(x_fp)
                held_ada = float(Q.reconstruction_loss(layer(x_q), target))
                wq.mode = Q.WeightMode.FAKE  # nearest rounding of the same weights
                held_nearest = float(Q.reconstruction_loss(layer(x_q), target))
                wq.mode = Q.WeightMode.INT
            print(json.dumps({"layer": name, "shape": list(layer.parametrizations.weight.original.shape),
                              "iterations": its, "calib_nearest": rec["rec_loss_nearest"],
                              "calib_adaround": rec["rec_loss_adaround"], "held_out_nearest": held_nearest,
                              "held_out_adaround": held_ada, "changed": rec["changed_vs_nearest"],
                              "undecided": rec["undecided"], "seconds": round(time.time() - t, 1)}), flush=True)


if __name__ == "__main__":
    main()
