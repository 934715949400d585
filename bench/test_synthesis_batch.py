"""Smoke test of bench/synthesis_batch.py (CI runs bench/ once, untimed)."""

import json

import synthesis_batch


def test_every_batch_size_gets_a_time(tmp_path, capsys):
    out = tmp_path / "batch.json"
    assert synthesis_batch.main(["--batches", "4,8", "--iterations", "1", "--warmup", "1", "--repeats", "1",
                                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["ms_per_image_iteration"]) == {"4", "8"} and all(
        v > 0 for v in result["ms_per_image_iteration"].values())
    assert "| 8 |" in capsys.readouterr().out
