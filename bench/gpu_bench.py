"""GPU check: CUDA results against the CPU implementation, then CUDA-event timings of every fused op
against plain PyTorch (and torch.compile of it), with the ratio to the memory floor.

Run by bench/gpu_check.sh on a lent GPU machine; writes JSON to --out. Prints a short table last.
"""

import argparse
import gc
import json
import os
import sys

import torch
import workloads as benchmarks

import dsg_ext
from dsg_ext import ops


def _poison():
    """Fill the allocator's free blocks with NaN so that an output element a kernel forgets shows up."""
    free, _ = torch.cuda.mem_get_info()
    n = min(free // 8, 2 << 30) // 4
    junk = torch.full((n,), float("nan"), device="cuda")
    del junk


def _max_err(a, b):
    """Largest |a - b| / (1 + |b|): absolute for values below 1, relative above (a bf16 output of 10
    is only resolved to 0.06, so an absolute tolerance would fail a correct kernel on rounding)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    both_nan = torch.isnan(a) & torch.isnan(b)
    d = ((a - b).abs() / (1 + b.abs())).masked_fill(both_nan, 0)
    return float(d.max()) if d.numel() else 0.0


def correctness():
    """Each op on CUDA against the same op on the CPU, several shapes, dtypes and layouts."""
    g = torch.Generator().manual_seed(1)
    results = []

    def check(name, fn, make_inputs, tol):
        cpu_in = make_inputs()
        cuda_in = [t.cuda() if isinstance(t, torch.Tensor) else t for t in cpu_in]
        for t_cpu, t_cuda in zip(cpu_in, cuda_in):
            if isinstance(t_cpu, torch.Tensor) and t_cpu.requires_grad:
                t_cuda.retain_grad()
        _poison()
        try:
            out_cuda = fn(*cuda_in)
            out_cpu = fn(*cpu_in)
            torch.cuda.synchronize()
        except Exception as e:  # reported as a failed check; the others still run
            results.append({"check": name, "error": f"{type(e).__name__}: {e}", "ok": False})
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            return
        errs = [_max_err(a, b) for a, b in zip(out_cuda, out_cpu)]
        ok = all(e <= tol for e in errs)
        results.append({"check": name, "max_err": max(errs) if errs else 0.0, "tol": tol, "ok": ok})
        print(f"{'ok ' if ok else 'FAIL'} {name}: max err {max(errs) if errs else 0:.3g} (tol {tol})", flush=True)

    def misaligned(x):
        """x's values as a view in x's memory format (channels_last or contiguous) starting one element
        into its storage, so that 16-byte vector access is impossible and the kernels must take their
        scalar path."""
        cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        order, back = ((0, 2, 3, 1), (0, 3, 1, 2)) if cl else (tuple(range(x.dim())),) * 2
        dense = x.permute(*order)
        return torch.cat([dense.new_zeros(1), dense.reshape(-1)])[1:].view(dense.shape).permute(*back)

    def slack_case(shape, dtype, channels_last, per_sample, unbiased, offset=False):
        def make():
            x = torch.randn(*shape, generator=g) * 2 + 0.5
            if channels_last and x.dim() == 4:
                x = x.to(memory_format=torch.channels_last)
            x = x.to(dtype).requires_grad_(True)
            c = shape[1]
            return [x, torch.randn(c, generator=g) * 0.3, torch.rand(c, generator=g) + 0.5,
                    torch.rand(c, generator=g) * 0.1, torch.rand(c, generator=g) * 0.1,
                    torch.randn(shape[0] if per_sample else 1, generator=g).reshape(-1 if per_sample else ())]

        def fn(x, m, s, d, gm, up):
            loss, sm, ss = ops.bn_stat_slack_loss(misaligned(x) if offset else x, m, s, d, gm, eps=1e-5, unbiased=unbiased,
                                                  mode="per_sample" if per_sample else "batch", return_stats=True)
            (gx,) = torch.autograd.grad(loss, x, up.to(loss.dtype))
            return [loss, sm, ss, gx]

        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
        name = (f"slack {tuple(shape)} {dtype} {'NHWC' if channels_last else 'NCHW'}{' +1 offset' if offset else ''} "
                f"{'per_sample' if per_sample else 'batch'}")
        check(name, fn, make, tol)

    for shape in [(4, 3, 17, 19), (256, 64, 14, 14), (2, 64, 112, 112), (1, 1, 1, 1), (3, 5), (64, 96, 7, 7)]:
        for per_sample in (True, False):
            slack_case(shape, torch.float32, False, per_sample, True)
            if len(shape) == 4:
                slack_case(shape, torch.float32, True, per_sample, False)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        slack_case((8, 32, 28, 28), dtype, False, True, False)
        slack_case((8, 32, 28, 28), dtype, True, False, False)
    # channels_last, vectorised where C is a multiple of 16 bytes' worth of elements and the data is
    # 16-byte aligned: 24 channels = 3 vector slots in bf16; 20 channels: vectors in fp32, scalar in bf16;
    # an offset view: scalar path
    for dtype in (torch.bfloat16, torch.float32):
        for c in (24, 20):
            slack_case((6, c, 9, 11), dtype, True, True, True)
        slack_case((8, 32, 28, 28), dtype, True, True, True, offset=True)
        slack_case((8, 32, 28, 28), dtype, True, True, False)

    def bn_fused_case(shape, dtype, channels_last, offset=False):
        def make():
            x = torch.randn(*shape, generator=g) * 2 + 0.5
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            x = x.to(dtype).requires_grad_(True)
            c = shape[1]
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            return [x, (torch.randn(c, generator=g)).to(acc), torch.randn(c, generator=g).to(acc),
                    (torch.randn(c, generator=g) * 0.3).to(acc), (torch.rand(c, generator=g) + 0.5).to(acc),
                    (torch.rand(c, generator=g) * 0.1).to(acc), (torch.rand(c, generator=g) * 0.1).to(acc),
                    torch.randn(shape, generator=g).to(dtype), torch.randn(shape[0], generator=g)]

        def fn(x, sc, sh, m, s, d, gm, dy, up):
            y, loss, sm, ss = ops.bn_eval_slack(misaligned(x) if offset else x, sc, sh, m, s, d, gm, unbiased=True)
            (gx,) = torch.autograd.grad([y, loss], [x], [dy, up.to(loss.dtype)])
            return [y, loss, sm, ss, gx]

        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
        check(f"bn_eval_slack {tuple(shape)} {dtype} {'NHWC' if channels_last else 'NCHW'}{' +1 offset' if offset else ''}",
              fn, make, tol)

    for shape in [(4, 3, 17, 19), (256, 64, 14, 14), (2, 64, 112, 112), (64, 96, 7, 7)]:
        for cl in (False, True):
            bn_fused_case(shape, torch.float32, cl)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        bn_fused_case((8, 32, 28, 28), dtype, True)
    for dtype in (torch.bfloat16, torch.float32):
        for c in (24, 20):
            bn_fused_case((6, c, 9, 11), dtype, True)
        bn_fused_case((8, 32, 28, 28), dtype, True, offset=True)
        bn_fused_case((16, 256, 56, 56), dtype, True)  # ResNet-50 stage 1, as synthesis feeds it

    def fq_case(shape, axis, dtype, channels_last, learnable, offset=False):
        def make():
            x = torch.randn(*shape, generator=g) * 3
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            x = x.to(dtype).requires_grad_(True)
            c = shape[axis] if axis is not None else 1
            s = (torch.rand(c, generator=g) * 0.05 + 0.01).requires_grad_(learnable)
            z = torch.randint(0, 16, (c,), generator=g).float().requires_grad_(learnable) if learnable else \
                torch.randint(0, 16, (c,), generator=g, dtype=torch.int32)
            return [x, s, z, torch.randn(*shape, generator=g).to(dtype)]

        def fn(x, s, z, dy):
            y = ops.fake_quant(misaligned(x) if offset else x, s, z, 0, 15, axis)
            grads = torch.autograd.grad(y, [x, s, z] if learnable else [x], dy)
            return [y, *grads]

        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
        name = (f"fake_quant {tuple(shape)} axis={axis} {dtype} {'NHWC' if channels_last else ''}"
                f"{' +1 offset' if offset else ''} {'learnable' if learnable else 'STE'}")
        check(name, fn, make, tol if not learnable else 1e-2)

    for shape, axis, cl in [((8, 16, 13, 11), 1, False), ((8, 16, 13, 11), 1, True), ((8, 16, 13, 11), 0, False),
                            ((8, 16, 13, 11), None, False), ((8, 16, 13, 11), 3, True), ((37, 65), -1, False),
                            ((64, 64, 56, 56), 1, False)]:
        for learnable in (False, True):
            fq_case(shape, axis, torch.float32, cl, learnable)
    fq_case((8, 16, 13, 11), 1, torch.float16, False, False)
    fq_case((8, 16, 13, 11), 1, torch.bfloat16, True, False)
    # the 16-byte vector paths: runs (per tensor, per channel NCHW), channels (NHWC, C = 16), and an
    # unaligned view that must take the scalar path
    for learnable in (False, True):
        fq_case((8, 16, 13, 11), None, torch.bfloat16, False, learnable)
        fq_case((8, 16, 14, 14), 1, torch.bfloat16, True, learnable)
        fq_case((1001,), None, torch.float32, False, learnable, offset=True)
        fq_case((8, 16, 13, 11), 1, torch.float32, False, learnable, offset=True)

    def ada_case(shape, axis, hard, dtype):
        def make():
            w = (torch.randn(*shape, generator=g) * 0.1).to(dtype)
            c = shape[0] if axis == 0 else 1
            s = (w.float().abs().reshape(c, -1).amax(1) / 7.5 if axis == 0 else w.float().abs().max().reshape(1) / 7.5)
            s = s.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_(True)
            v = ops.adaround_init(w.double(), s.detach().double(), axis=axis if axis == 0 else None)
            v = (v + torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_(True)
            z = torch.full((c,), 8, dtype=torch.int32)
            return [w, v, s, z, torch.randn(*shape, generator=g).to(dtype), torch.tensor(0.3)]

        def fn(w, v, s, z, dw, lam):
            wq, reg = ops.adaround(w, v, s, z, 0, 15, axis, beta=4.0, hard=hard)
            gv, gs = torch.autograd.grad((wq, reg), (v, s), (dw, lam.to(reg.dtype)), allow_unused=True)
            return [wq, reg, gv if gv is not None else torch.zeros(()), gs]

        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
        check(f"adaround {tuple(shape)} axis={axis} hard={hard} {dtype}", fn, make, tol if dtype != torch.float32 else 2e-3)

    for shape, axis in [((64, 32, 3, 3), 0), ((512, 512, 3, 3), 0), ((10, 7), None), ((33, 17, 5, 5), 0)]:
        for hard in (False, True):
            ada_case(shape, axis, hard, torch.float32)
    ada_case((64, 32, 3, 3), 0, False, torch.float64)
    ada_case((64, 32, 3, 3), 0, False, torch.bfloat16)

    def shift_case(shape, shift, dtype, channels_last, offset=False):
        def make():
            x = torch.randn(*shape, generator=g).to(dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            dy = torch.randn(*shape, generator=g).to(dtype).contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            return [x.requires_grad_(True), torch.tensor(shift), dy]

        def fn(x, s, dy):
            xin = misaligned(x) if offset else x
            out = ops.reflect_shift(xin, s)
            (gx,) = torch.autograd.grad(out, x, dy)
            return [out, gx]

        check(f"reflect_shift {tuple(shape)} {shift} {dtype} cl={channels_last} offset={offset}", fn, make,
              0.0 if dtype == torch.float64 else 1e-6 if dtype == torch.float32 else 1e-2)

    for cl in (False, True):
        shift_case((32, 96, 112, 112), (1, -1), torch.float32, cl)
        shift_case((3, 5, 9, 11), (-8, 10), torch.float64, cl)
        shift_case((8, 24, 56, 56), (0, 1), torch.bfloat16, cl, offset=True)
    return results


SYNTHESIS_CASES = [("resnet18", 256), ("resnet18", 32), ("resnet50", 256), ("mobilenet_v2", 256)]


def _time_workload(wl, bw, rows, iters=50, warmup=10):
    floor = wl.bytes_moved / bw if wl.bytes_moved else float("nan")
    times = {}
    for name in list(wl.impls):
        try:
            times[name] = benchmarks.time_cuda(wl.impls[name], iters=iters, warmup=warmup)
        except Exception as e:  # a failing variant (e.g. torch.compile) must not hide the other figures
            print(f"{wl.name} {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        wl.impls[name] = None  # frees what the variant built (model copy, CUDA graph pool)
        gc.collect()
        torch.cuda.empty_cache()
    for name, t in times.items():
        row = {"workload": wl.name, "shape": wl.description, "impl": name, "median_ms": t * 1e3,
               "floor_ms": floor * 1e3, "ratio_to_floor": t / floor,
               "speedup_of_dsg_ext": t / times["dsg_ext"] if "dsg_ext" in times else None}
        if wl.name.startswith("synthesis"):
            row["img_iter_per_s"] = int(wl.description.split()[1].rstrip(",")) / t
        rows.append(row)
        print(f"  {wl.name:34s} {wl.description:22s} {name:24s} {t * 1e3:9.3f} ms", flush=True)


def timings(compile_plain):
    bw = benchmarks.copy_bandwidth("cuda")
    rows = []
    for wl in benchmarks.make_workloads("cuda", "gpu", compile_plain=compile_plain):
        _time_workload(wl, bw, rows)
    for wl in benchmarks.adaround_layer_workloads("cuda", "gpu"):
        _time_workload(wl, bw, rows)
    for arch, batch in SYNTHESIS_CASES:
        for wl in benchmarks.synthesis_workloads("cuda", "gpu", arch=arch, batch=batch, variants=True):
            _time_workload(wl, bw, rows, iters=15, warmup=5)
    return bw, rows


def sweep():
    """The statistic ops at synthesis' bf16 channels_last shape, the op workloads, and ResNet-50
    synthesis (bf16 + CL + graph, hooks and fused BN op; not with SWEEP_SYNTH=0) -- run once per
    DSG_EXT_CUDA_VEC / DSG_EXT_CUDA_WORK setting by gpu_check.sh's sweep."""
    bw = benchmarks.copy_bandwidth("cuda")
    rows = []
    for wl in benchmarks.layer_workloads("cuda", "gpu") + benchmarks.make_workloads("cuda", "gpu", compile_plain=False):
        _time_workload(wl, bw, rows)
    if os.environ.get("SWEEP_SYNTH", "1") != "0":
        for wl in benchmarks.synthesis_workloads("cuda", "gpu", arch="resnet50", batch=256, variants=True,
                                                 only=["dsg_ext_bf16_cl_graph", "dsg_ext_hooks_bf16_cl_graph",
                                                       "network_alone_bf16_cl"]):
            _time_workload(wl, bw, rows, iters=10, warmup=4)
    return bw, rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_bench.json")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--only", choices=["checks", "timings", "sweep"], help="run one part (separate processes: a crash in one keeps the other)")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not dsg_ext.cuda_ops_built():
        print(f"needs a GPU and the CUDA ops (GPU: {torch.cuda.is_available()}, CUDA ops: {dsg_ext.cuda_ops_built()})")
        return 2
    card = torch.cuda.get_device_name()
    print(f"card: {card}, torch {torch.__version__}", flush=True)
    checks = correctness() if args.only in (None, "checks") else []
    if args.only == "sweep":
        print(f"DSG_EXT_CUDA_VEC={os.environ.get('DSG_EXT_CUDA_VEC', 'unset')} "
              f"DSG_EXT_CUDA_WORK={os.environ.get('DSG_EXT_CUDA_WORK', 'default')}", flush=True)
        bw, rows = sweep()
    else:
        bw, rows = timings(not args.no_compile) if args.only != "checks" else (float("nan"), [])
    with open(args.out, "w") as f:
        json.dump({"card": card, "torch": torch.__version__, "copy_bandwidth_Bps": bw, "checks": checks,
                   "timings": rows}, f, indent=2)
    print(f"\ncard {card}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    print(f"{'workload':34s} {'shape':20s} {'impl':22s} {'median ms':>10s} {'x floor':>8s} {'ours faster':>11s} {'img*it/s':>9s}")
    for r in rows:
        sp = f"{r['speedup_of_dsg_ext']:.2f}x" if r["speedup_of_dsg_ext"] else "-"
        ips = f"{r['img_iter_per_s']:.0f}" if "img_iter_per_s" in r else ""
        print(f"{r['workload'][:34]:34s} {r['shape'][:20]:20s} {r['impl']:22s} {r['median_ms']:10.3f} "
              f"{r['ratio_to_floor']:7.2f}x {sp:>11s} {ips:>9s}")
    failed = [c["check"] for c in checks if not c["ok"]]
    print(f"correctness: {len(checks) - len(failed)}/{len(checks)} ok" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
