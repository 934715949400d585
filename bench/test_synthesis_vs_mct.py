"""Smoke test of bench/synthesis_vs_mct.py (CI runs bench/ once, untimed): every tool it times runs, and
the plain loop of the recipe lowers the loss it optimises (so its row times a working loop)."""

import json

import pytest
import synthesis_vs_mct
import torch

from dsg_ext.models import load_model
from dsg_ext.synthesis import SynthesisConfig


def test_every_tool_runs_and_the_table_is_printed(tmp_path, capsys):
    out = tmp_path / "speed.json"
    tools = "recommended,paper-dsg,plain,paper-dsg+cl+bf16"
    try:
        import model_compression_toolkit  # noqa: F401
        tools += ",mct"
    except ImportError:
        pass
    assert synthesis_vs_mct.main(["--model", "fashion-mnist-resnet20", "--batch", "4", "--repeats", "1",
                                  "--short", "1", "--long", "2", "--tools", tools, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["ms_per_image_iteration"]) == set(tools.split(","))
    text = capsys.readouterr().out
    assert "| recommended |" in text and "CPU:" in text


def test_an_unknown_tool_is_named():
    with pytest.raises(SystemExit):
        synthesis_vs_mct.main(["--tools", "recommended+fast"])


def test_the_plain_recipe_loop_optimises_its_loss():
    loaded = load_model("fashion-mnist-resnet20")
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    config = SynthesisConfig.from_recipe("recommended", batch_size=8, image_size=28, channels=1, lr=0.1)

    def bn_loss(images):
        losses = []
        hooks = [m.register_forward_pre_hook(lambda mod, i: losses.append(
            (i[0].mean((0, 2, 3)) - mod.running_mean).pow(2).sum())) for m in model.modules()
            if isinstance(m, torch.nn.BatchNorm2d)]
        with torch.no_grad():
            model(images[..., 2:30, 2:30])
        for h in hooks:
            h.remove()
        return float(torch.stack(losses).sum())

    start = synthesis_vs_mct.plain_recipe(model, config, 8, 0, loaded.input.valid_range())
    end = synthesis_vs_mct.plain_recipe(model, config, 8, 30, loaded.input.valid_range())
    assert end.shape == (8, 1, 32, 32)
    assert bn_loss(end) < bn_loss(start)


def test_long_must_exceed_short():
    with pytest.raises(SystemExit):
        synthesis_vs_mct.main(["--short", "5", "--long", "5"])


def test_the_profile_prints_one_iteration(capsys):
    import profile_synthesis
    assert profile_synthesis.main(["--model", "fashion-mnist-resnet20", "--batch", "4", "--rows", "5"]) == 0
    text = capsys.readouterr().out
    assert "Self CPU time total" in text and "CPU:" in text
