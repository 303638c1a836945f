"""CI runs the README's test command, a green run still names what it skipped, and the GPU check fails fast
where there is no GPU.

Run: python -m pytest tests/test_ci.py -q
"""
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text().splitlines()
    assert "&& python -m pytest " in readme  # the README's test command ...
    assert "python -m pytest" in ci  # ... is the line CI runs, with no flags of its own


def test_a_green_run_lists_its_skips_and_why(tmp_path):
    """pytest exits 0 when tests skip; with the project's pytest.ini it at least says which, and why."""
    (tmp_path / "test_gpu.py").write_text("import pytest\n\n\n@pytest.mark.skip(reason='needs CUDA')\n"
                                         "def test_kernel():\n    pass\n\n\ndef test_cpu():\n    pass\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pytest.ini"),
           "--rootdir", str(tmp_path), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout
    assert "SKIPPED [1] " in done.stdout and "needs CUDA" in done.stdout, done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the check's steps would really run")
@pytest.mark.parametrize("call,steps", [("1", ["env", "build", "tests", "bench"]), ("2", ["env", "paths", "study"])])
def test_the_gpu_check_without_a_gpu_fails_each_step_fast_in_one_line(call, steps, tmp_path):
    """DRY_RUN=1 runs every step although the env step failed: each must fail at once, not wait on a lock or
    a timeout, and the call must still leave its archive with the summary."""
    env = {**os.environ, "DRY_RUN": "1", "GPU_CHECK_WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "tests" / "gpu_check.sh"), call, str(tmp_path / "dest")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    outcomes = re.findall(r"^\d\d:\d\d:\d\d (\w+): (exit 1 after|skipped)", done.stdout, re.MULTILINE)
    assert [name for name, _ in outcomes] == steps, done.stdout
    with tarfile.open(tmp_path / "dest" / f"gpu-check-{call}.tar.gz") as archive:
        assert f"call{call}/summary.txt" in archive.getnames()
