"""onnxruntime (CPU) latency and throughput of a network's W8A8 QDQ export (`dsg export`) against
the FP32 ONNX export of the same network, in the same run; with the file sizes and the top-1
agreement between the two. onnxruntime fuses 8-bit QDQ into integer kernels (QLinearConv, ...), so
this is the speed-up a deployment sees.

    python bench/onnx_latency.py [--model fashion-mnist-resnet20|efficientnet-lite0] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch


def _time(session, name, x, repeat):
    feed = {name: x}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    import onnxruntime as ort

    from dsg_ext import quantization as Q
    from dsg_ext.data.calibration import gaussian_noise, real_fashion_mnist
    from dsg_ext.data.photos import photo_crops
    from dsg_ext.export import export_onnx
    from dsg_ext.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fashion-mnist-resnet20", choices=("fashion-mnist-resnet20", "efficientnet-lite0"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=64, help="batch of the throughput figure")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)

    loaded = load_model(args.model)
    if args.model == "fashion-mnist-resnet20":
        calib = real_fashion_mnist(256)
    else:
        calib = torch.cat([photo_crops(loaded.input), gaussian_noise(loaded.input, 0)])[:64]
    quantized = {}
    for label, fold in (("w8a8", False), ("w8a8-folded-bn", True)):
        q = Q.quantize_model(loaded.model, Q.QuantConfig(wbits=8, abits=8, fold_bn=fold), calib[:1])
        Q.calibrate(q, calib)
        Q.finalize_weights(q)
        quantized[label] = q
    spec = loaded.input
    x1 = torch.randn(1, spec.channels, spec.image_size, spec.image_size)
    xb = torch.randn(args.batch, spec.channels, spec.image_size, spec.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: os.path.join(tmp, f"{k}.onnx") for k in ("fp32", *quantized)}
        for label, q in quantized.items():
            name = export_onnx(q, calib[:2], paths[label], check=False)["input"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(loaded.model, (calib[:2],), paths["fp32"], dynamo=True, input_names=[name],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False,
                              external_data=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        sessions = {k: ort.InferenceSession(p, options, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
        rows = {}
        probe = calib.numpy()
        reference = sessions["fp32"].run(None, {name: probe})[0].argmax(1)
        for k, s in sessions.items():
            lat = _time(s, name, x1.numpy(), 50)
            thr = _time(s, name, xb.numpy(), 10)
            rows[k] = {"latency_ms": lat * 1e3, "throughput_img_s": args.batch / thr,
                       "bytes": os.path.getsize(paths[k]),
                       "top1_agreement_with_fp32": float(np.mean(s.run(None, {name: probe})[0].argmax(1) == reference))}
    result = {"model": args.model, "threads": args.threads, "batch": args.batch, "onnxruntime": ort.__version__,
              "torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor(),
              "rows": rows}
    fp = rows["fp32"]
    print(f"{args.model}, onnxruntime {ort.__version__} CPU, {args.threads} threads "
          f"(agreement: top-1 on the {probe.shape[0]} calibration images)")
    print(f"{'':16s} {'latency b1 ms':>14s} {'img/s b' + str(args.batch):>12s} {'file MB':>8s} {'vs FP32: lat':>13s} "
          f"{'thr':>6s} {'size':>6s} {'agree':>6s}")
    for k, r in rows.items():
        print(f"{k:16s} {r['latency_ms']:14.3f} {r['throughput_img_s']:12.1f} {r['bytes'] / 1e6:8.2f} "
              f"{fp['latency_ms'] / r['latency_ms']:12.2f}x {r['throughput_img_s'] / fp['throughput_img_s']:5.2f}x "
              f"{fp['bytes'] / r['bytes']:5.2f}x {r['top1_agreement_with_fp32'] * 100:5.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
