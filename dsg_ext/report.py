"""`dsg report`: one self-contained HTML page (figures embedded as PNG) for `dsg generate`
directories and, when given, quantized files and a `dsg demo` result:

- the samples (an image grid per directory);
- BN alignment per layer: the synthetic batch's channel mean and std against the BN's running ones,
  and each layer's loss at the start and the end of the optimisation;
- homogenisation, the paper's subject: the spread over samples of the per-sample statistics per
  layer, and their histogram at one layer, every directory overlaid (DSG against ZeroQ when both
  are given);
- fidelity to FP32 of each quantized file on the samples, and accuracy per bit width and
  calibration source from a demo result;
- timings and the full configs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from ._utils.io import atomic_write_bytes, check_output_file, read_regular
from .data import store
from .errors import DsgError, ReportError

MAX_IMAGES = 256  # samples read per directory (statistics and the grid)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figure(width=9, height=3.2, cols=1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, cols, figsize=(width, height))


def _grid(images: torch.Tensor, spec: Dict[str, Any]) -> str:
    from .synthesis.writer import image_grid

    img = image_grid(images, spec["mean"], spec["std"])
    fig, ax = _figure(5, 5)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
    ax.axis("off")
    return _png(fig)


def _layer_statistics(model, images: torch.Tensor) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per BN layer: per-sample (N, C) means and stds of its input, and its running mean / std."""
    from .synthesis.loop import per_sample_moments
    from .synthesis.taps import batchnorm_layers

    moments = per_sample_moments(model, images)
    return {name: {"mean": moments[name][0].float(), "std": moments[name][1].float(),
                   "bn_mean": bn.running_mean.float(), "bn_std": torch.sqrt(bn.running_var.float() + bn.eps)}
            for name, bn in batchnorm_layers(model)}


class _Source:
    """One `dsg generate` directory with what the report shows of it."""

    def __init__(self, directory: str, trust_model_code: bool, weights: Optional[str]):
        from .models import load_model

        self.directory = directory
        manifest = store.load_manifest(directory)
        if manifest is None:
            raise ReportError(f"{directory} is not a `dsg generate` directory (no {store.MANIFEST})")
        self.manifest = manifest
        self.images = store.load_images(directory, max_samples=MAX_IMAGES)
        self.label = f"{manifest.get('method')} ({os.path.basename(os.path.normpath(directory))})"
        self.model, self.note = None, ""
        model = manifest.get("model") or {}
        try:
            loaded = load_model(model.get("source", ""), weights=weights, image_size=manifest["image_shape"][-1],
                                trust_model_code=trust_model_code)
            if loaded.identity != model.get("sha256"):
                self.note = "the model source now holds other weights than the ones the data were made from"
            else:
                self.model = loaded
        except DsgError as e:
            self.note = f"the model could not be loaded for the statistics ({e})"
        self.stats = _layer_statistics(self.model.model, self.images) if self.model else None


def _alignment(sources: List[_Source]) -> str:
    fig, (ax1, ax2) = _figure(10, 3.4, cols=2)
    for s in (s for s in sources if s.stats):
        gaps, ratios = [], []
        for st in s.stats.values():
            batch_mean = st["mean"].mean(0)
            batch_std = torch.sqrt((st["std"] ** 2).mean(0) + st["mean"].var(0, unbiased=False))
            gaps.append(float(((batch_mean - st["bn_mean"]).abs() / st["bn_std"]).mean()))
            ratios.append(float((batch_std / st["bn_std"]).mean()))
        ax1.plot(gaps, marker=".", label=s.label)
        ax2.plot(ratios, marker=".", label=s.label)
    ax1.set(title="|synthetic mean - BN mean| / BN std", xlabel="BN layer", yscale="log")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set(title="synthetic std / BN std (1 = matched)", xlabel="BN layer")
    ax1.legend(fontsize=8)
    return _png(fig)


def _losses(sources: List[_Source]) -> str:
    fig, ax = _figure()
    for s in sources:
        per_layer = (s.manifest.get("summary") or {}).get("per_layer", [])
        if per_layer:
            ax.plot([r["initial"] for r in per_layer], ls="--", label=f"{s.label} start")
            ax.plot([r["final"] for r in per_layer], label=f"{s.label} end")
    ax.set_yscale("symlog", linthresh=1e-3)  # DSG's slack takes many losses to exactly 0
    ax.set(title="per-layer statistic loss, start and end of synthesis", xlabel="BN layer")
    ax.legend(fontsize=8)
    return _png(fig)


def _homogenization(sources: List[_Source]) -> str:
    fig, (ax1, ax2) = _figure(10, 3.4, cols=2)
    for s in (s for s in sources if s.stats):
        spread = [float((st["mean"].std(0) / st["bn_std"]).mean()) for st in s.stats.values()]
        ax1.plot(spread, marker=".", label=s.label)
        middle = list(s.stats.values())[len(s.stats) // 2]
        z = ((middle["mean"] - middle["bn_mean"]) / middle["bn_std"]).flatten().clamp(-6, 6)
        ax2.hist(z.numpy(), bins=60, alpha=0.5, density=True, label=s.label)
    ax1.set(title="sample spread (higher = more diverse)", xlabel="BN layer",
            ylabel="std over samples of\nper-sample means / BN std")
    ax2.set(title="per-sample channel means, middle BN layer", xlabel="(per-sample mean - BN mean) / BN std")
    ax1.legend(fontsize=8)
    return _png(fig)


def _quantized_rows(paths: Sequence[str], source: Optional[_Source]) -> List[Dict[str, Any]]:
    from .evaluation import fidelity
    from .quantization import load_quantized, read_quantized

    rows = []
    for path in paths:
        tensors, meta = read_quantized(path)
        row = {"file": path, "config": meta.get("config"), "calibration": meta.get("calibration"),
               "label": f"W{meta['config'].get('wbits')}A{meta['config'].get('abits') or 32}",
               "weight_bits": meta.get("weight_bits"), "bit_allocation": meta.get("bit_allocation")}
        if row["weight_bits"]:
            counts = {n: tensors[f"{n}.weight_int"].numel() for n in row["weight_bits"]}
            row["average_wbits"] = (sum(b * counts[n] for n, b in row["weight_bits"].items())
                                    / sum(counts.values()))
            if len(set(row["weight_bits"].values())) > 1:
                row["label"] = f"mixed W{row['average_wbits']:.2f}A{meta['config'].get('abits') or 32}"
        if source is not None and source.model is not None and meta.get("model_identity") == source.model.identity:
            example = source.images[:1]
            q = load_quantized(source.model.model, path, source.model.identity, example)
            with torch.no_grad():
                row.update(fidelity(source.model.model, q, source.images))
        rows.append(row)
    return rows


def _layer_bits(rows: List[Dict[str, Any]]) -> Optional[str]:
    """Weight bits per layer (execution order) of every file that records them."""
    shown = [r for r in rows if r.get("weight_bits")]
    if not shown:
        return None
    fig, ax = _figure(10, 3.2)
    for r in shown:
        bits = list(r["weight_bits"].values())
        ax.step(range(len(bits)), bits, where="mid", label=f"{r['label']} {os.path.basename(r['file'])}")
    ax.set(title="weight bits per layer (execution order)", xlabel="layer", ylabel="bits")
    ax.legend(fontsize=7)
    return _png(fig)


def _bars(rows: List[Dict[str, Any]], demo: Optional[Dict[str, Any]]) -> Optional[str]:
    if demo:
        fig, ax = _figure(10, 3.4)
        sources = list(dict.fromkeys(r["source"] for r in demo["rows"]))
        bits = list(dict.fromkeys(r["bits"] for r in demo["rows"]))
        width = 0.8 / (2 * len(sources))
        for j, src in enumerate(sources):
            for k, key in enumerate(("calibration", "adaround")):
                vals = [next(r[key] for r in demo["rows"] if r["bits"] == b and r["source"] == src) or 0
                        for b in bits]  # None: not reconstructed at that bit setting
                ax.bar([i + (2 * j + k) * width for i in range(len(bits))], vals, width,
                       label=f"{src} {key}", alpha=0.6 if key == "calibration" else 1.0)
        ax.axhline(demo["fp32_top1"], color="k", lw=0.8, label="FP32")
        low = min(r["calibration"] for r in demo["rows"])
        ax.set(ylim=(max(0, low - 2), 100), xticks=[i + 0.4 - width / 2 for i in range(len(bits))],
               xticklabels=bits, ylabel="top-1 %", title="demo: accuracy per bit width and calibration source")
        ax.legend(fontsize=7, ncol=4)
        return _png(fig)
    scored = [r for r in rows if "top1_agreement" in r]
    if not scored:
        return None
    fig, ax = _figure()
    ax.bar(range(len(scored)), [r["top1_agreement"] for r in scored])
    ax.set(xticks=range(len(scored)), xticklabels=[f"{r['label']}\n{os.path.basename(r['file'])}" for r in scored],
           ylabel="top-1 agreement with FP32 %", title="quantized files: fidelity to FP32 on the synthetic samples")
    return _png(fig)


def _quantized_section(rows: List[Dict[str, Any]]) -> List[str]:
    """The quantized files' table, their weight bits per layer (chart) and, per file, its bits table."""
    parts = []
    cells = "".join(
        f"<tr><td>{html.escape(r['file'])}</td><td>{r['label']}</td><td>{html.escape(str(r['calibration']))}</td>"
        f"<td>{r.get('average_wbits', float('nan')):.3f}</td>"
        f"<td>{r.get('top1_agreement', float('nan')):.2f}</td><td>{r.get('mean_kl', float('nan')):.4g}</td></tr>"
        for r in rows)
    parts.append("<table><tr><th>file</th><th>bits</th><th>calibration</th><th>average weight bits</th>"
                 f"<th>top-1 agreement %</th><th>mean KL</th></tr>{cells}</table>")
    per_layer = _layer_bits(rows)
    if per_layer:
        parts.append(f'<img alt="weight bits per layer" src="data:image/png;base64,{per_layer}">')
    for r in (r for r in rows if r.get("weight_bits")):
        table = "".join(f"<tr><td>{html.escape(n)}</td><td>{b}</td></tr>" for n, b in r["weight_bits"].items())
        budget = r.get("bit_allocation") or {}
        parts.append(f"<details><summary>{html.escape(r['file'])}: weight bits per layer"
                     + (f" (automatic allocation, budget {budget.get('budget')} average bits)" if budget else "")
                     + f"</summary><table><tr><th>layer</th><th>bits</th></tr>{table}</table></details>")
    return parts


def write_report(directories: Sequence[str], out: str, quantized: Sequence[str] = (), demo: Optional[str] = None,
                 weights: Optional[str] = None, trust_model_code: bool = False) -> str:
    """Writes the HTML report.

    Args:
        directories: `dsg generate` directories (two or more are compared: DSG against ZeroQ, ...).
        out: the .html file (written whole or not at all).
        quantized: quantized-model files; each one's fidelity to FP32 is measured on the samples.
        demo: a `dsg demo` result (demo.json) for the accuracy bars.
        weights, trust_model_code: as for ``load_model``, to load the models the data were made from.

    Returns:
        ``out``.
    """
    if not directories:
        raise ReportError("give at least one `dsg generate` directory")
    check_output_file(out, "report")
    sources = [_Source(d, trust_model_code, weights) for d in directories]
    demo_result = None
    if demo:
        try:
            demo_result = json.loads(read_regular(demo, ReportError, "demo result").decode("utf-8"))
            demo_result["rows"], demo_result["fp32_top1"]  # noqa: B018 (the keys the bars need)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ReportError(f"{demo} is not a `dsg demo` result (demo.json): {e}") from None
    rows = _quantized_rows(quantized, sources[0])
    parts = [f"<h1>dsg_ext report</h1><p>{len(sources)} synthetic dataset(s)"
             + (f", {len(rows)} quantized file(s)" if rows else "") + "</p>"]
    for s in sources:
        m = s.manifest
        seconds = [r.get("seconds") for r in m["shards"] if r.get("seconds") is not None]
        count = sum(r["num_samples"] for r in m["shards"])
        parts.append(f"<h2>{html.escape(s.label)}</h2><p>{html.escape(s.directory)}: {count}"
                     f" samples of {m['image_shape']} for <code>{html.escape(str(m['model'].get('source')))}</code>"
                     + (f"; synthesis {sum(seconds):.1f} s ({sum(seconds) / len(seconds):.2f} s per batch)"
                        if seconds else "") + (f"<br><i>{html.escape(s.note)}</i>" if s.note else "") + "</p>")
        parts.append(f'<img alt="samples of {html.escape(s.label)}" src="data:image/png;base64,'
                     f'{_grid(s.images, m["input_normalization"])}">')
    parts.append("<h2>BN alignment</h2>")
    parts.append(f'<img alt="loss per layer" src="data:image/png;base64,{_losses(sources)}">')
    if any(s.stats for s in sources):
        parts.append(f'<img alt="alignment" src="data:image/png;base64,{_alignment(sources)}">')
        parts.append("<h2>Homogenisation</h2>")
        parts.append(f'<img alt="homogenisation" src="data:image/png;base64,{_homogenization(sources)}">')
    bars = _bars(rows, demo_result)
    if rows or bars:
        parts.append("<h2>Quantization</h2>")
    if bars:
        parts.append(f'<img alt="accuracy" src="data:image/png;base64,{bars}">')
    if rows:
        parts.extend(_quantized_section(rows))
    parts.append("<h2>Configs</h2>")
    for s in sources:
        config = html.escape(json.dumps(s.manifest["config"], indent=1))
        parts.append(f"<h3>{html.escape(s.label)}</h3><pre>{config}</pre>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>dsg_ext report</title><style>"
            "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}img{max-width:100%}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}</style></head><body>"
            + "\n".join(parts) + "</body></html>")
    atomic_write_bytes(out, page.encode("utf-8"))
    return out

