"""`dsg demo`: the whole product on the shipped Fashion-MNIST ResNet-20, on the CPU.

FP32 accuracy, then for each bit setting the test accuracy when calibrated with (a) real training
images, (b) data of our recommended synthesis recipe, (c) the paper's DSG data, (d) ZeroQ data,
(e) Gaussian noise, each with plain calibration and with reconstruction (the recommended one, on a
shortened schedule stated in the output). Prints a table, writes JSON and a PNG chart.
Synthetic datasets are written with `dsg generate`'s machinery under OUT/data and reused (verified)
when the demo is run again.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from typing import Any, Dict, List, Sequence, Tuple

import torch

from . import quantization as quant
from ._utils.io import atomic_write_bytes, prepare_output_dir
from .data import calibration, fashion_mnist
from .errors import ConfigError
from .evaluation import topk_accuracy
from .models import load_model
from .synthesis import SynthesisConfig, generate

MODEL = "fashion-mnist-resnet20"

SOURCES = ("real", "recommended", "dsg", "zeroq", "noise")
# synthetic sources -> the named synthesis recipe that makes them
SOURCE_RECIPES = {"recommended": "recommended", "dsg": "paper-dsg", "zeroq": "zeroq"}
DEFAULT_BITS = ((8, 8), (6, 6), (4, 8), (4, 4))


@dataclasses.dataclass
class DemoConfig:
    out: str = "dsg_demo"
    samples: int = 256  # calibration images per source
    synth_iterations: int = 150  # the papers use 500; shortened so that the demo fits 10 minutes on 2 cores
    synth_batch: int = 256
    adaround_iterations: int = 80  # per layer or block; the papers use 10k-20k (use --adaround-iters to scale up)
    reconstruction: str = "recommended"  # a named reconstruction (quantization.RECONSTRUCTION_PRESETS)
    # Reconstruct only settings with at most this many weight bits (above it every source, noise too,
    # is within ~0.3 points of FP32 with plain calibration; the time goes where it matters).
    reconstruct_max_wbits: int = 4
    eval_samples: int = 2000  # first N test images; 10000 = the whole test set
    bits: Sequence[Tuple[int, int]] = DEFAULT_BITS
    sources: Sequence[str] = SOURCES
    device: str = "cpu"
    # min/max ranges: sensitive to what the calibration images look like, so the sources differ
    # (with "mse" every source, even noise, lands within ~1 point of FP32 on this network at W4A4).
    observer: str = "minmax"
    bias_correction: bool = False  # empirical bias correction (quantization.correct_bias) last, in both columns
    seed: int = 0


def _synthetic(source: str, cfg: DemoConfig, progress: bool) -> torch.Tensor:
    out = os.path.join(cfg.out, "data", source)
    sconf = SynthesisConfig.from_recipe(SOURCE_RECIPES[source], iterations=cfg.synth_iterations,
                                        batch_size=min(cfg.synth_batch, cfg.samples), seed=cfg.seed)
    generate(MODEL, out, sconf, cfg.samples, device=cfg.device, show_progress=progress, image_size=None)
    return calibration.synthetic_calibration(out, load_model(MODEL), cfg.samples)


def _calibration_sources(cfg: DemoConfig, loaded, progress: bool, log) -> Tuple[Dict[str, torch.Tensor],
                                                                            Dict[str, float]]:
    """{source: calibration images} for every source of ``cfg``, and the seconds each took."""
    timings: Dict[str, float] = {}
    calib: Dict[str, torch.Tensor] = {}
    for source in cfg.sources:
        t = time.perf_counter()
        if source == "real":
            calib[source] = calibration.real_fashion_mnist(cfg.samples, cfg.seed)
        elif source == "noise":
            calib[source] = calibration.gaussian_noise(loaded.input, cfg.samples, cfg.seed)
        elif source in SOURCE_RECIPES:
            calib[source] = _synthetic(source, cfg, progress)
        else:
            raise ConfigError(f"unknown calibration source {source!r}; choose from {SOURCES}")
        timings[f"data_{source}_s"] = time.perf_counter() - t
        log(f"calibration data {source}: {calib[source].shape[0]} images ({timings[f'data_{source}_s']:.1f} s)")
    return calib, timings


def measure_cell(fp, qconf, source: str, images: torch.Tensor, example: torch.Tensor, ada, cfg: DemoConfig,
                 accuracy) -> Dict[str, Any]:
    """One cell of the table: ``qconf`` calibrated on ``images`` of ``source`` (plain), then reconstructed
    (at most ``cfg.reconstruct_max_wbits`` weight bits); ``accuracy(model)`` scores each."""
    t = time.perf_counter()
    q = quant.quantize_model(fp, qconf, example)
    quant.calibrate(q, images, device=cfg.device)
    q_ada = copy.deepcopy(q)  # same activation ranges; reconstruction then rounds its weights
    quant.finalize_weights(q)
    if cfg.bias_correction:
        quant.correct_bias(q, fp, images, device=cfg.device)
    plain_acc = accuracy(q)
    t_ada = time.perf_counter()
    ada_acc = None
    if qconf.wbits <= cfg.reconstruct_max_wbits:
        quant.reconstruct(q_ada, fp, images, ada, device=cfg.device, progress=False)
        if cfg.bias_correction:
            quant.correct_bias(q_ada, fp, images, device=cfg.device)
        ada_acc = accuracy(q_ada)
    return {"bits": qconf.label(), "source": source, "calibration": plain_acc, "adaround": ada_acc,
            "adaround_seconds": time.perf_counter() - t_ada, "seconds": time.perf_counter() - t}


def run_demo(cfg: DemoConfig, progress: bool = True, log=print) -> Dict[str, Any]:
    """Runs the demo ``cfg`` describes: the table's cells (``log`` gets a line each), then demo.json,
    demo.png and report.html in ``cfg.out``; returns what demo.json holds."""
    t_start = time.perf_counter()
    ada = quant.AdaRoundConfig.from_preset(cfg.reconstruction, iterations=cfg.adaround_iterations,
                                           seed=cfg.seed).validate()  # refused before any work
    unknown = [s for s in cfg.sources if s not in SOURCES]
    if unknown:
        raise ConfigError(f"unknown calibration source {unknown[0]!r}; choose from {SOURCES}")
    prepare_output_dir(cfg.out, "demo directory")
    loaded = load_model(MODEL)
    fp = loaded.model.to(cfg.device)
    test_u8, test_y = fashion_mnist.load_split(train=False)
    n_eval = min(cfg.eval_samples, test_u8.shape[0])
    test_x = fashion_mnist.preprocess(test_u8[:n_eval]).to(cfg.device)
    test_y = test_y[:n_eval].to(cfg.device)

    def accuracy(model) -> float:
        return topk_accuracy(model, test_x, test_y, batch_size=500)[0]

    fp_acc = accuracy(fp)
    log(f"FP32 ResNet-20 on {n_eval} Fashion-MNIST test images: top-1 {fp_acc:.2f}%")
    calib, timings = _calibration_sources(cfg, loaded, progress, log)
    rows: List[Dict[str, Any]] = []
    example = calib[cfg.sources[0]][:2].to(cfg.device)
    for wbits, abits in cfg.bits:
        qconf = quant.QuantConfig(wbits=wbits, abits=abits, observer=cfg.observer)
        for source in cfg.sources:
            row = measure_cell(fp, qconf, source, calib[source].to(cfg.device), example, ada, cfg, accuracy)
            rows.append(row)
            shown = f"{row['adaround']:6.2f}%" if row["adaround"] is not None else "     -"
            log(f"{row['bits']:6s} {source:11s} calibration {row['calibration']:6.2f}%  reconstruction {shown}  "
                f"({row['seconds']:.1f} s)")
    result = {
        "fp32_top1": fp_acc,
        "eval_images": n_eval,
        "config": {**dataclasses.asdict(cfg), "bits": [list(b) for b in cfg.bits], "sources": list(cfg.sources)},
        "quantization": "weights per output channel, symmetric, min/max; activations per tensor at every layer "
                        f"input, asymmetric, {cfg.observer} ranges; first and last layer at 8 bits",
        "rows": rows,
        "timings": timings,
        "total_seconds": time.perf_counter() - t_start,
    }
    _write_outputs(result, cfg, log)
    return result


def _write_outputs(result: Dict[str, Any], cfg: DemoConfig, log) -> None:
    """demo.json, the table (to ``log``), demo.png and report.html, and where they went."""
    written = {"results (JSON)": os.path.join(cfg.out, "demo.json")}
    atomic_write_bytes(written["results (JSON)"], json.dumps(result, indent=2).encode())
    log(format_table(result))
    try:
        write_chart(result, os.path.join(cfg.out, "demo.png"))
        written["chart (PNG)"] = os.path.join(cfg.out, "demo.png")
        from .report import write_report

        dirs = [os.path.join(cfg.out, "data", m) for m in SOURCE_RECIPES if m in cfg.sources]
        if dirs:
            write_report(dirs, os.path.join(cfg.out, "report.html"), demo=written["results (JSON)"])
            written["report (HTML)"] = os.path.join(cfg.out, "report.html")
    except ImportError:
        log("matplotlib is missing: no chart and no report (pip install matplotlib)")
    log(f"\nwritten ({result['total_seconds'] / 60:.1f} min in all):")
    for what, path in written.items():
        log(f"  {what:15s} {path}")


def _pct(value) -> str:
    return f"{value:6.2f}" if value is not None else f"{'-':>6s}"


def format_table(result: Dict[str, Any]) -> str:
    rows = result["rows"]
    sources = list(dict.fromkeys(r["source"] for r in rows))
    bits = list(dict.fromkeys(r["bits"] for r in rows))
    cell = {(r["bits"], r["source"]): r for r in rows}
    lines = [f"top-1 % on {result['eval_images']} Fashion-MNIST test images (FP32 {result['fp32_top1']:.2f}); "
             f"each cell: plain calibration / reconstruction ({result['config'].get('reconstruction', 'adaround')}, "
             f"{result['config']['adaround_iterations']} iterations per layer or block)"
             + (", both bias-corrected" if result["config"].get("bias_correction") else "")]
    lines.append(f"{'bits':8s}" + "".join(f"{s:>18s}" for s in sources))
    for b in bits:
        lines.append(f"{b:8s}" + "".join(
            f"{cell[b, s]['calibration']:8.2f} / {_pct(cell[b, s]['adaround'])}" if (b, s) in cell else f"{'-':>18s}"
            for s in sources))
    return "\n".join(lines)


def write_chart(result: Dict[str, Any], path: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    sources = list(dict.fromkeys(r["source"] for r in rows))
    bits = list(dict.fromkeys(r["bits"] for r in rows))
    cell = {(r["bits"], r["source"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    width = 0.8 / len(sources)
    for ax, key, title in zip(axes, ("calibration", "adaround"), ("plain calibration", "reconstruction")):
        for i, s in enumerate(sources):
            vals = [(cell[b, s][key] or 0) if (b, s) in cell else 0 for b in bits]
            ax.bar([j + i * width for j in range(len(bits))], vals, width, label=s)
        ax.axhline(result["fp32_top1"], color="k", linestyle="--", linewidth=1, label="FP32")
        ax.set_xticks([j + width * (len(sources) - 1) / 2 for j in range(len(bits))], bits)
        ax.set_title(title)
        lo = min(r[k] for r in rows for k in ("calibration", "adaround") if r[k] is not None)
        ax.set_ylim(max(0, lo - 5), 100)
    axes[0].set_ylabel(f"top-1 % ({result['eval_images']} Fashion-MNIST test images)")
    axes[1].legend(loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())

