"""Smoke test of bench/reconstruction_speed.py (CI runs bench/ once, untimed): the engines run the same
schedule on the same batches, so on the CPU they must round every weight as the plain loop does."""

import json

import reconstruction_speed


def test_engines_agree_with_the_plain_loop(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert reconstruction_speed.main(["--iterations", "4", "--images", "16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["engine"] for r in result["rows"]] == ["loop", "device"]
    assert result["agreement_with_loop"] == {"device": 1.0}
    assert all(r["ms_per_iteration"] > 0 and r["units"] > 1 for r in result["rows"])
    assert "| device |" in capsys.readouterr().out
