"""onnxruntime (CPU) speed, size and accuracy of our quantized ONNX files beside FP32 and beside
onnxruntime's own ``quantize_static``, in one run, on the same calibration images and threads.

Rows: FP32; onnxruntime's own W8A8 (``quant_pre_process`` + ``quantize_static``: QDQ, per-channel
int8 weights, uint8 activations, MinMax, fed with our images -- a ``dsg generate`` directory through
``dsg_ext.data.interop.ort_calibration_reader``); ours with the deployment placement (``dsg quantize
--target onnxruntime``) at W8A8 and W4A8; ours with the paper's ``input`` placement (BN folded) at
W8A8, the file we wrote before. Per row: latency at batch 1 and throughput at the batch given
(medians), file size, accuracy (ResNet-20: top-1 on the Fashion-MNIST test set; EfficientNet-Lite:
top-1 agreement and KL with FP32 on the 80 held-out scikit-image crops), and onnxruntime's optimised
graph (integer kernels, convolutions left in float, Q/DQ nodes and Transposes left).

    python bench/onnx_latency.py --model fashion-mnist-resnet20 --calib DIR   # or --real
    python bench/onnx_latency.py --model efficientnet-lite0 --real --batch 32
    python bench/onnx_latency.py --model zoo:mobilenet_v2 --real   # a labelled-zoo network (Fashion-MNIST top-1)

Print ``lscpu``'s model name and flags with the table (the script does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

MODELS = ("fashion-mnist-resnet20", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "zoo:NAME")


def _model(value: str) -> str:
    if value in MODELS[:-1] or value.startswith("zoo:"):
        return value
    raise argparse.ArgumentTypeError(f"one of {', '.join(MODELS)}, not {value!r}")


def _interleaved(sessions, name, x, rounds):
    """Median seconds of one run per session, the sessions timed in turn round after round (so that the
    machine's drift, large on our shared VMs, falls on every row alike)."""
    feed = {name: x}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    times = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_line() -> str:
    """lscpu's model name, onnxruntime's int8 kernel class on it (VNNI or not) and the int8-relevant flags."""
    from dsg_ext.export.x86_kernels import cpu_info, describe_cpu

    info = cpu_info()
    return f"{describe_cpu(info)}, flags: {' '.join(info['flags']) or 'none listed'}"


def _tensor_reader(name, images, batch=32):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter([{name: images[i:i + batch].numpy()} for i in range(0, images.shape[0], batch)])

    return Reader()


def _ours(loaded, calib, **fields):
    from dsg_ext import quantization as Q

    config = Q.QuantConfig(**fields)
    q = Q.quantize_model(loaded.model, config, calib[:1])
    Q.calibrate(q, calib)
    Q.finalize_weights(q)
    return q


def _pt2e(model, calib, example):
    """torchao's PT2E path: export, X86InductorQuantizer (its default static config), calibrate on our images,
    convert, torch.compile (Inductor's int8 CPU kernels). Returns the compiled callable."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(exported, X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))
    with torch.no_grad():
        for i in range(0, calib.shape[0], 32):
            prepared(calib[i:i + 32])
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # the int8 conv/linear lowerings need frozen weights (torchao's PT2E recipe)
    return torch.compile(convert_pt2e(prepared), dynamic=False)


class _TorchSession:
    """The onnxruntime session interface (run) over a torch callable, for the PT2E row."""

    def __init__(self, fn):
        self.fn = fn

    def run(self, _outputs, feed):
        with torch.no_grad():
            return [self.fn(torch.from_numpy(next(iter(feed.values())))).numpy()]


def _run_all(session, name, x, batch):
    return np.concatenate([session.run(None, {name: x[i:i + batch].numpy()})[0] for i in range(0, x.shape[0], batch)])


def main(argv=None) -> int:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    from dsg_ext import quantization as Q
    from dsg_ext.data import photos
    from dsg_ext.data.calibration import calibration_images, evaluation_images
    from dsg_ext.data.interop import SyntheticDataset, ort_calibration_reader
    from dsg_ext.export import export_onnx
    from dsg_ext.export.qdq import runtime_report
    from dsg_ext.export.x86_kernels import run_as_cpu
    from dsg_ext.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fashion-mnist-resnet20", type=_model, help=", ".join(MODELS))
    parser.add_argument("--weights", help="weights file of a zoo:NAME network (default: its trained weights)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--calib", metavar="DIR", help="a dsg generate directory for this model (data-free)")
    source.add_argument("--real", action="store_true",
                        help="real images: Fashion-MNIST training images / crops of the even-numbered photos")
    parser.add_argument("--samples", type=int, default=None, help="calibration images (default 256 / 64)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=None, help="batch of the throughput figure (default 64 / 32)")
    parser.add_argument("--repeat", type=int, default=30, help="timed rounds per figure (median; each round runs "
                        "every row once, in turn)")
    parser.add_argument("--eval", type=int, default=10000, help="Fashion-MNIST test images for top-1")
    parser.add_argument("--rows", default="fp32,ort,ort-rr,deploy-w8a8,deploy-vnni-w8a8,deploy-w4a8,input-w8a8",
                        help="comma list; ort-rr is onnxruntime's quantize_static with reduce_range (7-bit weights), "
                             "deploy-vnni-w8a8 our file without the int16 pair limit (--target onnxruntime-vnni); also "
                             "input-w4a8, and pt2e (torchao's X86InductorQuantizer + torch.compile, timed in torch: "
                             "minutes of compilation)")
    parser.add_argument("--avx2", type=int, default=0, metavar="N",
                        help="also run every file on the first N evaluation images as an AVX2 CPU without VNNI "
                             "(onnxruntime under qemu-x86_64 -cpu Haswell: accuracy only, minutes per file)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    resnet = args.model == "fashion-mnist-resnet20" or args.model.startswith("zoo:")  # labelled (Fashion-MNIST)
    batch = args.batch or (64 if args.model == "fashion-mnist-resnet20" else 32)
    samples = args.samples or (256 if resnet else 64)
    rows_wanted = args.rows.split(",")

    loaded = load_model(args.model, weights=args.weights)
    spec = loaded.input
    if args.calib:
        dataset = SyntheticDataset(args.calib, loaded.identity, samples)
        calib = torch.stack([dataset[i] for i in range(len(dataset))])
        described = f"synthetic ({args.calib}, {calib.shape[0]} images)"
    elif resnet:
        calib = calibration_images(loaded, None, "fashion-mnist", samples)[0]
        described = f"real ({samples} Fashion-MNIST training images)"
    else:
        names = list(photos.SKIMAGE_PHOTOS)
        calib = photos.photo_crops(spec, 8, names[::2], seed=2)[:samples]
        described = f"real ({calib.shape[0]} crops of the even-numbered photos)"
    if resnet:
        eval_x, eval_y = evaluation_images(loaded, "fashion-mnist", args.eval)
        eval_y = eval_y.numpy()
    else:
        eval_x, eval_y = photos.photo_crops(spec, 8, list(photos.SKIMAGE_PHOTOS)[1::2], seed=1), None

    target = Q.TARGETS["onnxruntime"]
    built = {
        "deploy-w8a8": lambda: _ours(loaded, calib, **target, wbits=8, abits=8),
        "deploy-w4a8": lambda: _ours(loaded, calib, **target, wbits=4, abits=8),
        "deploy-vnni-w8a8": lambda: _ours(loaded, calib, **Q.TARGETS["onnxruntime-vnni"], wbits=8, abits=8),
        "input-w8a8": lambda: _ours(loaded, calib, wbits=8, abits=8, fold_bn=True),
        "input-w4a8": lambda: _ours(loaded, calib, wbits=4, abits=8, fold_bn=True),
    }
    rows, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: os.path.join(tmp, f"{k}.onnx") for k in rows_wanted}
        qmodels = {}
        for k in rows_wanted:
            if k in built:
                t = time.perf_counter()
                qmodels[k] = built[k]()
                export_onnx(qmodels[k], calib[:2], paths[k], check=False)
                seconds[k] = time.perf_counter() - t
        name = _input_name(loaded.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fp32 = os.path.join(tmp, "fp32-export.onnx")
            torch.onnx.export(loaded.model, (calib[:2],), fp32, dynamo=True, input_names=[name],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False,
                              external_data=False)
        import onnx

        proto = onnx.load(fp32)
        for node in proto.graph.node:  # the exporter's stack traces, stripped from our files too
            del node.metadata_props[:]
        onnx.save(proto, fp32)
        if "fp32" in paths:
            os.replace(fp32, paths["fp32"])
            fp32 = paths["fp32"]
        for k in ("ort", "ort-rr"):
            if k not in paths:
                continue
            t = time.perf_counter()
            pre = os.path.join(tmp, "fp32-pre.onnx")
            quant_pre_process(fp32, pre)
            reader = (ort_calibration_reader(args.calib, name, 32, samples, loaded.identity) if args.calib
                      else _tensor_reader(name, calib))
            quantize_static(pre, paths[k], reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=k == "ort-rr")
            seconds[k] = time.perf_counter() - t
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.log_severity_level = 3
        fp_session = ort.InferenceSession(fp32, options, providers=["CPUExecutionProvider"])
        fp_out = _run_all(fp_session, name, eval_x, 100)
        x1 = torch.randn(1, spec.channels, spec.image_size, spec.image_size).numpy()
        xb = torch.randn(batch, spec.channels, spec.image_size, spec.image_size).numpy()
        sessions = {}
        for k in rows_wanted:
            if k == "pt2e":
                t = time.perf_counter()
                torch.set_num_threads(args.threads)
                s = _TorchSession(_pt2e(loaded.model, calib, calib[:2]))
                s.run(None, {name: x1})
                seconds[k] = time.perf_counter() - t
                graph = {"nodes": {}, "qdq_left": 0, "float_nodes": []}
            else:
                s = ort.InferenceSession(paths[k], options, providers=["CPUExecutionProvider"])
                graph = runtime_report(paths[k], args.threads)
            out = _run_all(s, name, eval_x, 100)
            counts = graph["nodes"]
            convs = counts.get("QLinearConv", 0) + counts.get("Conv", 0) + counts.get("FusedConv", 0)
            sessions[k] = s
            row = {"bytes": os.path.getsize(paths[k]) if os.path.exists(paths[k]) else 0,
                   "build_s": seconds.get(k),
                   "qlinearconv": counts.get("QLinearConv", 0), "convs": convs,
                   "qlinearadd": counts.get("QLinearAdd", 0), "qdq_left": graph["qdq_left"],
                   "transposes": counts.get("Transpose", 0), "float_nodes": len(graph["float_nodes"])}
            ours = None
            if k in qmodels:  # the file against `dsg eval` of the same model
                with torch.no_grad():
                    ours = torch.cat([qmodels[k](eval_x[i:i + 100]) for i in range(0, eval_x.shape[0], 100)]).numpy()
                row["same_as_torch_pct"] = float(np.mean(ours.argmax(1) == out.argmax(1))) * 100
                if resnet:
                    row["torch_top1"] = float(np.mean(ours.argmax(1) == eval_y)) * 100
            row.update(_quality(out, fp_out, eval_y))
            if args.avx2:  # the same file on an (emulated) AVX2 CPU without VNNI
                avx2 = run_as_cpu(paths[k], eval_x[:args.avx2]).numpy()
                row["avx2"] = _quality(avx2, fp_out[:args.avx2], None if eval_y is None else eval_y[:args.avx2])
                row["avx2"]["images"] = int(avx2.shape[0])
                if ours is not None:
                    row["avx2"]["same_as_torch_pct"] = float(np.mean(ours[:args.avx2].argmax(1) == avx2.argmax(1))) * 100
            rows[k] = row
        latency = _interleaved(sessions, name, x1, max(10, args.repeat * 2))
        throughput = _interleaved(sessions, name, xb, max(10, args.repeat))
        for k, row in rows.items():
            row["latency_ms"], row["throughput_img_s"] = latency[k] * 1e3, batch / throughput[k]
    result = {"model": args.model, "calibration": described, "threads": args.threads, "batch": batch,
              "onnxruntime": ort.__version__, "torch": torch.__version__, "cpu": cpu_line(), "rows": rows}
    _print(result, resnet)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _quality(out, fp_out, labels):
    """Top-1 % with labels; else top-1 agreement % and mean KL with FP32."""
    if labels is not None:
        return {"top1": float(np.mean(out.argmax(1) == labels)) * 100}
    a, b = torch.from_numpy(fp_out).double(), torch.from_numpy(out).double()
    la, lb = torch.log_softmax(a, 1), torch.log_softmax(b, 1)
    return {"agreement": float((a.argmax(1) == b.argmax(1)).double().mean()) * 100,
            "kl": float((la.exp() * (la - lb)).sum(1).mean())}


def _input_name(model):
    from dsg_ext.export.qdq import input_name

    return input_name(model)


def _print(result, resnet):
    rows = result["rows"]
    fp = rows.get("fp32")
    print(f"{result['model']}, onnxruntime {result['onnxruntime']} CPU, {result['threads']} threads; "
          f"calibration: {result['calibration']}")
    print(f"CPU: {result['cpu']}")
    acc = "top-1 %" if resnet else "agree/KL"
    print(f"{'':12s} {'b1 ms':>8s} {'img/s b' + str(result['batch']):>11s} {'vs FP32':>8s} {'vs ORT':>7s} "
          f"{'MB':>6s} {acc:>13s} {'QLinearConv':>12s} {'QLinearAdd':>10s} {'Q/DQ left':>9s} {'Transp.':>7s} "
          f"{'float':>5s}")
    for k, r in rows.items():
        vs_fp = f"{r['throughput_img_s'] / fp['throughput_img_s']:.2f}x" if fp else "-"
        ort_row = rows.get("ort")
        vs_ort = f"{r['throughput_img_s'] / ort_row['throughput_img_s']:.2f}x" if ort_row else "-"
        quality = f"{r['top1']:.2f}" if resnet else f"{r['agreement']:.1f}/{r['kl']:.4f}"
        print(f"{k:12s} {r['latency_ms']:8.3f} {r['throughput_img_s']:11.1f} {vs_fp:>8s} {vs_ort:>7s} "
              f"{r['bytes'] / 1e6:6.2f} {quality:>13s} {r['qlinearconv']:>5d} / {r['convs']:<5d} {r['qlinearadd']:>10d} "
              f"{r['qdq_left']:>9d} {r['transposes']:>7d} {r['float_nodes']:>5d}")
    for k, r in rows.items():
        if "same_as_torch_pct" in r:
            print(f"{k}: the file's predictions are our torch model's on {r['same_as_torch_pct']:.2f}% of the test "
                  f"images" + (f" (torch top-1 {r['torch_top1']:.2f})" if "torch_top1" in r else ""))
    for k, r in rows.items():
        if "avx2" in r:
            a = r["avx2"]
            quality = f"top-1 {a['top1']:.2f}" if "top1" in a else f"agreement {a['agreement']:.1f} / KL {a['kl']:.4f}"
            same = f", same as our torch model {a['same_as_torch_pct']:.2f}%" if "same_as_torch_pct" in a else ""
            print(f"{k} as an AVX2 CPU without VNNI (qemu -cpu Haswell, first {a['images']} images): {quality}{same}")


if __name__ == "__main__":
    sys.exit(main())
