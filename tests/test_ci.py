"""CI runs the README's test command, and a green run still names what it skipped.

Run: python -m pytest tests/test_ci.py -q
"""
import subprocess
import sys
from pathlib import Path

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
