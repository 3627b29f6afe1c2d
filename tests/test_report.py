"""launch/report.py: the table a user reads after a run (headline metrics, before/after, chance, baseline)."""
from __future__ import annotations

import json
import sys

from conftest import _run

METRICS = {
    "step": 120,
    "headline": {"time": ["hour_top1"], "meme": ["fused_R@1"]},
    "before": {"time/hour_top1": 0.05, "meme/fused_R@1": 0.1},
    "after": {
        "time/hour_top1": 0.5, "time/hour_top1_chance": 1 / 24, "time/hour_top1_baseline": 0.07,
        "time/hour_top1_baseline_rule": "majority", "time/month_top1": 0.3, "time/num_samples": 500,
        "meme/fused_R@1": 0.25, "meme/R@1_chance": 0.02, "meme/R@1_baseline": 0.04, "meme/QI_R@1": 0.2,
    },
    "skipped_samples": {"count": 3, "by_reason": {"bad_image": 3}},
}


def _report(tmp_path, *extra):
    return _run([sys.executable, "launch/report.py", str(tmp_path), *extra])


def _row(out: str, key: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(key + " "))
    return line.split()


def test_report_prints_headline_rows_with_chance_and_the_named_baseline(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    proc = _report(tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "step 120" in out and "time:" in out and "meme:" in out
    assert _row(out, "time/hour_top1") == ["time/hour_top1", "0.050", "0.500", "0.042", "0.070", "(majority)"]
    # a branch metric shares the task's chance and baseline (meme/fused_R@1 -> meme/R@1_*)
    assert _row(out, "meme/fused_R@1") == ["meme/fused_R@1", "0.100", "0.250", "0.020", "0.040"]
    assert "time/month_top1" not in out and "meme/QI_R@1" not in out  # headline only
    assert "skipped samples: 3 {'bad_image': 3}" in out
    everything = _report(tmp_path, "--all").stdout
    assert "time/month_top1" in everything and "meme/QI_R@1" in everything
    assert "num_samples" not in everything and "_baseline_rule" not in everything  # counts and rule names are no rows


def test_report_names_a_missing_or_torn_metrics_file(tmp_path):
    proc = _report(tmp_path)
    assert proc.returncode == 2 and "metrics.json not found" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "metrics.json").write_text('{"step": 1, "af')
    proc = _report(tmp_path)
    assert proc.returncode == 2 and "metrics.json" in proc.stderr and "not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
