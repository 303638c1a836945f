"""The command line (runner.py), run as a user runs it: every bad input is refused in one line on stderr with
exit code 2, before any work, and writes nothing; --bf16 and --compile are refused where they cannot work.
The helpers that run a script and check a one-line refusal live here, for the other test files too.

Refusals that stop before any training go through train.main in this process (main_here, used by the other
test files too): a Python started per case costs seconds for torch's import alone. The tests below that
start train.py as a user does keep a real process's exit code covered.

Run: python -m pytest tests/test_runner.py -q
"""
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from background import background
from background import run as run_in_background

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest
# if a bad flag were accepted by mistake, these keep the run that follows short
SMALL = ["--tasks", "classify", "--steps", "1", "--base-steps", "1", "--n-train", "4", "--n-test", "2",
         "--n-base", "4", "--device", "cpu"]


def run(script, *args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


BAD_INPUT = {  # id: (the bad flags, what the one line must say)
    "strategy": (["--strategy", "foo"], ["unknown strategy 'foo'", "naive", "replay"]),
    "task": (["--tasks", "classify,nope"], ["unknown task 'nope'", "classify"]),
    "benchmark": (["--benchmark", "both"], ["unknown benchmark 'both'", "single, mixed"]),
    "steps0": (["--steps", "0"], ["--steps"]),
    "steps-1": (["--steps", "-1"], ["--steps"]),
    "buffer0": (["--strategy", "replay", "--buffer-size", "0"], ["--buffer-size"]),
    "lr0": (["--lr", "0"], ["--lr"]),
    "foreign-option": (["--strategy", "naive", "--buffer-size", "5"], ["--buffer-size", "naive"]),
    "unknown-flag": (["--bogus-flag"], ["--bogus-flag"]),
    "device": (["--device", "tpu"], ["device 'tpu'", "auto, cpu"]),
    "pair-first": (["--tasks", "classify,count", "--pair-first", "read"], ["'read'", "classify, count"]),
    "pair-strategy": (["--strategy", "ewc", "--pair-first", "classify"], ["--pair-first", "naive"]),
}


def main_here(argv):
    """train.main(argv) in this process -> what a finished `python train.py argv` would give: its exit code,
    stdout and stderr. Threads and environment are put back as they were."""
    out, err, environ, threads = io.StringIO(), io.StringIO(), dict(os.environ), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = train.main([str(a) for a in argv])
            except SystemExit as e:
                code = e.code
    finally:
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, name):
    args, says = BAD_INPUT[name]
    proc = main_here([*SMALL, "--run-dir", tmp_path / "run", "--cache-dir", tmp_path / "cache", *args])
    assert_one_line_error(proc, *says)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_run_folder_fails_in_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run("train.py", *SMALL, "--run-dir", blocker / "run", "--cache-dir", tmp_path / "cache")
    assert_one_line_error(proc, "cannot write run folder")
    assert list(tmp_path.iterdir()) == [blocker] and blocker.read_text() == "not a folder"


STRATEGY_SPECS = {  # id: (the flags, what the one line must say)
    "malformed": (["--strategy", "replay+"], "malformed"),
    "unknown-part": (["--strategy", "replay+ewk"], "unknown strategy 'ewk'"),
    "foreign-option": (["--strategy", "lwf", "--ewc-lambda", "5"],
                       "--ewc-lambda is not an option of strategy 'lwf'"),
    "bad-lora-target": (["--strategy", "lora", "--lora-targets", "attn.qkv,wte"], "--lora-targets"),
}


@pytest.mark.parametrize("name", list(STRATEGY_SPECS))
def test_bad_strategy_specs_exit_2_with_one_line(tmp_path, name):
    argv, says = STRATEGY_SPECS[name]
    proc = main_here([*argv, "--run-dir", tmp_path / name])
    assert_one_line_error(proc, says)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU --bf16 is accepted")
def test_a_changed_option_counts_only_for_a_strategy_that_reads_it():
    """A changed default of EWC's does not make a naive or replay run another, so its folder resumes and a
    study reuses it; for EWC itself, and for a composition holding it, it does."""
    import runner
    def config(strategy, **options):
        return {"train": {"strategy": strategy, "steps": 400},
                "strategy": {"ewc_lambda": 100.0, "buffer_size": 200, **options}}
    for strategy in ("naive", "replay"):
        assert runner.config_diff(config(strategy), config(strategy, ewc_lambda=1e5)) == []
    assert runner.config_diff(config("replay"), config("replay", buffer_size=20)) == ["buffer_size 200 -> 20"]
    for strategy in ("ewc", "replay+ewc", "tir"):
        assert runner.config_diff(config(strategy), config(strategy, ewc_lambda=1e5)) == [
            "ewc_lambda 100.0 -> 100000.0"]


def test_bf16_without_cuda_is_refused_in_one_line(tmp_path):
    proc = run("train.py", *SMALL, "--bf16", "--run-dir", tmp_path / "r", "--cache-dir", tmp_path / "cache")
    assert_one_line_error(proc, "--bf16 needs a CUDA device", "cpu")
    assert not (tmp_path / "r").exists()


@background
def compile_without_a_compiler(folder):
    """train.py --compile where inductor has no working C++ compiler -> (the process, its run folder); None on
    a GPU, where the test skips."""
    if torch.cuda.is_available():
        return None
    env = {**ENV, "CXX": "/bin/false"}  # no working C++ compiler: inductor cannot build its CPU kernels
    cmd = [sys.executable, ROOT / "train.py", *SMALL, "--compile", "--run-dir", folder / "r",
           "--cache-dir", folder / "cache"]
    return run_in_background(cmd, timeout=120, cwd=ROOT, env=env), folder / "r"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU torch.compile needs no C++ compiler of ours")
def test_compile_where_torch_compile_cannot_work_is_refused_in_one_line(compile_without_a_compiler):
    proc, run_dir = compile_without_a_compiler
    assert_one_line_error(proc, "--compile does not work here")
    assert not run_dir.exists()
