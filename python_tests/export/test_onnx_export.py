"""`dsg export`: the quantized model as ONNX QDQ, run in onnxruntime (CPU) on real images.

Tolerance: onnxruntime and PyTorch sum a convolution's products in different orders, so a value
lying within a few ulps of a rounding boundary of an activation quantizer can round to the
neighbouring integer in one of them; that step (one quantization step of that layer) then
propagates. So the predictions must agree (top-1 within 0.1 points, >= 99.5% of images the same
class) and almost all logits must match closely (99th percentile of |difference| <= 1% of the
largest logit); a few images may differ by about one step of a 4-bit layer."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dsg_ext import quantization as Q
from dsg_ext.data import fashion_mnist
from dsg_ext.data.calibration import real_fashion_mnist
from dsg_ext.errors import ExportError
from dsg_ext.export import export_onnx
from dsg_ext.models import load_model

TESTS = os.path.dirname(os.path.dirname(__file__))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
EVAL_IMAGES = 2000


def dsg(*args):
    r = subprocess.run([sys.executable, "-m", "dsg_ext", *args], capture_output=True, text=True, env=ENV)
    return r


def run_onnx(path, name, x, batch=500):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(np.concatenate([session.run(None, {name: x[i:i + batch].numpy()})[0]
                                            for i in range(0, x.shape[0], batch)]))


@pytest.fixture(scope="module")
def test_images():
    images, labels = fashion_mnist.load_split(train=False)
    return fashion_mnist.preprocess(images[:EVAL_IMAGES]), labels[:EVAL_IMAGES]


def _top1(logits, labels):
    return float((logits.argmax(1) == labels).float().mean()) * 100


@pytest.mark.parametrize("wbits,abits", [(8, 8), (4, 8), (4, 4)])
def test_resnet20_onnx_matches_dsg_eval(tmp_path, test_images, wbits, abits):
    q_file, onnx_file, result = (str(tmp_path / n) for n in ("q.safetensors", "m.onnx", "eval.json"))
    r = dsg("quantize", "--model", "fashion-mnist-resnet20", "--real", "fashion-mnist", "--wbits", str(wbits),
            "--abits", str(abits), "--observer", "minmax", "--out", q_file)
    assert r.returncode == 0, r.stderr
    r = dsg("eval", "--model", "fashion-mnist-resnet20", "--quantized", q_file, "--data", "fashion-mnist",
            "--max-images", str(EVAL_IMAGES), "--json", result)
    assert r.returncode == 0, r.stderr
    ours = json.load(open(result))["top1"]
    r = dsg("export", "--model", "fashion-mnist-resnet20", "--quantized", q_file, "--out", onnx_file)
    assert r.returncode == 0 and "QuantizeLinear" in r.stdout, r.stderr
    x, y = test_images
    theirs = run_onnx(onnx_file, "x", x)
    assert abs(_top1(theirs, y) - ours) <= 0.1, (_top1(theirs, y), ours)

    loaded = load_model("fashion-mnist-resnet20")
    qmodel = Q.load_quantized(loaded.model, q_file, loaded.identity, x[:1])
    with torch.no_grad():
        logits = torch.cat([qmodel(x[i:i + 500]) for i in range(0, x.shape[0], 500)])
    assert float((logits.argmax(1) == theirs.argmax(1)).float().mean()) >= 0.995
    diff = (logits - theirs).abs().flatten()
    assert float(diff.quantile(0.99)) <= 0.01 * float(logits.abs().max()), float(diff.quantile(0.99))


def _quantized_resnet20(wbits=4, abits=4, **kw):
    loaded = load_model("fashion-mnist-resnet20")
    calib = real_fashion_mnist(128)
    q = Q.quantize_model(loaded.model, Q.QuantConfig(wbits=wbits, abits=abits, observer="minmax", **kw), calib[:1])
    Q.calibrate(q, calib)
    Q.finalize_weights(q)
    return q, calib


def test_the_graph_is_standard_qdq_with_our_integers(tmp_path):
    q, calib = _quantized_resnet20()
    path = str(tmp_path / "m.onnx")
    record = export_onnx(q, calib[:2], path)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    graph = model.graph
    assert [i.name for i in graph.input] == ["x"] and graph.input[0].type.tensor_type.shape.dim[0].dim_param
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    wqs = Q.weight_quantizers(q)
    ints = sorted(tuple(wq.w_int.flatten().tolist()) for wq in wqs.values())
    seen = []
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm"):
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear" and dq.input[0] in inits, node.name
            w = onnx.numpy_helper.to_array(inits[dq.input[0]])
            zero_point = onnx.numpy_helper.to_array(inits[dq.input[2]])
            if w.dtype == np.uint8:  # the first layer: the same integers + 128 (onnxruntime's exact U8U8 kernels)
                assert (zero_point == 128).all() and not seen, node.name
                w = w.astype(np.int64) - 128
            else:
                assert w.dtype == np.int8 and (zero_point == 0).all()
            seen.append(tuple(w.flatten().tolist()))
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            assert axis == 0 and onnx.numpy_helper.to_array(inits[dq.input[1]]).size == w.shape[0]
    assert sorted(seen) == ints  # the integers of our model, every layer
    assert record["nodes"]["QuantizeLinear"] >= 1 and record["nodes"].get("Clip", 0) >= 1  # 4-bit ranges clipped
    for batch in (1, 7):  # dynamic batch
        assert run_onnx(path, "x", calib[:batch]).shape == (batch, 10)


@pytest.mark.parametrize("kw", [{"w_symmetric": False}, {"w_per_channel": False}, {"act_placement": "relu"},
                                {"fold_bn": True}, {"fold_bn": True, "w_per_channel": False}],
                         ids=["asymmetric-weights", "per-tensor-weights", "relu-placement", "folded-bn",
                              "folded-bn-per-tensor"])
def test_every_quantizer_layout_exports(tmp_path, kw):
    """The file computes our model: onnxruntime without graph optimisations agrees image for image.
    With them, where BN is folded ORT fuses DequantizeLinear -> Conv -> QuantizeLinear into its
    integer convolution (bias rounded to int32 at scale s_x * s_w), which moves some 4-bit results
    by a step: measured >= 97% agreement on these 128 images (docs/deploy.md)."""
    q, calib = _quantized_resnet20(**kw)
    path = str(tmp_path / "m.onnx")
    export_onnx(q, calib[:2], path)
    with torch.no_grad():
        ours = q(calib)
    for level, least in ((ort.GraphOptimizationLevel.ORT_DISABLE_ALL, 1.0), (ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                                                             0.97 if kw.get("fold_bn") else 1.0)):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        theirs = torch.from_numpy(session.run(None, {"x": calib.numpy()})[0])
        assert float((theirs.argmax(1) == ours.argmax(1)).float().mean()) >= least, (kw, level)
        if least == 1.0:
            diff = (ours - theirs).abs().flatten()
            assert float(diff.quantile(0.99)) <= 0.01 * float(ours.abs().max()), (kw, level, float(diff.max()))


def test_efficientnet_lite0_exports_and_agrees(tmp_path):
    from dsg_ext.data.photos import photo_crops

    loaded = load_model("efficientnet-lite0")
    crops = photo_crops(loaded.input)
    q = Q.quantize_model(loaded.model, Q.QuantConfig(wbits=8, abits=8), crops[:1])
    Q.calibrate(q, crops[:32])
    Q.finalize_weights(q)
    path = str(tmp_path / "lite0.onnx")
    record = export_onnx(q, crops[:2], path)
    assert record["input"] == "inputs"
    with torch.no_grad():
        ours = torch.cat([q(crops[i:i + 20]) for i in range(0, crops.shape[0], 20)])
        fp = torch.cat([loaded.model(crops[i:i + 20]) for i in range(0, crops.shape[0], 20)])
    theirs = run_onnx(path, "inputs", crops, batch=20)
    agreement = float((ours.argmax(1) == theirs.argmax(1)).float().mean())
    # onnxruntime fuses some of this placement's convolutions into integer kernels that round otherwise than our
    # float convolution (mean logit difference 0.022): near-ties among the 1000 classes flip (measured 96.9%, 97.5%
    # and 99.4% same top-1 for three calibrations of equal quality), while the file stays far closer to our model
    # than our model is to FP32 -- the deployment placement's Lite0 test asks the same.
    assert agreement >= 0.95, agreement
    assert _kl(ours, theirs) <= 0.1 * _kl(fp, ours), (_kl(ours, theirs), _kl(fp, ours))


def _kl(p, q):
    lp, lq = torch.log_softmax(p.double(), 1), torch.log_softmax(q.double(), 1)
    return float((lp.exp() * (lp - lq)).sum(1).mean())


@pytest.mark.parametrize("kind", ["export", "script"])
def test_graph_sources_export(tmp_path, kind):
    from tiny_models import tiny_bn_net

    eager = tiny_bn_net()
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    if kind == "export":
        source = str(tmp_path / "m.pt2")
        batch = torch.export.Dim("batch")
        torch.export.save(torch.export.export(eager, (x[:2],), dynamic_shapes=({0: batch},)), source)
    else:
        source = str(tmp_path / "m.pt")
        torch.jit.script(eager).save(source)
    extra = [] if kind == "export" else ["--trust-model-code"]
    q_file, onnx_file = str(tmp_path / "q.safetensors"), str(tmp_path / "m.onnx")
    r = dsg("quantize", "--model", source, *extra, "--image-size", "12", "--real", "noise", "--wbits", "8",
            "--abits", "8", "--out", q_file)
    assert r.returncode == 0, r.stderr
    r = dsg("export", "--model", source, *extra, "--image-size", "12", "--quantized", q_file, "--out", onnx_file)
    assert r.returncode == 0, r.stderr
    name = onnx.load(onnx_file).graph.input[0].name
    assert run_onnx(onnx_file, name, x).shape == (8, 10)


def test_export_refusals(tmp_path):
    q, calib = _quantized_resnet20(8, 8)
    loaded = load_model("fashion-mnist-resnet20")
    q_file = str(tmp_path / "q.safetensors")
    Q.save_quantized(q, q_file, "fashion-mnist-resnet20", loaded.identity)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"finished work")
    r = dsg("export", "--model", "fashion-mnist-resnet20", "--quantized", q_file, "--out", str(out))
    assert r.returncode == 2 and "--force" in r.stderr and out.read_bytes() == b"finished work"
    r = dsg("export", "--model", "tiny_models:tiny_bn_net", "--image-size", "12", "--quantized", q_file,
            "--out", str(tmp_path / "other.onnx"))
    assert r.returncode == 2 and "another model" in r.stderr and not (tmp_path / "other.onnx").exists()
    r = dsg("export", "--model", "fashion-mnist-resnet20", "--quantized", q_file, "--opset", "12",
            "--out", str(tmp_path / "old.onnx"))
    assert r.returncode == 2 and "--opset" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ExportError, match="not calibrated|no integer weights"):
        export_onnx(Q.quantize_model(loaded.model, Q.QuantConfig(), calib[:1]), calib[:1], str(tmp_path / "x.onnx"))


@torch.library.custom_op("dsgtest::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@mystery.register_fake
def _mystery_fake(x):
    return torch.empty_like(x)


def test_an_op_onnx_cannot_express_is_named(tmp_path):
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return mystery(self.bn(self.conv(x)))

    x = torch.randn(4, 3, 8, 8)
    q = Q.quantize_model(Net().eval(), Q.QuantConfig(wbits=8, abits=8), x[:1])
    Q.calibrate(q, x)
    Q.finalize_weights(q)
    with pytest.raises(ExportError, match=r"dsgtest\.mystery"):
        export_onnx(q, x[:2], str(tmp_path / "m.onnx"))
    assert not os.listdir(tmp_path)  # no partial file
