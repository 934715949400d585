"""Mixed precision by rule (``QuantConfig.layer_wbits``): which layers each selector picks, later rules
winning, the errors for a rule that is malformed, out of range or matches nothing, and the per-layer
bits carried through the file (checked on load) and the ONNX export."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from dsg_ext import quantization as Q
from dsg_ext.errors import ConfigError, QuantizedFileError
from dsg_ext.models import model_identity
from dsg_ext.quantization.serialization import content_checksum


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),   # depthwise
        nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU(),  # grouped, not depthwise
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


X = torch.randn(8, 3, 10, 10, generator=torch.Generator().manual_seed(1))


def _bits(rules, **kw):
    q = Q.quantize_model(_net(), Q.QuantConfig(wbits=4, layer_wbits=rules, **kw), X[:1])
    return {n: wq.bits for n, wq in Q.weight_quantizers(q).items()}


def test_selectors_and_later_rules_winning():
    assert _bits("", first_last_bits=None) == {"0": 4, "3": 4, "6": 4, "9": 4, "14": 4}
    assert _bits("depthwise=8", first_last_bits=None) == {"0": 4, "3": 8, "6": 4, "9": 4, "14": 4}
    assert _bits("first=6,last=3", first_last_bits=None) == {"0": 6, "3": 4, "6": 4, "9": 4, "14": 3}
    assert _bits("?=5,depthwise=8") == {"0": 5, "3": 8, "6": 5, "9": 5, "14": 8}  # glob on names, after edges
    assert _bits("depthwise=8,3=2")["3"] == 2  # the later rule wins
    assert Q.QuantConfig(layer_wbits="depthwise=8").label() == "W4A4[depthwise=8]"


@pytest.mark.parametrize("rules,message", [
    ("depthwise", "is not SELECTOR=BITS"), ("=8", "is not SELECTOR=BITS"), ("depthwise=eight", "SELECTOR=BITS"),
    ("depthwise=9", "bits must be an integer in 2..8"), ("first=1", "2..8"),
])
def test_malformed_rules_are_refused_by_validate(rules, message):
    with pytest.raises(ConfigError, match=message):
        Q.QuantConfig(layer_wbits=rules).validate()


def test_a_rule_that_matches_no_layer_names_itself():
    with pytest.raises(ConfigError, match="rule blocks.\\*=8 matches no quantized layer of this model"):
        Q.quantize_model(_net(), Q.QuantConfig(layer_wbits="depthwise=8,blocks.*=8"), X[:1])
    with pytest.raises(ConfigError, match="depthwise=8 matches no"):
        Q.quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(),
                         Q.QuantConfig(layer_wbits="depthwise=8"), X[:1])


def test_per_layer_bits_travel_through_the_file_and_are_checked_on_load(tmp_path):
    model = _net()
    q = Q.quantize_model(model, Q.QuantConfig(wbits=3, layer_wbits="depthwise=8", first_last_bits=None), X[:1])
    Q.calibrate(q, X)
    path = str(tmp_path / "mixed.safetensors")
    Q.save_quantized(q, path, "test", model_identity(model))
    back = Q.load_quantized(_net(), path, model_identity(model), X[:1])
    assert {n: wq.bits for n, wq in Q.weight_quantizers(back).items()} == {"0": 3, "3": 8, "6": 3, "9": 3, "14": 3}
    assert torch.equal(back(X), q(X))
    # the rule removed from the metadata (checksum recomputed): the depthwise layer's 8-bit integers are
    # out of its 3-bit range and the file is refused naming the layer
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["dsg_ext"])
    meta["config"]["layer_wbits"] = ""
    meta["checksum"] = content_checksum(tensors, meta)
    forged = tmp_path / "forged.safetensors"
    forged.write_bytes(save(tensors, metadata={"dsg_ext": json.dumps(meta)}))
    # the file's own per-layer record no longer follows from its config
    with pytest.raises(QuantizedFileError, match="per-layer weight bits do not follow from its config \\(layer '3': "
                                                 "file 8, config 3\\)"):
        Q.load_quantized(_net(), str(forged), model_identity(model), X[:1])
    # and without that record (a forger who drops it too), the integers themselves are out of range
    del meta["weight_bits"]
    meta["checksum"] = content_checksum(tensors, meta)
    forged.write_bytes(save(tensors, metadata={"dsg_ext": json.dumps(meta)}))
    with pytest.raises(QuantizedFileError, match="layer '3'.*-4..3"):
        Q.load_quantized(_net(), str(forged), model_identity(model), X[:1])


def test_a_mixed_precision_model_exports_and_onnxruntime_computes_it(tmp_path):
    pytest.importorskip("onnxruntime")
    from dsg_ext.export import export_onnx

    q = Q.quantize_model(_net(), Q.QuantConfig(wbits=4, abits=8, layer_wbits="depthwise=8,6=6"), X[:1])
    Q.calibrate(q, X)
    Q.finalize_weights(q)
    record = export_onnx(q, X[:2], str(tmp_path / "mixed.onnx"))
    assert record["max_abs_diff_vs_ours"] < 1e-4
