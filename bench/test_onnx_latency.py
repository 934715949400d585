"""Smoke test of bench/onnx_latency.py (CI runs bench/ once, untimed): every row is built and timed,
onnxruntime's own quantize_static file and ours are counted in onnxruntime's optimised graph, and the
deployment file runs every convolution and residual add in integer kernels."""

import json

import onnx_latency


def test_every_row_is_measured_side_by_side(tmp_path, capsys):
    out = tmp_path / "latency.json"
    assert onnx_latency.main(["--model", "fashion-mnist-resnet20", "--real", "--samples", "32", "--eval", "300",
                              "--repeat", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert list(rows) == ["fp32", "ort", "ort-rr", "deploy-w8a8", "deploy-vnni-w8a8", "deploy-w4a8", "input-w8a8"]
    assert all(r["latency_ms"] > 0 and r["throughput_img_s"] > 0 and r["bytes"] > 0 for r in rows.values())
    assert rows["ort"]["qlinearconv"] == rows["ort"]["convs"] == 21  # onnxruntime's own file fuses every conv
    assert rows["ort-rr"]["qlinearconv"] == 21
    for k in ("deploy-w8a8", "deploy-vnni-w8a8", "deploy-w4a8"):
        assert rows[k]["qlinearconv"] == 21 and rows[k]["qlinearadd"] == 9 and rows[k]["float_nodes"] == 0
        assert rows[k]["same_as_torch_pct"] >= 99.0
    assert rows["input-w8a8"]["qlinearconv"] < 21  # the paper's placement: some convs stay float
    assert abs(rows["deploy-w8a8"]["top1"] - rows["fp32"]["top1"]) <= 3.0
    printed = capsys.readouterr().out
    assert "CPU:" in printed and "deploy-w8a8" in printed and "VNNI" in printed
