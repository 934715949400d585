"""Synthesis time per image and iteration against the batch size, same model, same recipe, same run: is a
small batch (``dsg generate``'s default, 32) slower per image than one large batch (``dsg demo``'s 256)?
Each batch size runs ``--iterations`` steps after ``--warmup`` (not timed); the figure is the median of
``--repeats`` rounds, batch sizes interleaved. Issue 40 item 6.

    python bench/synthesis_batch.py --model fashion-mnist-resnet20 --batches 32,64,128,256   (~3 min)
    python bench/synthesis_batch.py --model efficientnet-lite0 --batches 8,16,32 --recipe recommended

Print ``lscpu``'s model name and flags with the table (the script does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from onnx_latency import cpu_line  # noqa: E402

from dsg_ext.models import load_model  # noqa: E402
from dsg_ext.synthesis import SynthesisConfig, synthesize_batch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="fashion-mnist-resnet20")
    p.add_argument("--recipe", default=None, help="a synthesis recipe (default: dsg generate's own defaults)")
    p.add_argument("--batches", default="32,256", help="comma list of batch sizes")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    sizes = [int(b) for b in args.batches.split(",")]
    loaded = load_model(args.model)
    fields = {"image_size": loaded.input.image_size, "channels": loaded.input.channels}
    valid = loaded.input.valid_range()  # the pixel range (recipes with clamp_pixels)
    times = {b: [] for b in sizes}
    for _ in range(args.repeats):
        for b in sizes:
            def make(n, b=b):
                if args.recipe:
                    return SynthesisConfig.from_recipe(args.recipe, batch_size=b, iterations=n, **fields)
                return SynthesisConfig(batch_size=b, iterations=n, **fields)

            synthesize_batch(loaded.model, make(args.warmup), 0, input_range=valid)
            start = time.perf_counter()
            synthesize_batch(loaded.model, make(args.warmup + args.iterations), 0, input_range=valid)
            long = time.perf_counter() - start
            start = time.perf_counter()
            synthesize_batch(loaded.model, make(args.warmup), 0, input_range=valid)
            short = time.perf_counter() - start
            times[b].append(max(long - short, 1e-9) / (args.iterations * b) * 1e3)  # the set-up cancels
    print(cpu_line(), f"torch threads {torch.get_num_threads()}")
    print(f"{args.model}, recipe {args.recipe or 'default (dsg)'}: ms per image-iteration (median of {args.repeats})")
    print("| batch | ms per image-iteration | vs the largest batch |")
    print("|---|---|---|")
    med = {b: statistics.median(t) for b, t in times.items()}
    best = med[max(sizes)]
    for b in sizes:
        print(f"| {b} | {med[b]:.3f} | {med[b] / best:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_line(), "model": args.model, "recipe": args.recipe, "ms_per_image_iteration": med},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
