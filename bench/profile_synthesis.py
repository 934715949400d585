"""Where one synthesis iteration's CPU time goes: torch.profiler over one iteration (the third, after
warm-up) of a recipe, the ops sorted by their own time, with the CPU model. The table behind
docs/synthesis.md, "Where the CPU time of an iteration goes".

    python bench/profile_synthesis.py --model efficientnet-lite0 --batch 32 --recipe recommended   (~1 min)
    python bench/profile_synthesis.py --recipe recommended --channels-last no --allocator default

A fused op's kernel time shows under its autograd node (``GeneratedBackwardFor_dsg_ext_<op>`` is the
forward kernel as called through autograd; ``dsg_ext::<op>_backward`` the backward).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from onnx_latency import cpu_line  # noqa: E402
from synthesis_vs_mct import setup  # noqa: E402

from dsg_ext.synthesis import SynthesisConfig, synthesize_batch  # noqa: E402
from dsg_ext.synthesis import loop as synthesis_loop  # noqa: E402
from dsg_ext.synthesis.config import RECIPES  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientnet-lite0", choices=("efficientnet-lite0", "fashion-mnist-resnet20"))
    p.add_argument("--batch", type=int, default=None, help="32 for Lite0, 256 for ResNet-20")
    p.add_argument("--recipe", default="recommended", choices=sorted(RECIPES))
    p.add_argument("--channels-last", choices=("recipe", "yes", "no"), default="recipe")
    p.add_argument("--swing", choices=("recipe", "yes", "no"), default="recipe")
    p.add_argument("--allocator", choices=("retained", "default"), default="retained")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=20)
    args = p.parse_args(argv)
    loaded, size, batch, retained = setup(args)
    spec = loaded.input
    fields = {name: value == "yes" for name, value in (("channels_last", args.channels_last), ("swing", args.swing))
              if value != "recipe"}
    config = SynthesisConfig.from_recipe(args.recipe, batch_size=batch, image_size=size, channels=spec.channels,
                                         iterations=4, **fields)
    tables = []
    iterate = synthesis_loop.SynthesisLoop.iterate

    def profiled(self):
        if self.iterations_done != 2:
            return iterate(self)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = iterate(self)
        tables.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        return out

    synthesis_loop.SynthesisLoop.iterate = profiled
    try:
        synthesize_batch(loaded.model.eval(), config, 0, input_range=spec.valid_range())
    finally:
        synthesis_loop.SynthesisLoop.iterate = iterate
    print(f"{args.model}, recipe {args.recipe} {fields or ''}, batch {batch}, {size}x{size}; CPU: {cpu_line()}, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}; allocator: "
          f"{'freed memory retained' if retained else 'glibc default'}")
    print(tables[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
