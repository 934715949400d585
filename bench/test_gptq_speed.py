"""Smoke test of bench/gptq_speed.py (CI runs bench/ once, untimed): both ways round every weight alike."""

import json

import gptq_speed


def test_both_ways_round_alike(tmp_path, capsys):
    out = tmp_path / "gptq.json"
    assert gptq_speed.main(["--model", "mobilenet_v2", "--size", "32", "--images", "8", "--batch", "4",
                            "--ways", "replay,blocks", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["same"] == 1.0
    replay, blocks = result["rows"]
    assert blocks["model_forwards"] < replay["model_forwards"] / 3 and blocks["layers"] == replay["layers"] == 53
    assert "| blocks |" in capsys.readouterr().out
