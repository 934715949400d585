"""Our synthetic data in other toolkits: the torch Dataset, batches and forward loops, and the
onnxruntime calibration reader; end to end with onnxruntime's quantize_static and torchao's PT2E
flow on the Fashion-MNIST network (calibrated with DSG data, evaluated on real test images)."""

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

from dsg_ext import (
    SynthesisConfig,
    SyntheticDataset,
    calibration_batches,
    forward_loop,
    generate,
    ort_calibration_reader,
)
from dsg_ext.data import fashion_mnist, store
from dsg_ext.errors import ConfigError, DatasetError
from dsg_ext.models import load_model

TINY = "tiny_models:tiny_bn_net"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny") / "data")
    generate(TINY, out, SynthesisConfig(method="zeroq", iterations=2, batch_size=3, image_size=8), 10,
             show_progress=False)
    return out


def test_dataset_serves_the_verified_images_one_shard_at_a_time(tiny_data):
    data = SyntheticDataset(tiny_data, load_model(TINY, image_size=8).identity)
    everything = store.load_images(tiny_data)
    assert len(data) == 10 and everything.shape == (10, 3, 8, 8)
    assert torch.equal(torch.stack([data[i] for i in range(len(data))]), everything)
    assert data._cached == 3  # the last of 4 shards (3 + 3 + 3 + 1): only one is held
    assert torch.equal(data[-1], everything[-1])
    with pytest.raises(IndexError):
        data[10]
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    assert torch.equal(torch.cat(list(loader)), everything)
    assert len(SyntheticDataset(tiny_data, max_samples=4)) == 4


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 7, 32])
def test_batches_cross_shard_boundaries(tiny_data, batch_size):
    everything = store.load_images(tiny_data)
    batches = list(calibration_batches(tiny_data, batch_size))
    assert all(b.shape[0] == batch_size for b in batches[:-1]) and 0 < batches[-1].shape[0] <= batch_size
    assert torch.equal(torch.cat(batches), everything)
    assert torch.equal(torch.cat(list(calibration_batches(tiny_data, batch_size, max_samples=5))), everything[:5])


def test_forward_loop_and_reader_see_every_image(tiny_data):
    seen = []
    forward_loop(tiny_data, batch_size=4)(lambda x: seen.append(x))
    assert torch.equal(torch.cat(seen), store.load_images(tiny_data))
    reader = ort_calibration_reader(tiny_data, "images", batch_size=4)
    first = [reader.get_next()["images"] for _ in range(3)]
    assert reader.get_next() is None and sum(a.shape[0] for a in first) == 10
    reader.rewind()
    assert np.array_equal(reader.get_next()["images"], first[0])


def test_refusals(tiny_data, tmp_path):
    with pytest.raises(DatasetError, match="another model"):
        SyntheticDataset(tiny_data, "0" * 64)
    with pytest.raises(ConfigError, match="batch_size"):
        next(calibration_batches(tiny_data, 0))
    broken = str(tmp_path / "broken")
    shutil.copytree(tiny_data, broken)
    with open(os.path.join(broken, "shard_00002.safetensors"), "ab") as f:
        f.write(b"x")
    data = SyntheticDataset(broken)
    data[0]  # shards are verified when they are read
    with pytest.raises(DatasetError, match="checksum mismatch"):
        data[7]
    manifest = json.load(open(os.path.join(broken, store.MANIFEST)))
    manifest["complete"] = False
    json.dump(manifest, open(os.path.join(broken, store.MANIFEST), "w"))
    with pytest.raises(DatasetError, match="unfinished"):
        SyntheticDataset(broken)


# --- end to end on the Fashion-MNIST network -------------------------------------------------------

MODEL = "fashion-mnist-resnet20"
EVAL = 2000


@pytest.fixture(scope="module")
def fm(tmp_path_factory):
    """DSG data for the network, its FP32 ONNX file, and the test images."""
    root = tmp_path_factory.mktemp("fm")
    data = str(root / "dsg")
    generate(MODEL, data, SynthesisConfig(method="dsg", iterations=50, batch_size=64), 128, show_progress=False,
             image_size=None)
    loaded = load_model(MODEL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(loaded.model, (torch.zeros(2, 1, 32, 32),), str(root / "fp32.onnx"), dynamo=True,
                          input_names=["x"], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                          verbose=False, external_data=False)
    images, labels = fashion_mnist.load_split(train=False)
    return data, str(root / "fp32.onnx"), fashion_mnist.preprocess(images[:EVAL]), labels[:EVAL], loaded


def _onnx_top1(path, x, y):
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    pred = np.concatenate([session.run(None, {"x": x[i:i + 500].numpy()})[0].argmax(1) for i in range(0, len(x), 500)])
    return float(np.mean(pred == y.numpy())) * 100


def test_onnxruntime_quantize_static_with_our_data(fm, tmp_path):
    """DSG data against Gaussian noise as onnxruntime's calibration set (docs/deploy.md's table has the
    full-size figures: with min/max observers DSG data calibrate worse than noise)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from dsg_ext.data.calibration import gaussian_noise

    data, fp32, x, y, loaded = fm

    class Noise(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(gaussian_noise(loaded.input, 128).numpy().reshape(4, 32, 1, 32, 32))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"x": batch}

    top1 = {"fp32": _onnx_top1(fp32, x, y)}
    for name, reader in (("dsg", ort_calibration_reader(data, "x", model_identity=loaded.identity)),
                         ("noise", Noise())):
        out = str(tmp_path / f"w8a8-{name}.onnx")
        quantize_static(fp32, out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        top1[name] = _onnx_top1(out, x, y)
    print("onnxruntime quantize_static W8A8 top-1:", top1)
    assert top1["fp32"] > 93 and top1["dsg"] > 80 and top1["noise"] > 80, top1  # working W8A8 models


def test_torchao_pt2e_with_our_data(fm):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    data, _, x, y, loaded = fm
    exported = torch.export.export(loaded.model, (torch.zeros(2, 1, 32, 32),),
                                   dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    forward_loop(data, model_identity=loaded.identity)(prepared)
    converted = convert_pt2e(prepared)
    with torch.no_grad():
        pred = torch.cat([converted(x[i:i + 500]) for i in range(0, len(x), 500)]).argmax(1)
    assert float((pred == y).float().mean()) * 100 > 92
