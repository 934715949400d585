"""How finely does the fidelity measure resolve weight quantization? Each weight layer alone, then
all of them, fake-quantized per output channel (asymmetric min/max, torch's own
``fake_quantize_per_channel_affine``, nothing of ours but the model and the crops), measured against
FP32 on the held-out crops of the scikit-image photos that effnet_recipes.py uses. A sanity row at
16 bits must agree fully.

    python bench/weight_sensitivity.py --bits 8                (EfficientNet-Lite0, CPU, ~10 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

from dsg_ext.data import photos
from dsg_ext.evaluation import fidelity
from dsg_ext.models import load_model


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    flat = w.detach().flatten(1)
    lo, hi = flat.min(1).values.clamp(max=0), flat.max(1).values.clamp(min=0)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp(min=1e-12)
    zero = torch.round(-lo / scale).clamp(0, 2 ** bits - 1).int()
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, 0, 2 ** bits - 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--eval-crops", type=int, default=8, help="crops per held-out photo")
    p.add_argument("--top", type=int, default=15, help="layers printed, most sensitive first")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    loaded = load_model(args.model)
    fp, spec = loaded.model, loaded.input
    eval_x = photos.photo_crops(spec, args.eval_crops, list(photos.SKIMAGE_PHOTOS)[1::2], seed=1)
    layers = [n for n, m in fp.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]

    def measure(names, bits):
        model = copy.deepcopy(fp)
        modules = dict(model.named_modules())
        with torch.no_grad():
            for n in names:
                modules[n].weight.copy_(fake_quant_weight(modules[n].weight, bits))
        return fidelity(fp, model, eval_x)

    whole = {"all layers": measure(layers, args.bits), "all layers, 16-bit": measure(layers, 16)}
    single = sorted(({"layer": n, **measure([n], args.bits)} for n in layers), key=lambda r: -r["mean_kl"])
    print(f"{eval_x.shape[0]} crops, {len(layers)} weight layers, {args.bits}-bit weights, activations float")
    for name, f in whole.items():
        print(f"| {name} | {f['top1_agreement']:.2f} | {f['mean_kl']:.5f} |")
    for r in single[: args.top]:
        print(f"| {r['layer']} alone | {r['top1_agreement']:.2f} | {r['mean_kl']:.5f} |")
    below = sum(r["top1_agreement"] < 100 for r in single)
    print(f"{below} of {len(layers)} layers alone change a top-1; sum of their KLs "
          f"{sum(r['mean_kl'] for r in single):.5f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "crops": int(eval_x.shape[0]), "whole": whole, "single": single}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
