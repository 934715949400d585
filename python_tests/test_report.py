"""`dsg report`: the HTML page for generation directories, quantized files and a demo result,
rendered in headless Chromium (Debian's package, installed here when missing and apt can) and
checked not to be blank."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from dsg_ext.errors import ReportError
from dsg_ext.report import write_report
from dsg_ext.synthesis import SynthesisConfig, generate

TESTS = os.path.dirname(__file__)
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
MODEL = "tiny_models:tiny_bn_net"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    dirs = []
    for method in ("dsg", "zeroq"):
        out = str(root / method)
        generate(MODEL, out, SynthesisConfig(method=method, iterations=5, batch_size=8, image_size=12, lr=0.1), 16,
                 show_progress=False)
        dirs.append(out)
    q = str(root / "q.safetensors")
    r = subprocess.run([sys.executable, "-m", "dsg_ext", "quantize", "--model", MODEL, "--image-size", "12",
                        "--calib", dirs[0], "--wbits", "4", "--abits", "8", "--out", q], capture_output=True,
                       text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    return dirs, q


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", "chromium"]
        if subprocess.run(install, capture_output=True, env=env).returncode != 0:  # package lists may be empty
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            subprocess.run(install, capture_output=True, env=env)
    return shutil.which("chromium")


def test_the_report_renders(made, tmp_path):
    dirs, q = made
    demo = tmp_path / "demo.json"
    demo.write_text(json.dumps({"fp32_top1": 93.5, "rows": [
        {"bits": b, "source": s, "calibration": 90 + i, "adaround": 91 + i}
        for i, b in enumerate(("W8A8", "W4A4")) for s in ("real", "dsg")]}))
    out = str(tmp_path / "report.html")
    r = subprocess.run([sys.executable, "-m", "dsg_ext", "report", *dirs, "--quantized", q, "--demo", str(demo),
                        "--out", out], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    page = open(out).read()
    for part in ("BN alignment", "Homogenisation", "Quantization", "top-1 agreement", "Configs", "dsg (dsg)",
                 "zeroq (zeroq)"):
        assert part in page, part
    assert page.count("data:image/png;base64,") >= 6  # grids x2, losses, alignment, homogenisation, bars
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium and it could not be installed (apt-get install chromium)")
    shot = str(tmp_path / "shot.png")
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1100,3000", f"--screenshot={shot}", f"file://{out}"],
                       capture_output=True, text=True, timeout=120)
    assert os.path.exists(shot), r.stderr[-2000:]
    from PIL import Image

    image = Image.open(shot).convert("L")
    pixels = list(image.getdata())
    dark = sum(p < 200 for p in pixels) / len(pixels)
    assert image.size == (1100, 3000) and dark > 0.02, dark  # text, grids and plots, not a blank page


def test_report_refusals(made, tmp_path):
    dirs, _ = made
    with pytest.raises(ReportError, match="not a `dsg generate` directory"):
        write_report([str(tmp_path)], str(tmp_path / "r.html"))
    bad = tmp_path / "demo.json"
    bad.write_text("{}")
    with pytest.raises(ReportError, match="not a `dsg demo` result"):
        write_report(dirs[:1], str(tmp_path / "r.html"), demo=str(bad))
    existing = tmp_path / "r.html"
    existing.write_text("keep")
    r = subprocess.run([sys.executable, "-m", "dsg_ext", "report", dirs[0], "--out", str(existing)],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and "--force" in r.stderr and existing.read_text() == "keep"
