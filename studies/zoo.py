"""The labelled zoo, family by family (issue 40; docs/networks.md): FP32 top-1 on the Fashion-MNIST test set,
our data-free W8A8 file, our W8A8 file calibrated on real training images, onnxruntime's own
``quantize_static`` file calibrated on the same images (ours and real), the integer share of each file
and its speed beside FP32 and onnxruntime's file -- all rows of one network in one run of
bench/onnx_latency.py, same CPU, same threads.

    python scripts/train_zoo.py                  # once per machine: trains and caches the networks
    python studies/zoo.py --out studies-out/zoo  # every trained network; resumes network by network

Per network, the data-free images are ``dsg generate --recipe recommended`` (``--samples`` images,
``--iterations`` per batch of ``--batch``), cached in OUT/NAME-data; each measurement is written to
OUT/NAME.json as soon as it is made, so a stopped run goes on where it stopped. The table (markdown) goes
to stdout and OUT/table.md, with the CPU line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from dsg_ext.models import zoo
from dsg_ext.synthesis import SynthesisConfig, generate

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "bench", "onnx_latency.py")


def _latency(name: str, weights, calib_args, rows: str, args) -> dict:
    """bench/onnx_latency.py's JSON for one network and calibration source."""
    out = os.path.join(args.out, f"{name}-{'real' if calib_args == ['--real'] else 'synthetic'}.json")
    command = [sys.executable, BENCH, "--model", f"zoo:{name}", *calib_args, "--rows", rows, "--samples",
               str(args.samples), "--eval", str(args.eval), "--threads", str(args.threads), "--repeat",
               str(args.repeat), "--json", out]
    if weights:
        command += ["--weights", weights]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sys.stderr.write(done.stdout)  # the bench's table, as it printed it
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}): {done.stdout[-2000:]}")
    with open(out) as f:
        return json.load(f)


def measure(name: str, args) -> dict:
    """One network's row, from OUT/NAME.json where already measured."""
    path = os.path.join(args.out, f"{name}.json")
    row = json.load(open(path)) if os.path.exists(path) else {"name": name, "family": zoo.ZOO[name].family}

    def save():
        with open(path + ".tmp", "w") as f:
            json.dump(row, f, indent=2)
        os.replace(path + ".tmp", path)

    weights = args.weights.format(name=name) if args.weights else None
    if "fp32_record" not in row:
        record = zoo.trained_metadata(name) if not weights else {}
        row["fp32_record"] = record or {}
        save()
    data = os.path.join(args.out, f"{name}-data")
    if "synthesis_s" not in row:
        config = SynthesisConfig.from_recipe("recommended", iterations=args.iterations, batch_size=args.batch)
        start = time.perf_counter()
        generate(f"zoo:{name}", data, config, args.samples, weights=weights, show_progress=False, image_size=None)
        row["synthesis_s"] = time.perf_counter() - start
        row["synthesis"] = {"recipe": "recommended", "samples": args.samples, "iterations": args.iterations,
                            "batch": args.batch}
        save()
    if "synthetic" not in row:
        row["synthetic"] = _latency(name, weights, ["--calib", data], "fp32,ort,deploy-w8a8", args)
        save()
    if "real" not in row:
        row["real"] = _latency(name, weights, ["--real"], "ort,deploy-w8a8", args)
        save()
    return row


def table(rows) -> str:
    """The markdown table of docs/networks.md."""
    lines = ["| network (family) | FP32 | ours W8A8 data-free | ours W8A8 real | ORT W8A8 on our images | "
             "ORT W8A8 real | QLinearConv / convs (float nodes) | ours vs FP32 / vs ORT, b32 img/s | b1 ms ours / FP32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        syn, real = row["synthetic"]["rows"], row["real"]["rows"]
        fp, ours, ort = syn["fp32"], syn["deploy-w8a8"], syn["ort"]
        lines.append(
            f"| {row['name']} ({row['family']}) | {fp['top1']:.2f} | {ours['top1']:.2f} | "
            f"{real['deploy-w8a8']['top1']:.2f} | {ort['top1']:.2f} | {real['ort']['top1']:.2f} | "
            f"{ours['qlinearconv']} / {ours['convs']} ({ours['float_nodes']}) | "
            f"{ours['throughput_img_s'] / fp['throughput_img_s']:.2f}x / "
            f"{ours['throughput_img_s'] / ort['throughput_img_s']:.2f}x | "
            f"{ours['latency_ms']:.2f} / {fp['latency_ms']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--networks", default=",".join(zoo.ZOO), help="comma list of zoo networks")
    parser.add_argument("--weights", help="weights file per network instead of the trained ones ({name} is "
                        "replaced): the smoke test's random weights")
    parser.add_argument("--samples", type=int, default=256, help="calibration images (synthetic and real)")
    parser.add_argument("--iterations", type=int, default=200, help="synthesis iterations per batch")
    parser.add_argument("--batch", type=int, default=64, help="synthesis batch")
    parser.add_argument("--eval", type=int, default=10000, help="Fashion-MNIST test images")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (1: repeatable on our VMs)")
    parser.add_argument("--repeat", type=int, default=30, help="timed rounds per speed figure")
    args = parser.parse_args(argv)
    names = args.networks.split(",")
    unknown = [n for n in names if n not in zoo.ZOO]
    if unknown:
        parser.error(f"not zoo networks: {unknown}")
    if not args.weights:
        untrained = [n for n in names if zoo.trained_metadata(n) is None]
        if untrained:
            parser.error(f"not trained on this machine: {untrained} (python scripts/train_zoo.py {' '.join(untrained)})")
    os.makedirs(args.out, exist_ok=True)
    rows = [measure(name, args) for name in names]
    text = table(rows)
    cpu = rows[0]["synthetic"]["cpu"]
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(f"CPU: {cpu}\n\n{text}\n")
    print(f"CPU: {cpu}\n\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
