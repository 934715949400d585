"""GPTQ (second-order one-shot rounding) speed on a whole network, the way it was beside the way it is, same
quantized model, same images, same run: ``replay`` replays the model's prefix for every layer's inputs (the
way before 2026-12-08); ``blocks`` captures a block's inputs once and runs the block alone per layer (a chain
of blocks takes the previous block's outputs). Both must round every weight alike (printed).

Images are Gaussian noise (the BN statistics are gathered on them first): GPTQ's time does not depend on what
the images show. Torchvision architectures with random weights (nothing can be downloaded here).

    python bench/gptq_speed.py --model resnet50 --size 224 --images 128             # the issue's yardstick
    python bench/gptq_speed.py --model resnet50 --size 224 --images 32 --ways replay,blocks

Print ``lscpu``'s model name and flags with the table (the script does).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time

import torch

from dsg_ext import quantization as quant
from dsg_ext.export.x86_kernels import cpu_info, describe_cpu

WAYS = ("replay", "blocks")


def build(name: str, size: int, images: int, seed: int = 0):
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(num_classes=10)
    x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    for bn in model.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None
    with torch.no_grad():
        for i in range(0, images, 32):
            model.train()(x[i:i + 32])
    return model.eval(), x


def run(qmodel, images, way: str, batch: int):
    units = importlib.import_module("dsg_ext.quantization.algorithms.units")
    q = copy.deepcopy(qmodel)
    forwards = []
    q.register_forward_pre_hook(lambda *_: forwards.append(1))
    original = units.find_blocks
    if way == "replay":
        units.find_blocks = lambda _qmodel: []
    try:
        start = time.perf_counter()
        records = quant.gptq(q, images, quant.GptqConfig(batch_size=batch), progress=False, log=lambda _line: None)
        seconds = time.perf_counter() - start
    finally:
        units.find_blocks = original
    ints = {n: wq.w_int.clone() for n, wq in quant.weight_quantizers(q).items()}
    return {"way": way, "seconds": seconds, "model_forwards": len(forwards), "layers": len(records),
            "layer_seconds": sum(r["seconds"] for r in records)}, ints


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50", help="a torchvision classification architecture")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="images per forward (GptqConfig.batch_size)")
    parser.add_argument("--wbits", type=int, default=4)
    parser.add_argument("--target", default=None, help="a quantize target (onnxruntime) instead of the paper's setup")
    parser.add_argument("--ways", default="blocks", help=f"comma list of {', '.join(WAYS)}")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    ways = args.ways.split(",")
    if not set(ways) <= set(WAYS):
        print(f"gptq_speed: --ways takes {', '.join(WAYS)}", file=sys.stderr)
        return 2
    info = cpu_info()
    print(f"CPU: {describe_cpu(info)}, flags: {' '.join(info['flags'])}; torch threads {torch.get_num_threads()}")
    model, images = build(args.model, args.size, args.images)
    config = (quant.QuantConfig.for_target(args.target, wbits=args.wbits, abits=8) if args.target
              else quant.QuantConfig(wbits=args.wbits, abits=8))
    start = time.perf_counter()
    qmodel = quant.quantize_model(model, config, example=images[:1])
    quant.calibrate(qmodel, images)
    prepare_s = time.perf_counter() - start
    rows, ints = [], {}
    for way in ways:
        row, ints[way] = run(qmodel, images, way, args.batch)
        rows.append(row)
    same = None
    if len(ints) == 2:
        a, b = ints.values()
        same = sum(int((a[n] == b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)
    print(f"{args.model} at {args.size} px, {args.images} images, W{args.wbits} (quantize + calibrate {prepare_s:.1f} s)")
    print("| way | seconds | model forwards | layers |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['way']} | {r['seconds']:.1f} | {r['model_forwards']} | {r['layers']} |")
    if same is not None:
        seconds = {r["way"]: r["seconds"] for r in rows}
        print(f"weights rounded alike: {100 * same:.3f}%; blocks {seconds['replay'] / seconds['blocks']:.2f}x "
              "faster than replay")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": describe_cpu(info), "model": args.model, "size": args.size, "images": args.images,
                       "rows": rows, "same": same}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
