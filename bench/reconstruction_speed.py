"""Reconstruction speed: the plain PyTorch loop (BRECQ's way: batch indices drawn on the host each
iteration) against our engines -- ``device`` (no host sync per iteration) and ``graph`` (that step
replayed from a CUDA graph, CUDA only) -- same model, same schedule (a named reconstruction preset,
default Genie's: blocks, QDrop 0.5, LSQ steps and weight scales learned with the rounding), same run.

Images are Gaussian noise in the model's input space: the time of an iteration does not depend on what
the images show. ``--loop-iterations`` may give the plain loop a shorter schedule than the engines (its
time per iteration is what is compared; the full schedule is projected from it and labelled so).
When the loop and an engine run the same iterations, the share of weights rounded alike is printed:
the engines run the same batches and schedule, so it should be 100% (CPU) or within float noise (graph).

    python bench/reconstruction_speed.py --iterations 200                                     (CPU, ~4 min)
    python bench/reconstruction_speed.py --device cuda --model efficientnet-lite0 --images 1024 \\
        --iterations 20000 --loop-iterations 500 --engines loop,graph --json speed.json     (GPU)

``--model resnet18`` is torchvision's architecture with random weights (no weights can be downloaded
here; the speed is the same).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dsg_ext import quantization as quant  # noqa: E402
from dsg_ext.data import calibration  # noqa: E402
from dsg_ext.models import load_model  # noqa: E402
from dsg_ext.models.spec import InputSpec  # noqa: E402
from dsg_ext.quantization import parse_bits  # noqa: E402


def model_and_spec(name: str):
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(weights=None).eval(), InputSpec(3, 224)
    loaded = load_model(name)
    return loaded.model.eval(), loaded.input


def run_engine(qmodel, fp, images, config, device: str):
    q = copy.deepcopy(qmodel)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    records = quant.reconstruct(q, fp, images, config, device=device, progress=False)
    wall = time.perf_counter() - t0
    loop_s = sum(r["seconds"] for r in records)
    ints = torch.cat([w.w_int.flatten().float().cpu() for w in quant.weight_quantizers(q).values()])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"engine": records[0]["engine"], "iterations": config.iterations, "units": len(records), "wall_s": wall,
            "loop_s": loop_s, "outside_loop_s": wall - loop_s,
            "ms_per_iteration": 1000 * loop_s / (config.iterations * len(records)), "peak_gib": peak,
            "kept_adaround": sum(r["kept"] == "adaround" for r in records)}, ints


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fashion-mnist-resnet20")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--bits", default="W4A4")
    p.add_argument("--preset", default="genie", help="a named reconstruction (its schedule and options)")
    p.add_argument("--iterations", type=int, default=200, help="iterations per unit for the engines")
    p.add_argument("--loop-iterations", type=int, default=None, help="iterations per unit for the plain loop "
                   "(default: --iterations)")
    p.add_argument("--full-iterations", type=int, default=20000, help="the schedule projected from ms/iteration")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    p.add_argument("--engines", default=None, help="comma list of loop,device,graph (default: loop,device[,graph])")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    engines = (args.engines or ("loop,device,graph" if on_cuda else "loop,device")).split(",")
    ((wbits, abits),) = parse_bits(args.bits)
    fp, spec = model_and_spec(args.model)
    fp = fp.to(args.device)
    images = calibration.gaussian_noise(spec, args.images, args.seed)
    qconfig = quant.QuantConfig(wbits=wbits, abits=abits, observer="minmax")
    qmodel = quant.quantize_model(fp, qconfig, images[:2].to(args.device))
    quant.calibrate(qmodel, images, device=args.device)
    base = quant.AdaRoundConfig.from_preset(args.preset, seed=args.seed,
                                            **({"batch_size": args.batch} if args.batch else {}))
    card = torch.cuda.get_device_name() if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}, {args.images} images {spec.image_size}px, {args.bits}, preset {args.preset} "
          f"(batch {base.batch_size}, qdrop {base.qdrop}, LSQ {base.learn_act_scale}, weight scales "
          f"{base.learn_weight_scale}); {card}; torch {torch.__version__}")
    rows, ints = [], {}
    for engine in engines:
        iters = args.loop_iterations if engine == "loop" and args.loop_iterations else args.iterations
        config = quant.AdaRoundConfig(**{**base.__dict__, "iterations": iters, "engine": engine})
        row, ints[engine] = run_engine(qmodel, fp, images, config, args.device)
        rows.append(row)
        print(f"  {engine:6s} {iters:6d} it x {row['units']} units: {row['wall_s']:8.1f} s "
              f"({row['outside_loop_s']:.1f} s outside the loops: unit inputs, targets, nearest vs learned), {row['ms_per_iteration']:.3f} ms/iteration", flush=True)
    loop = next((r for r in rows if r["engine"] == "loop"), None)
    print(f"\n| engine | ms / iteration | speed-up vs plain loop | {args.full_iterations} it x units, projected |"
          "\n|---|---|---|---|")
    for r in rows:
        speedup = loop["ms_per_iteration"] / r["ms_per_iteration"] if loop else float("nan")
        full_s = r["outside_loop_s"] + r["ms_per_iteration"] * args.full_iterations * r["units"] / 1000
        r["speedup_vs_loop"], r["full_schedule_s"] = speedup, full_s
        measured = "measured" if r["iterations"] == args.full_iterations else "projected"
        print(f"| {r['engine']} | {r['ms_per_iteration']:.3f} | {speedup:.2f}x | {full_s / 60:.1f} min ({measured}) |")
    agreement = {}
    for r in rows:
        if loop and r is not loop and r["iterations"] == loop["iterations"]:
            agreement[r["engine"]] = float((ints[r["engine"]] == ints["loop"]).float().mean())
            print(f"weights rounded as by the plain loop, {r['engine']}: {100 * agreement[r['engine']]:.3f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "card": card, "torch": torch.__version__, "rows": rows,
                       "agreement_with_loop": agreement}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
