"""The `dsg` command takes every default and choice from the config classes (one source of truth),
and reports a user's mistake as one line with exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from dsg_ext import cli
from dsg_ext.demo import DemoConfig
from dsg_ext.quantization import (
    OBSERVERS,
    PLACEMENTS,
    RECONSTRUCTION_UNITS,
    WEIGHT_OBSERVERS,
    AdaRoundConfig,
    QuantConfig,
)
from dsg_ext.quantization.algorithms.engine import ENGINES
from dsg_ext.synthesis import INITS, LAYER_WEIGHTINGS, METHODS, SynthesisConfig


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _shown_defaults(name: str, monkeypatch) -> dict:
    """{flag: the default its --help line shows} of a subcommand."""
    monkeypatch.setenv("COLUMNS", "400")  # no wrapped help texts
    text = _subparser(name).format_help()
    entries = re.split(r"\n(?=  -)", text.split("options:", 1)[1])  # one entry per option, help included
    shown = {}
    for entry in entries:
        flag = re.match(r"\s*(--[a-z][a-z0-9-]*)", entry)
        default = re.search(r"\(default: ([^)]*)\)\s*$", entry)
        if flag and default:
            shown[flag.group(1)] = default.group(1)
    return shown


def test_quantize_defaults_are_quant_config_and_adaround_config():
    args = cli.build_parser().parse_args(["quantize", "--model", "m", "--real", "noise", "--out", "q.safetensors"])
    assert cli.config_from_args(args, QuantConfig) == QuantConfig()
    assert cli.config_from_args(args, AdaRoundConfig) == AdaRoundConfig()


def test_quantize_help_shows_the_config_defaults(monkeypatch):
    shown = _shown_defaults("quantize", monkeypatch)
    q, a = QuantConfig(), AdaRoundConfig()
    expected = {"--wbits": q.wbits, "--abits": q.abits, "--first-last-bits": q.first_last_bits,
                "--placement": q.act_placement, "--observer": q.observer, "--percentile": q.percentile,
                "--weight-observer": q.weight_observer, "--adaround-iters": a.iterations,
                "--adaround-batch": a.batch_size, "--adaround-lr": a.lr, "--reconstruct": a.unit}
    assert {k: shown.get(k) for k in expected} == {k: str(v) for k, v in expected.items()}
    # the switches flip the config's booleans
    args = cli.build_parser().parse_args(["quantize", "--model", "m", "--real", "noise", "--out", "q",
                                          "--per-tensor", "--asymmetric-weights", "--fold-bn", "--abits", "32",
                                          "--first-last-bits", "0", "--reconstruct", "block"])
    assert cli.config_from_args(args, QuantConfig) == dataclasses.replace(
        q, w_per_channel=False, w_symmetric=False, fold_bn=True, abits=None, first_last_bits=None)
    assert cli.config_from_args(args, AdaRoundConfig).unit == "block"


def test_generate_defaults_are_synthesis_config(monkeypatch):
    args = cli.build_parser().parse_args(["generate", "--model", "m", "--out", "d"])
    assert cli.config_from_args(args, SynthesisConfig) == SynthesisConfig()
    shown = _shown_defaults("generate", monkeypatch)
    s = SynthesisConfig()
    expected = {"--iterations": s.iterations, "--lr": s.lr, "--epsilon": s.epsilon, "--enhancement": s.enhancement,
                "--batch-size": s.batch_size, "--method": s.method, "--init": s.init, "--seed": s.seed,
                "--tv": s.tv_weight, "--layer-weighting": s.layer_weighting}
    assert {k: shown.get(k) for k in expected} == {k: str(v) for k, v in expected.items()}


def test_demo_defaults_are_demo_config():
    args = cli.build_parser().parse_args(["demo"])
    assert cli.config_from_args(args, DemoConfig) == DemoConfig()


@pytest.mark.parametrize("command,flag,choices", [
    ("quantize", "--observer", tuple(OBSERVERS)), ("quantize", "--weight-observer", WEIGHT_OBSERVERS),
    ("quantize", "--placement", PLACEMENTS), ("quantize", "--reconstruct", RECONSTRUCTION_UNITS),
    ("quantize", "--recon-engine", ENGINES),
    ("generate", "--method", METHODS), ("generate", "--init", INITS),
    ("generate", "--layer-weighting", LAYER_WEIGHTINGS), ("demo", "--observer", tuple(OBSERVERS)),
])
def test_choices_come_from_the_module_constants(command, flag, choices):
    action = next(a for a in _subparser(command)._actions if flag in a.option_strings)
    assert tuple(action.choices) == tuple(choices)


def test_a_user_mistake_is_one_line_and_exit_code_2(tmp_path, capsys):
    out = str(tmp_path / "q.safetensors")
    assert cli.main(["quantize", "--model", "no-such-model", "--real", "noise", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsg quantize: unknown model source 'no-such-model'")
    assert cli.main(["quantize", "--model", "fashion-mnist-resnet20", "--real", "noise", "--out", out,
                     "--wbits", "9"]) == 2
    assert "wbits must be an integer in 2..8, got 9" in capsys.readouterr().err


def _generate_config(argv):
    argv = ["generate", "--model", "m", "--out", "d", *argv]
    return cli.generate.synthesis_config(cli.build_parser().parse_args(argv))


def test_generate_recipe_sets_defaults_and_options_override_it():
    from dsg_ext.synthesis import RECIPES

    for name in RECIPES:
        assert _generate_config(["--recipe", name]) == SynthesisConfig.from_recipe(name)
    assert _generate_config(["--recipe", "zeroq"]).method == "zeroq"
    assert _generate_config(["--recipe", "zeroq", "--method", "batch"]).method == "batch"
    assert _generate_config(["--method", "batch", "--recipe=zeroq"]).method == "batch"  # order does not matter
    assert _generate_config(["--flip", "--swing", "--crop-pad", "3"]) == SynthesisConfig(flip=True, swing=True,
                                                                                          crop_pad=3)
    assert _generate_config(["--flip", "--no-flip"]).flip is False
    # an option given with its default's value still overrides the recipe (given, not "differs from default")
    assert _generate_config(["--recipe", "recommended", "--method", SynthesisConfig().method]).method == "dsg"
    assert _generate_config(["--recipe", "recommended", "--no-flip"]).flip is False


def test_one_parse_builds_every_command_once(monkeypatch):
    """`main` parses the command line once: no pre-scan of argv for presets, one parser built."""
    built = []
    real = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: built.append(1) or real())
    assert cli.main(["info"]) == 0 and built == [1]
    assert not hasattr(cli, "preset_in") and not hasattr(cli, "recipe_in")


def test_generate_unknown_recipe_exit_code_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--model", "m", "--out", "d", "--recipe", "best"])
    assert e.value.code == 2 and "invalid choice: 'best'" in capsys.readouterr().err


def _reconstruction_config(argv):
    argv = ["quantize", "--model", "m", "--real", "noise", "--out", "q", "--adaround", *argv]
    return cli.quantize.reconstruction_config(cli.build_parser().parse_args(argv))


def test_quantize_engine_option_and_graph_off_cuda_refused_before_work(tmp_path, capsys, monkeypatch):
    assert _reconstruction_config(["--recon-engine", "loop"]) == AdaRoundConfig(engine="loop")
    monkeypatch.setattr("dsg_ext.models.load_model", lambda *a, **k: pytest.fail("model loaded before the refusal"))
    out = str(tmp_path / "q.safetensors")
    assert cli.main(["quantize", "--model", "fashion-mnist-resnet20", "--real", "noise", "--out", out, "--adaround",
                     "--recon-engine", "graph", "--device", "cpu"]) == 2
    assert "engine 'graph' needs a CUDA device" in capsys.readouterr().err


def test_quantize_reconstruction_preset_and_overrides():
    from dsg_ext.quantization import RECONSTRUCTION_PRESETS

    for name in RECONSTRUCTION_PRESETS:
        assert _reconstruction_config(["--reconstruction", name]) == AdaRoundConfig.from_preset(name)
    assert _reconstruction_config([]) == AdaRoundConfig()
    got = _reconstruction_config(["--reconstruction", "genie", "--qdrop", "0.25", "--no-learn-act-scale",
                                  "--adaround-iters", "300"])
    assert got == AdaRoundConfig.from_preset("genie", qdrop=0.25, learn_act_scale=False, iterations=300)
    assert _reconstruction_config(["--learn-weight-scale", "--weight-scale-lr", "1e-3"]) == AdaRoundConfig(
        learn_weight_scale=True, weight_scale_lr=1e-3)


def test_quantize_gptq_presets_and_start_option():
    assert _reconstruction_config(["--reconstruction", "gptq"]) == AdaRoundConfig(start="gptq", iterations=0)
    assert _reconstruction_config(["--reconstruction", "gptq-brecq", "--adaround-iters", "40"]) == AdaRoundConfig(
        start="gptq", unit="block", iterations=40)
    assert _reconstruction_config(["--start", "gptq", "--gptq-damp", "0.1", "--gptq-act-order"]) == AdaRoundConfig(
        start="gptq", gptq_damp=0.1, gptq_act_order=True)


def test_quantize_zero_iterations_without_gptq_refused_before_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("dsg_ext.models.load_model", lambda *a, **k: pytest.fail("model loaded before the refusal"))
    out = str(tmp_path / "q.safetensors")
    assert cli.main(["quantize", "--model", "fashion-mnist-resnet20", "--real", "noise", "--out", out,
                     "--adaround", "--adaround-iters", "0"]) == 2
    assert "iterations must be an integer >= 1 (0 only with start='gptq')" in capsys.readouterr().err


def test_quantize_with_gptq_writes_a_file_that_records_it(tmp_path, capsys):
    from dsg_ext.quantization import read_quantized

    out = str(tmp_path / "q.safetensors")
    assert cli.main(["quantize", "--model", "fashion-mnist-resnet20", "--real", "noise", "--num-samples", "16",
                     "--out", out, "--reconstruction", "gptq"]) == 0
    captured = capsys.readouterr()
    meta = read_quantized(out)[1]
    layers = len(meta["order"])
    assert f"GPTQ: {layers} layers rounded" in captured.out and "GPTQ rounding" in captured.out
    assert "rank-deficient" in captured.err  # 16 images: the fc layer sees 16 vectors for 64 inputs
    records = meta["adaround_layers"]
    assert len(records) == layers and all(r["kind"] == "gptq" and r["error"] <= r["nearest_error"] for r in records)


def test_quantize_layer_wbits_rules(tmp_path, capsys):
    args = cli.build_parser().parse_args(["quantize", "--model", "m", "--real", "noise", "--out", "q",
                                          "--layer-wbits", "depthwise=8,first=8"])
    assert cli.config_from_args(args, QuantConfig).layer_wbits == "depthwise=8,first=8"
    out = str(tmp_path / "q.safetensors")
    assert cli.main(["quantize", "--model", "fashion-mnist-resnet20", "--real", "noise", "--out", out,
                     "--layer-wbits", "depthwise=9"]) == 2
    assert "bits must be an integer in 2..8" in capsys.readouterr().err
    assert cli.main(["quantize", "--model", "fashion-mnist-resnet20", "--real", "noise", "--out", out,
                     "--layer-wbits", "depthwise=8"]) == 2  # ResNet-20 has no depthwise layer
    assert "depthwise=8 matches no quantized layer" in capsys.readouterr().err


def test_quantize_bit_budget_errors_before_work_and_a_written_allocation(tmp_path, capsys, monkeypatch):
    from dsg_ext.quantization import read_quantized

    out = str(tmp_path / "q.safetensors")
    base = ["quantize", "--model", "fashion-mnist-resnet20", "--real", "noise", "--out", out]
    with monkeypatch.context() as m:
        m.setattr("dsg_ext.models.load_model", lambda *a, **k: pytest.fail("model loaded before the refusal"))
        assert cli.main(base + ["--wbits-budget", "1.5"]) == 2
        assert "budget 1.5 is below the smallest bit choice (2)" in capsys.readouterr().err
        assert cli.main(base + ["--sensitivity-images", "8"]) == 2
        assert "need --wbits-budget" in capsys.readouterr().err
        for bad, message in ((["--bit-choices", "3,9"], "each must be an integer in 2..8"),
                             (["--wbits-budget", "nan"], "positive number of average weight bits")):
            with pytest.raises(SystemExit) as exit_info:  # argparse's own error: usage, message, exit 2
                cli.main(base + ["--wbits-budget", "4"] + bad)
            assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert cli.main(base + ["--wbits-budget", "3.5", "--layer-wbits", "*=8"]) == 2
    assert "cannot be met" in capsys.readouterr().err
    assert cli.main(base + ["--num-samples", "16", "--wbits-budget", "3.5", "--bit-choices", "2,3,4,8",
                            "--sensitivity-images", "8"]) == 0
    printed = capsys.readouterr().out
    meta = read_quantized(out)[1]
    assert "bit allocation:" in printed and "uniform 3 bits" in printed and "uniform 4 bits" in printed
    assert meta["bit_allocation"]["budget"] == 3.5 and set(meta["weight_bits"].values()) <= {2, 3, 4, 8}
    assert meta["bit_allocation"]["average_bits"] <= 3.5


def test_library_errors_name_the_parameter_and_dsg_shows_the_option(tmp_path):
    """An API user reads the parameter they passed (force=True, device=..., opset, num_samples); `dsg`
    prints the same error with the option they typed (DsgError.for_command_line)."""
    from dsg_ext import SynthesisConfig, generate
    from dsg_ext._utils.io import check_output_file
    from dsg_ext.errors import ConfigError, ExportError, OutputError
    from dsg_ext.export.qdq import check_opset
    from dsg_ext.models.spec import check_device

    existing = tmp_path / "kept"
    existing.write_text("keep")
    with pytest.raises(OutputError) as e:
        check_output_file(str(existing), "output file", force=False)
    assert "force=True" in str(e.value) and "--force" not in str(e.value)
    assert "use --force to replace it" in e.value.for_command_line()
    with pytest.raises(ConfigError) as e:
        check_device("no-such-device")
    assert str(e.value).startswith("device=")
    assert e.value.for_command_line().startswith("--device 'no-such-device' is not a device")
    with pytest.raises(ExportError) as e:
        check_opset(3)
    assert str(e.value).startswith("opset must lie") and e.value.for_command_line().startswith("--opset must lie")
    with pytest.raises(ConfigError) as e:
        generate("fashion-mnist-resnet20", str(tmp_path / "data"), SynthesisConfig(iterations=1), 0)
    assert str(e.value).startswith("num_samples must") and e.value.for_command_line().startswith("--num-samples must")
