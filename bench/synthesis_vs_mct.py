"""Synthesis speed side by side, in one process: our ``recommended`` recipe, our paper-DSG path, a plain
PyTorch loop of the same recipe, and Sony MCT's data generation (``mct.data_generation``, the model's
parameters frozen, its default image pipeline), same model, image count and batch, same threads.

Milliseconds per image·iteration, from the difference of a 3- and an 11-iteration run (so each tool's
setup cancels), after one untimed warm-up run of each tool, tools alternating, the minimum over
``--repeats`` (and the median beside it). The CPU model and flags are printed
with the table (the machines differ between sessions; repeat runs of one case vary on a shared VM).

    python bench/synthesis_vs_mct.py --model efficientnet-lite0 --batch 32        (2 cores: ~10 min)
    python bench/synthesis_vs_mct.py --model fashion-mnist-resnet20 --batch 256   (~2 min)

``--allocator retained`` (the default) keeps freed memory for reuse in the process, as the ``dsg`` command
does; it is process-wide, so every tool of the run gets it (``--allocator default`` for glibc's own).
``recommended`` runs in channels_last (its recipe); ``+cl``/``+bf16`` after a recipe name add channels_last /
bf16 autocast (``--tools recommended,paper-dsg+cl``); the plain loop is NCHW fp32, as written from the papers.

MCT is an optional benchmark dependency, never the product's: ``pip install model-compression-toolkit``
(2.6.1 measured; a virtual environment with ``--system-site-packages`` keeps our torch). Without it the
MCT row is left out and said so.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from onnx_latency import cpu_line  # noqa: E402

from dsg_ext import retain_freed_memory  # noqa: E402
from dsg_ext.models import load_model  # noqa: E402
from dsg_ext.synthesis import SynthesisConfig, synthesize_batch  # noqa: E402
from dsg_ext.synthesis.augment import gaussian_kernel  # noqa: E402
from dsg_ext.synthesis.config import RECIPES  # noqa: E402


def plain_recipe(model: nn.Module, config: SynthesisConfig, count: int, iterations: int,
                 input_range) -> torch.Tensor:
    """The recommended recipe written the plain PyTorch way (what a user would write from the papers):
    torch's BatchNorm, forward pre-hooks computing batch mean/var with torch.mean/torch.var, crop and
    flip by slicing with offsets drawn on the host, smoothing by pad + depthwise conv, swing by pad +
    slice hooks on the strided convolutions, Adam, a clamp to the valid pixels."""
    gen = torch.Generator().manual_seed(config.seed)
    pad, size = config.crop_pad, config.image_size
    x = torch.randn(count, config.channels, size + 2 * pad, size + 2 * pad, generator=gen).requires_grad_(True)
    lo = torch.tensor(input_range[0]).view(1, -1, 1, 1)
    hi = torch.tensor(input_range[1]).view(1, -1, 1, 1)
    kernel = gaussian_kernel(config.smoothing, config.channels, "cpu")
    losses: List[torch.Tensor] = []
    state = {"train": False}
    handles = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            def bn_hook(mod, inp):
                a = inp[0]
                mean, var = a.mean((0, 2, 3)), a.var((0, 2, 3), unbiased=True)
                losses.append((mean - mod.running_mean).pow(2).sum()
                              + (torch.sqrt(var + 1e-5) - torch.sqrt(mod.running_var + mod.eps)).pow(2).sum())
            handles.append(m.register_forward_pre_hook(bn_hook))
        elif isinstance(m, nn.Conv2d) and max(m.stride) > 1 and config.swing:
            def swing(_mod, inp):
                a = inp[0]
                if not state["train"] or min(a.shape[2:]) < 2:
                    return None
                dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
                h, w = a.shape[2], a.shape[3]
                return (nn.functional.pad(a, (1, 1, 1, 1), mode="reflect")[..., dy:dy + h, dx:dx + w],)
            handles.append(m.register_forward_pre_hook(swing))
    opt = torch.optim.Adam([x], lr=config.lr)
    try:
        for _ in range(iterations):
            opt.zero_grad(set_to_none=True)
            losses.clear()
            oy, ox = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
            v = x[..., oy:oy + size, ox:ox + size]
            if config.flip and int(torch.randint(0, 2, (1,), generator=gen)):
                v = v.flip(3)
            v = nn.functional.conv2d(nn.functional.pad(v, (1, 1, 1, 1), mode="reflect"), kernel, groups=v.shape[1])
            state["train"] = True
            model(v)
            state["train"] = False
            torch.stack(losses).sum().backward()
            opt.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
    finally:
        for h in handles:
            h.remove()
    return x.detach()


class _GreyInput(nn.Module):
    """MCT's PyTorch data generation makes 3-channel images only: a 1-channel model gets their channel mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1, keepdim=True)


def mct_generate(model: nn.Module, count: int, size: int, iterations: int, channels: int) -> None:
    import model_compression_toolkit as mct
    from model_compression_toolkit.data_generation.common.enums import ImageNormalizationType

    norm = ImageNormalizationType.TORCHVISION if channels == 3 else ImageNormalizationType.NO_NORMALIZATION
    if channels == 1:
        model = nn.Sequential(_GreyInput(), model).eval()
    cfg = mct.data_generation.get_pytorch_data_generation_config(
        n_iter=iterations, data_gen_batch_size=count, image_normalization_type=norm)
    mct.data_generation.pytorch_data_generation_experimental(model, count, size, cfg)


def setup(args):
    """Threads, allocator, model and sizes from the shared options (--threads, --allocator, --model,
    --batch): (loaded model, image size, batch, whether freed memory is retained)."""
    torch.set_num_threads(args.threads)
    retained = retain_freed_memory() if args.allocator == "retained" else False
    loaded = load_model(args.model)
    size = 28 if args.model == "fashion-mnist-resnet20" else loaded.input.image_size
    batch = args.batch or (256 if args.model == "fashion-mnist-resnet20" else 32)
    return loaded, size, batch, retained


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientnet-lite0", choices=("efficientnet-lite0", "fashion-mnist-resnet20"))
    p.add_argument("--batch", type=int, default=None, help="images (one batch): 32 for Lite0, 256 for ResNet-20")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--short", type=int, default=3, help="iterations of the short run")
    p.add_argument("--long", type=int, default=11, help="iterations of the long run")
    p.add_argument("--tools", default="recommended,paper-dsg,plain,mct")
    p.add_argument("--allocator", choices=("retained", "default"), default="retained",
                   help="retained: freed memory kept for reuse, as the dsg command runs (dsg_ext.retain_freed_memory); "
                        "default: glibc's own. Process-wide, so it applies to every tool of the run alike")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.long <= args.short:
        p.error("--long must be larger than --short")
    for tool in args.tools.split(","):
        recipe, *speed = tool.split("+")
        if tool and tool not in ("plain", "mct") and (recipe not in RECIPES or not set(speed) <= {"cl", "bf16"}):
            p.error(f"unknown tool {tool!r}: plain, mct, or a recipe ({', '.join(sorted(RECIPES))}) "
                    "with optional +cl (channels_last) and +bf16 (bf16 autocast)")
    loaded, size, batch, retained = setup(args)
    spec = loaded.input
    base = loaded.model.eval()
    for q in base.parameters():
        q.requires_grad_(False)  # frozen for every tool (MCT included: its tutorial leaves them trainable)
    tools = [t for t in args.tools.split(",") if t]
    if "mct" in tools:
        try:
            import model_compression_toolkit  # noqa: F401
        except ImportError:
            print("MCT row left out: pip install model-compression-toolkit", file=sys.stderr)
            tools.remove("mct")

    def ours(tool: str) -> Callable[[int], None]:
        recipe, *speed = tool.split("+")  # e.g. recommended+cl+bf16: channels_last, bf16 autocast
        fields = {"channels_last": "cl" in speed, "autocast_bf16": "bf16" in speed}

        def run(iterations: int) -> None:
            config = SynthesisConfig.from_recipe(recipe, batch_size=batch, image_size=size, channels=spec.channels,
                                                 iterations=iterations, **fields)
            synthesize_batch(base, config, 0, input_range=spec.valid_range())
        return run

    def plain(iterations: int) -> None:
        config = SynthesisConfig.from_recipe("recommended", batch_size=batch, image_size=size, channels=spec.channels)
        plain_recipe(copy.deepcopy(base), config, batch, iterations, spec.valid_range())

    runners: Dict[str, Callable[[int], None]] = {
        "plain": plain, "mct": lambda n: mct_generate(copy.deepcopy(base), batch, size, n, spec.channels)}
    for tool in tools:
        if tool not in runners:
            runners[tool] = ours(tool)
    best: Dict[str, float] = {}
    every: Dict[str, List[float]] = {tool: [] for tool in tools}
    for tool in tools:  # one untimed short run each first: the first run of a layout creates its oneDNN
        runners[tool](args.short)  # kernels, which would inflate the short run and shrink the difference
    for r in range(args.repeats):
        for tool in tools:  # alternating: a slow spell of the machine hits every tool
            times = {}
            for n in (args.short, args.long):
                t = time.perf_counter()
                runners[tool](n)
                times[n] = time.perf_counter() - t
            per = (times[args.long] - times[args.short]) / (args.long - args.short) / batch * 1e3
            best[tool] = min(best.get(tool, float("inf")), per)
            every[tool].append(per)
            print(f"repeat {r}: {tool}: {per:.2f} ms per image-iteration", file=sys.stderr)
    print(f"\n{args.model}, {batch} images in one batch, {size}x{size}; CPU: {cpu_line()}, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}; allocator: "
          f"{'freed memory retained' if retained else 'glibc default'}")
    print("ms per image·iteration: difference of a {}- and a {}-iteration run, min of {}\n".format(
        args.short, args.long, args.repeats))
    print("| tool | ms per image·iteration | vs MCT | vs paper DSG | median of the repeats (vs MCT's median) |")
    print("|---|---|---|---|---|")
    for tool in tools:
        vs_mct = f"{best['mct'] / best[tool]:.2f}× faster" if "mct" in best else "–"
        vs_dsg = f"{best[tool] / best['paper-dsg']:.2f}× the cost" if "paper-dsg" in best else "–"
        med = statistics.median(every[tool])
        med_vs = f" ({statistics.median(every['mct']) / med:.2f}×)" if "mct" in every else ""
        print(f"| {tool} | {best[tool]:.2f} | {vs_mct} | {vs_dsg} | {med:.2f}{med_vs} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "batch": batch, "cpu": cpu_line(), "threads": torch.get_num_threads(),
                       "allocator": "retained" if retained else "default",
                       "ms_per_image_iteration": best, "every_repeat": every}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
