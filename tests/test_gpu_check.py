"""bench/gpu_check.py, dry-run on the CPU: the script that will first run on a GPU works end to end."""

import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path),
                             "--skip", "tests", "compile", "speedrun"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| eager") or line.startswith("| compiled")]
    # (the compiled run and the speedrun are the same commands as tests elsewhere run: skipped here for time)
    assert len(rows) == 1 and not any("failed" in row for row in rows), report
    assert "Greedy decoding against transformers' generate, eager: exit 0" in report, report
    assert "identical (1 x 8 tokens)" in report, report
