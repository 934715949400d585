"""Produced docs/results.md, "Why data-free reconstruction trails real photos" (what the agreement
measure resolves).

How finely does the fidelity measure resolve weight quantization? Each weight layer alone, then
all of them, fake-quantized per output channel (asymmetric min/max, torch's own
``fake_quantize_per_channel_affine``, nothing of ours but the model and the crops), measured against
FP32 on the held-out crops of the scikit-image photos that effnet_recipes.py uses. A sanity row at
16 bits must agree fully.

    python studies/weight_sensitivity.py --bits 8                (EfficientNet-Lite0, CPU, ~10 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from effnet_recipes import photo_sets  # noqa: E402

from dsg_ext.evaluation import fidelity  # noqa: E402
from dsg_ext.models import load_model  # noqa: E402


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
    eval_x, _ = photo_sets(spec, 0, args.eval_crops)
    work = copy.deepcopy(fp)  # rounded in place, layer by layer; fp stays the FP32 reference
    modules = {n: m for n, m in work.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    layers = list(modules)

    def measure(names, bits):
        """Fidelity with these layers' weights rounded; their FP32 weights are put back after."""
        saved = {n: modules[n].weight.detach().clone() for n in names}
        try:
            with torch.no_grad():
                for n in names:
                    modules[n].weight.copy_(fake_quant_weight(saved[n], bits))
            return fidelity(fp, work, eval_x)
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    modules[n].weight.copy_(w)

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
