"""Runs that survive: a killed run resumes to the same bits (replay+expansion by SIGKILL at a random moment;
EWC, TIR, LwF and expansion stopped at a set step, TIR inside after_task), a half-written file is never
seen, damaged or foreign checkpoints are refused in one line, a changed command is refused with the fields
that differ, a NaN stops the run and keeps the last checkpoint, and the same seed gives the same results.json.

Run: python -m pytest tests/test_resume.py -q   (about a minute)
"""
import argparse
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import runner
import strategies
import train
from background import background
from background import run as run_in_background
from data import atomic_write
from test_runner import ENV, ROOT, assert_one_line_error, load, main_here

# 60 steps per task: a kill seen at step 10 of the second task lands with 50 steps to go. Expansion exercises
# the most state on resume: LoRA adapters to re-add before loading, experts, keys, and the replay buffer with
# its own generator
ARGS = ["--strategy", "replay+expansion", "--tasks", "classify,attribute", "--steps", "60",
        "--base-steps", "5", "--n-train", "40", "--n-test", "8", "--n-base", "40", "--buffer-size", "10",
        "--device", "cpu",
        "--checkpoint-every", "10"]


def results_without_timings(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("timings", "wall_seconds", "breakdown"):
        results.pop(key)
    for key in ("run_dir", "resume"):  # how this command was invoked, not what the run is
        results["config"]["train"].pop(key)
    return results


@background
def uninterrupted(folder):
    """The run of ARGS, whole: folder/whole, its base in folder/cache."""
    proc = run_in_background([sys.executable, ROOT / "train.py", *ARGS, "--run-dir", folder / "whole",
                              "--cache-dir", folder / "cache"], timeout=240, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return folder


def test_a_run_killed_mid_task_resumes_to_the_same_bits(uninterrupted):
    tmp = uninterrupted
    cmd = [sys.executable, str(ROOT / "train.py"), *ARGS, "--run-dir", str(tmp / "killed"),
           "--cache-dir", str(tmp / "cache")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, deadline = tmp / "killed" / "checkpoint.pt", time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:  # wait for a checkpoint inside the second task, then kill without warning
            if (state := load(ckpt))["task"] == 1 and state["step"] > 0:
                break
        except FileNotFoundError:
            pass  # not written yet; any other error is a reader seeing half a checkpoint, and fails the test
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp / "killed" / "results.json").exists(), "the run finished before the kill: make it longer"
    first_task = (tmp / "killed" / "task1-classify.pt").stat().st_mtime_ns
    resumed = main_here(cmd[2:])  # the same command again, in this process
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "task 2, step " in resumed.stdout
    assert (tmp / "killed" / "task1-classify.pt").stat().st_mtime_ns == first_task  # not redone
    leftover = [p.name for p in (tmp / "killed").glob("*.tmp") if f".{proc.pid}.tmp" not in p.name]
    assert leftover == []  # the killed writer may leave its own .tmp (a kill inside a write), the resume none
    assert results_without_timings(tmp / "killed") == results_without_timings(tmp / "whole")
    a, b = (load(tmp / d / "task2-attribute.pt") for d in ("whole", "killed"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    same_nest(a["strategy"], b["strategy"])  # replay buffer and its generator, experts, keys, common start


def test_atomic_write_never_shows_half_a_file(tmp_path):
    """A writer killed half way leaves the old file whole, and a reader during the write sees the old file."""
    path = tmp_path / "checkpoint.pt"
    torch.save({"step": 10}, path)
    seen = []

    def killed_half_way(tmp):
        tmp.write_bytes(path.read_bytes()[:20])  # the first bytes of a new checkpoint
        seen.append(load(path))  # a reader meanwhile (torch.load raises on half a file)
        raise KeyboardInterrupt  # the writer dies here
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, killed_half_way)
    assert seen == [{"step": 10}] and load(path) == {"step": 10}
    atomic_write(path, lambda tmp: torch.save({"step": 20}, tmp))
    assert load(path) == {"step": 20}
    assert all(p == path or p.suffix == ".tmp" for p in tmp_path.iterdir())  # and the dead writer's .tmp


def same_nest(a, b):
    """Two nests of dicts, lists, tensors and plain values are equal, tensors bit for bit."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            same_nest(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same_nest(x, y)
    else:
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b


def test_rerunning_a_finished_run_trains_nothing_and_repeats_its_results(uninterrupted):
    tmp = uninterrupted
    before = results_without_timings(tmp / "whole")
    # the settings come from the folder
    proc = main_here(["--resume", "--run-dir", tmp / "whole", "--cache-dir", tmp / "cache"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming from" in proc.stdout and "finished, nothing left to train" in proc.stdout
    assert results_without_timings(tmp / "whole") == before


def test_a_changed_command_is_refused_with_the_fields_that_differ(uninterrupted):
    tmp = uninterrupted
    before = (tmp / "whole" / "checkpoint.pt").read_bytes()
    changed = [a if a != "60" else "61" for a in ARGS] + ["--lr", "1e-3"]
    proc = main_here([*changed, "--run-dir", tmp / "whole", "--cache-dir", tmp / "cache"])
    assert_one_line_error(proc, "other settings", "steps 60 -> 61", "lr 0.0005 -> 0.001", "--force-new")
    assert (tmp / "whole" / "checkpoint.pt").read_bytes() == before


def test_force_new_starts_a_fresh_folder_and_leaves_the_old_one(uninterrupted, tmp_path, capsys):
    tmp = uninterrupted
    args = ["--tasks", "classify", "--steps", "2", "--base-steps", "5", "--n-train", "4", "--n-test", "2",
            "--n-base", "40", "--device", "cpu", "--cache-dir", str(tmp / "cache")]
    assert train.main([*args, "--run-dir", str(tmp_path / "r")]) == 0  # in this process: no start-up
    first = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    assert train.main([*args, "--lr", "1e-3", "--force-new", "--run-dir", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r-2" / "results.json").is_file()
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == first
    assert json.loads((tmp_path / "r-2" / "config.json").read_text())["train"]["lr"] == 1e-3
    capsys.readouterr()
    again = ["--resume", "--run-dir", str(tmp_path / "r-2"), "--cache-dir", str(tmp / "cache")]
    assert train.main(again) == 0
    assert "finished, nothing left to train" in capsys.readouterr().out
    assert not (tmp_path / "r-2-2").exists() and not (tmp_path / "r-3").exists()  # resumed, not afresh


def test_an_unwritable_cache_folder_fails_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    proc = main_here([*ARGS, "--run-dir", tmp_path / "r", "--cache-dir", tmp_path / "a-file" / "cache"])
    assert_one_line_error(proc, "cannot write --cache-dir")


def test_resume_with_nothing_to_resume_fails_in_one_line(tmp_path):
    tmp_path.joinpath("empty").mkdir()
    assert_one_line_error(main_here(["--resume", "--run-dir", tmp_path / "empty"]), "--resume", "no run")


def test_a_truncated_checkpoint_is_refused(uninterrupted, tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    data = (uninterrupted / "whole" / "checkpoint.pt").read_bytes()
    (run_dir / "checkpoint.pt").write_bytes(data[:len(data) // 2])
    proc = main_here([*ARGS, "--run-dir", run_dir, "--cache-dir", uninterrupted / "cache"])
    assert_one_line_error(proc, "checkpoint.pt", "damaged or truncated", "--force-new")
    assert (run_dir / "checkpoint.pt").read_bytes() == data[:len(data) // 2]  # left for the user to inspect


def test_a_checkpoint_carrying_a_pickled_object_is_refused(uninterrupted, tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    state = load(uninterrupted / "whole" / "checkpoint.pt")
    torch.save({**state, "config": argparse.Namespace(**state["config"])}, run_dir / "checkpoint.pt")
    proc = main_here([*ARGS, "--run-dir", run_dir, "--cache-dir", uninterrupted / "cache"])
    assert_one_line_error(proc, "checkpoint.pt", "pickled Python objects")


def test_a_nan_loss_stops_the_run_naming_task_and_step_and_keeps_the_last_checkpoint(uninterrupted, tmp_path):
    args = ARGS[:-1] + ["1"]  # --checkpoint-every 1: a checkpoint after every step
    proc = main_here([*args, "--lr", "1e30", "--run-dir", tmp_path / "r",
                      "--cache-dir", uninterrupted / "cache"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the loss (") and "inf or nan in task 1/2: classify, step " in line
    assert "Traceback" not in proc.stderr
    step = int(line.split("step ")[1].split(";")[0])
    state = load(tmp_path / "r" / "checkpoint.pt")  # the last good one: written before the step that failed
    assert state["task"] == 0 and state["step"] == step - 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "r" / "results.json").exists()


def test_same_seed_same_results_and_another_seed_differs(uninterrupted, tmp_path, capsys):
    args = [a if a != "60" else "10" for a in ARGS] + ["--cache-dir", str(uninterrupted / "cache")]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):  # train.main in this process: no start-up
        code = train.main([*args, "--seed", str(seed), "--run-dir", str(tmp_path / name)])
        assert code == 0, capsys.readouterr().err
    a, b, c = (results_without_timings(tmp_path / n) for n in "abc")
    assert a == b
    assert a["final_loss"] != c["final_loss"]


# ----------------------------------------------------------------------------------------------
# every stateful strategy survives a kill: mid-task (EWC, TIR, LwF, expansion) and inside after_task

TINY = ["--tasks", "classify,read", "--steps", "40", "--checkpoint-every", "10", "--base-steps", "5",
        "--n-train", "32", "--n-test", "8", "--n-base", "32", "--batch-size", "8", "--device", "cpu",
        "--vit-dim", "32", "--d-model", "32", "--n-head", "2", "--n-layer", "1", "--vit-layers", "1"]
OPTIONS = {"ewc": ["--importance-samples", "8"], "tir": ["--importance-samples", "8"], "lwf": [],
           "expansion": ["--lora-rank", "2"]}
class Killed(BaseException):
    """What the trap raises where a SIGKILL would land. train.main catches no BaseException of its kind and
    writes nothing on the way out (its one `finally` leaves a process group), so the run folder is left as a
    killed process leaves it; test_a_run_killed_mid_task_resumes_to_the_same_bits sends a real SIGKILL."""


def trap(monkeypatch, where, at):
    """Kill train.main right after the checkpoint at step `at` of the second task (where='step'), or right
    after strategy.after_task of task `at`, before anything of it is saved: always there, unlike a timed
    kill."""
    if where == "step":
        write = runner.checkpoint

        def checkpoint(path, progress, *args, **kw):
            state = write(path, progress, *args, **kw)
            if progress["task"] == 1 and progress["step"] == at:
                raise Killed
            return state
        monkeypatch.setattr(runner, "checkpoint", checkpoint)
        return
    build = strategies.build

    def build_with_trap(*args, **kw):
        strategy = build(*args, **kw)
        after = strategy.after_task

        def after_task(model, task_id, rows):
            after(model, task_id, rows)
            if task_id == at:
                raise Killed
        strategy.after_task = after_task
        return strategy
    monkeypatch.setattr(strategies, "build", build_with_trap)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """spec -> the folder of its uninterrupted run (made in this process on first use; one cached base)."""
    tmp, made = tmp_path_factory.mktemp("strategies"), {}

    def reference(spec):
        if spec not in made:
            argv = [*TINY, *OPTIONS[spec], "--strategy", spec, "--cache-dir", str(tmp / "cache")]
            assert train.main([*argv, "--run-dir", str(tmp / spec)]) == 0
            made[spec] = (tmp / spec, argv)
        return made[spec]
    return reference


def killed_and_resumed(argv, run_dir, where, at, capsys):
    """train.main killed by its trap, then the same command again -> what the resume says."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        trap(monkeypatch, where, at)
        with pytest.raises(Killed):
            train.main([*argv, "--run-dir", str(run_dir)])
    assert not (run_dir / "results.json").exists()
    capsys.readouterr()
    assert train.main([*argv, "--run-dir", str(run_dir)]) == 0
    return capsys.readouterr().out


def assert_same_run(a, b):
    assert results_without_timings(a) == results_without_timings(b)
    x, y = (load(d / "task2-read.pt") for d in (a, b))
    assert x["model"].keys() == y["model"].keys()
    assert all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])
    same_nest(x["strategy"], y["strategy"])


@pytest.mark.parametrize("spec", ["ewc", "tir", "lwf", "expansion"])
def test_a_killed_run_of_each_stateful_strategy_resumes_to_the_same_bits(references, spec, tmp_path, capsys):
    whole, argv = references(spec)
    printed = killed_and_resumed(argv, tmp_path / "killed", "step", 20, capsys)
    assert "resuming from" in printed and "task 2, step 20" in printed
    assert_same_run(tmp_path / "killed", whole)


def test_a_run_killed_in_after_task_resumes_to_the_same_bits(references, tmp_path, capsys):
    """Killed at the end of task 1, inside after_task (TIR's importances made, nothing saved): the resume
    redoes the task's last steps from the last checkpoint, then after_task, once."""
    whole, argv = references("tir")
    printed = killed_and_resumed(argv, tmp_path / "killed", "after_task", 0, capsys)
    assert "resuming from" in printed and "task 1, step 30" in printed
    assert_same_run(tmp_path / "killed", whole)


def test_a_replay_run_on_two_threads_killed_mid_task_resumes_to_the_same_bits(tmp_path, capsys):
    """With two threads a row's floats can depend on the rows the frozen vision tower encodes beside it: a
    resumed task must encode its images (its own and the replayed ones) in the groups the whole run did."""
    argv = [*TINY, "--strategy", "replay", "--buffer-size", "8", "--threads", "2",
            "--cache-dir", str(tmp_path / "cache")]
    try:
        assert train.main([*argv, "--run-dir", str(tmp_path / "whole")]) == 0
        printed = killed_and_resumed(argv, tmp_path / "killed", "step", 20, capsys)
    finally:
        torch.set_num_threads(1)  # conftest's one thread, for the tests after this one
    assert "resuming from" in printed and "task 2, step 20" in printed
    assert_same_run(tmp_path / "killed", tmp_path / "whole")
