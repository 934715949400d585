"""Every fused op against plain PyTorch (and torch.compile of it) on this machine, as one table of
ratios and ratios to the memory floor (was `dsg bench`; benchmarks are not part of the package).

    python bench/run.py [--device cuda] [--size cpu|gpu|tiny] [--no-compile] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
import workloads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=tuple(workloads.SHAPES), default=None,
                        help="problem sizes: 'gpu' = the H100 goal shapes (default on cuda), 'cpu' = smaller")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines (faster)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/run.py: --device cuda but no GPU is available", file=sys.stderr)
        return 2
    size = args.size or ("gpu" if args.device == "cuda" else "cpu")
    wls = workloads.make_workloads(args.device, size, compile_plain=not args.no_compile)
    wls += workloads.synthesis_workloads(args.device, size)
    wls += workloads.adaround_layer_workloads(args.device, size)
    timer = workloads.time_cuda if args.device == "cuda" else workloads.time_cpu
    bandwidth = workloads.copy_bandwidth(args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"device: {args.device} ({device_name}), threads: {torch.get_num_threads()}, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    header = f"{'workload':42s} {'shape':20s} {'impl':15s} {'median ms':>10s} {'vs dsg_ext':>10s} {'x floor':>8s}"
    print(header)
    print("-" * len(header))
    rows = []
    for wl in wls:
        floor = wl.bytes_moved / bandwidth
        times = {name: timer(fn) for name, fn in wl.impls.items()}
        for name, t in times.items():
            to_floor = t / floor if floor else None
            rows.append({"workload": wl.name, "shape": wl.description, "impl": name, "median_s": t,
                         "ratio_to_dsg_ext": t / times["dsg_ext"], "ratio_to_floor": to_floor})
            print(f"{wl.name:42s} {wl.description:20s} {name:15s} {t * 1e3:10.3f} "
                  f"{t / times['dsg_ext']:9.2f}x " + (f"{to_floor:7.2f}x" if to_floor else "      -"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "device_name": device_name, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "copy_bandwidth_Bps": bandwidth, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
