"""The command line, run as a user runs it: bad input fails cleanly before any work, and a tiny
end-to-end run writes every artefact, reuses its cached base model and repeats itself exactly.

Run: python -m pytest tests/test_train.py -q   (about half a minute: each case starts a Python)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import eval as ev

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


# ----------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("args,fragments", [
    (["--strategy", "foo"], ["unknown strategy 'foo'", "naive", "replay"]),
    (["--tasks", "classify,nope"], ["unknown task 'nope'", "classify"]),
    (["--steps", "0"], ["--steps"]),
    (["--steps", "-1"], ["--steps"]),
    (["--strategy", "replay", "--buffer-size", "0"], ["--buffer-size"]),
    (["--lr", "0"], ["--lr"]),
    (["--strategy", "naive", "--buffer-size", "5"], ["--buffer-size", "naive"]),
    (["--bogus-flag"], ["--bogus-flag"]),
    (["--device", "tpu"], ["device 'tpu'", "auto, cpu"]),
], ids=["strategy", "task", "steps0", "steps-1", "buffer0", "lr0", "foreign-option", "unknown-flag", "device"])
def test_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, args, fragments):
    proc = run("train.py", *SMALL, "--run-dir", tmp_path / "run", "--cache-dir", tmp_path / "cache", *args)
    assert_one_line_error(proc, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_run_folder_fails_in_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run("train.py", *SMALL, "--run-dir", blocker / "run", "--cache-dir", tmp_path / "cache")
    assert_one_line_error(proc, "cannot write run folder")
    assert list(tmp_path.iterdir()) == [blocker] and blocker.read_text() == "not a folder"


# ----------------------------------------------------------------------------------------------
# a tiny run, twice

TASKS = ["classify", "attribute"]
# 20 steps per task, not fewer: some test answers come out right, so comparing scores means something
ARGS = ["--strategy", "replay", "--tasks", ",".join(TASKS), "--steps", "40", "--base-steps", "5", "--n-train", "40",
        "--n-test", "8", "--n-base", "40", "--buffer-size", "10", "--device", "cpu"]  # cpu: bitwise repeatable
FILES = ["config.json", "tokenizer.json", "base.pt", "task1-classify.pt", "task2-attribute.pt", "results.json", "accuracy.png"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two identical runs sharing one cache: the second must reuse the first's base model."""
    tmp = tmp_path_factory.mktemp("e2e")
    procs = [run("train.py", *ARGS, "--run-dir", tmp / name, "--cache-dir", tmp / "cache") for name in ("run1", "run2")]
    return tmp, procs


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_tiny_run_writes_every_artefact(runs):
    tmp, (first, _) = runs
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = tmp / "run1"
    for name in FILES:
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("*.tmp")) and not (run_dir / ".write-test").exists()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["strategy"] == "replay" and config["train"]["steps"] == 40
    assert config["model"]["vocab_size"] == len(json.loads((run_dir / "tokenizer.json").read_text())["model"]["vocab"])
    results = json.loads((run_dir / "results.json").read_text())
    assert results["tasks"] == TASKS and len(results["base_row"]) == 2
    assert len(results["matrix"]) == 2 and all(len(row) == 2 for row in results["matrix"])
    assert all(0 <= a <= 100 for row in results["matrix"] for a in row)
    assert results["metrics"] == pytest.approx(ev.all_metrics(results["matrix"], results["base_row"], results["random_row"]))
    assert results["extra_bytes"] > 0  # the replay buffer
    with Image.open(run_dir / "accuracy.png") as img:
        assert img.format == "PNG" and img.size[0] > 100


def test_checkpoints_load_with_weights_only(runs):
    tmp, _ = runs
    run_dir = tmp / "run1"
    base = load(run_dir / "base.pt")
    first, second = load(run_dir / "task1-classify.pt"), load(run_dir / "task2-attribute.pt")
    assert first["task"] == 0 and second["task"] == 1
    assert len(first["matrix"]) == 1 and second["matrix"] == json.loads((run_dir / "results.json").read_text())["matrix"]
    buffer = second["strategy"]["buffer"]
    assert buffer["seen"] == 80 and buffer["capacity"] == 10 and len(buffer["rows"]["answers"]) == 10
    assert base["model"].keys() == second["model"].keys()
    # task training changed the decoder but, with --freeze-vision (the default), not the vision encoder
    assert not torch.equal(base["model"]["tok_emb.weight"], second["model"]["tok_emb.weight"])
    vision = [k for k in base["model"] if k.startswith("vision.")]
    assert vision and all(torch.equal(base["model"][k], second["model"][k]) for k in vision)


def test_second_run_reuses_the_base_and_repeats_exactly(runs):
    tmp, (first, second) = runs
    assert second.returncode == 0, second.stderr[-2000:]
    assert "base model: pretrained stage" in first.stdout and "reused" not in first.stdout
    assert "base model: reused" in second.stdout
    r1, r2 = (json.loads((tmp / n / "results.json").read_text()) for n in ("run1", "run2"))
    assert r1["matrix"] == r2["matrix"] and r1["base_row"] == r2["base_row"]
    for name in ("base.pt", "task1-classify.pt", "task2-attribute.pt"):  # bit-identical weights, not only scores
        a, b = load(tmp / "run1" / name)["model"], load(tmp / "run2" / name)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    b1, b2 = (load(tmp / n / "task2-attribute.pt")["strategy"]["buffer"] for n in ("run1", "run2"))
    assert torch.equal(b1["rows"]["tokens"], b2["rows"]["tokens"]) and torch.equal(b1["gen"], b2["gen"])


def test_a_cold_cache_trains_the_same_base_again(runs, tmp_path, capsys):
    """The base stage trained twice from nothing (two empty caches) gives the same bits, so the same run."""
    import train
    tmp, (first, _) = runs
    assert first.returncode == 0, first.stderr[-2000:]
    cold = [*ARGS, "--run-dir", str(tmp_path / "run3"), "--cache-dir", str(tmp_path / "cold")]
    assert train.main(cold) == 0
    assert "base model: pretrained stage" in capsys.readouterr().out  # trained, not reused
    for name in ("base.pt", "task2-attribute.pt"):
        a, b = load(tmp / "run1" / name)["model"], load(tmp_path / "run3" / name)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    r1, r3 = (json.loads((d / "results.json").read_text()) for d in (tmp / "run1", tmp_path / "run3"))
    assert all(r1[k] == r3[k] for k in ("matrix", "base_row", "final_loss"))


def test_threads_default_to_torchs_count_up_to_two_and_key_the_base(runs, tmp_path, capsys):
    """--threads 0 (the default) takes torch's thread count (OMP_NUM_THREADS, else the cores), at most two,
    and config.json records the number taken; a base trained with one thread is not reused with two (their
    sums run in another order, so the bits differ): it is trained again."""
    import runner
    import train
    tmp, (first, _) = runs
    assert first.returncode == 0, first.stderr[-2000:]
    before = torch.get_num_threads()
    try:
        for torch_threads, taken in ((1, 1), (2, 2), (4, 2)):
            torch.set_num_threads(torch_threads)
            assert runner.parse(SMALL)[0].threads == taken
        assert runner.parse([*SMALL, "--threads", "3"])[0].threads == 3  # given: as given
        two = [*ARGS, "--threads", "2", "--run-dir", str(tmp_path / "two"), "--cache-dir", str(tmp / "cache")]
        assert train.main(two) == 0
    finally:
        torch.set_num_threads(before)
    assert "base model: pretrained stage" in capsys.readouterr().out  # run1's one-thread base: not reused
    assert json.loads((tmp_path / "two" / "config.json").read_text())["train"]["threads"] == 2
    assert json.loads((tmp / "run1" / "config.json").read_text())["train"]["threads"] == 1  # OMP_NUM_THREADS=1


# a fresh Python that notes OpenMP's wait policy when anything first imports torch, then imports train
WAIT_POLICY_AT_TORCH_IMPORT = """import os, sys
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("policy at torch import:", os.environ.get("OMP_WAIT_POLICY"))
            sys.meta_path.remove(self)
sys.meta_path.insert(0, Watch())
sys.path.insert(0, sys.argv[1])
import train"""


@pytest.mark.parametrize("given,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_idle_threads_sleep_unless_told_otherwise(given, expected):
    """OpenMP reads OMP_WAIT_POLICY once, as torch loads it: train.py must set it before any import of torch.
    Passive: two threads beside a busy process do not spin for their turn (tests/bench_train.py)."""
    env = {k: v for k, v in ENV.items() if k != "OMP_WAIT_POLICY"}
    env |= {"OMP_WAIT_POLICY": given} if given else {}
    proc = subprocess.run([sys.executable, "-c", WAIT_POLICY_AT_TORCH_IMPORT, str(ROOT)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"policy at torch import: {expected}" in proc.stdout


def test_eval_reprints_the_report(runs):
    tmp, (first, _) = runs
    proc = run("eval.py", tmp / "run1")
    assert proc.returncode == 0, proc.stderr
    report = proc.stdout.strip()
    assert report.startswith("strategy replay") and report in first.stdout
    assert_one_line_error(run("eval.py", tmp / "missing"), "no results.json")


def test_reevaluating_the_last_checkpoint_gives_the_last_row(runs):
    import train
    tmp, _ = runs
    results = json.loads((tmp / "run1" / "results.json").read_text())
    assert any(a > 0 for row in results["matrix"] for a in row), "all scores 0: train longer so this can fail"
    assert train.reevaluate(tmp / "run1" / "task1-classify.pt") == results["matrix"][0]
    assert train.reevaluate(tmp / "run1" / "task2-attribute.pt") == results["matrix"][1]


def test_evaluate_flag_reprints_a_checkpoints_row_and_refuses_a_foreign_one(runs, tmp_path):
    tmp, _ = runs
    results = json.loads((tmp / "run1" / "results.json").read_text())
    proc = run("train.py", "--evaluate", tmp / "run1" / "task1-classify.pt")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].split()[1:3] == [f"{a:.1f}" for a in results["matrix"][0]]
    torch.save({"model": {"nothing": torch.zeros(1)}}, tmp_path / "foreign.pt")
    (tmp_path / "config.json").write_text((tmp / "run1" / "config.json").read_text())
    assert_one_line_error(run("train.py", "--evaluate", tmp_path / "foreign.pt"), "foreign.pt", "does not fit")
    assert_one_line_error(run("train.py", "--evaluate", tmp / "missing" / "x.pt"), "config.json")


def test_the_base_key_covers_the_base_stage_and_not_the_task_loop(tmp_path):
    """An edit of the task loop (an exercise's new hook) keeps every cached base; an edit of base_model, or of
    model.py, retrains it. Each edit is made in a copy of the files, loaded as a module of its own."""
    import importlib.util
    for name in ("data.py", "attention.py", "model.py", "train.py"):
        (tmp_path / name).write_text((ROOT / name).read_text())

    def digest(edit=None, old=None, new=None):
        if edit:
            text = (tmp_path / edit).read_text()
            assert text.count(old) == 1
            (tmp_path / edit).write_text(text.replace(old, new))
        spec = importlib.util.spec_from_file_location(f"train_copy_{len(seen)}", tmp_path / "train.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        seen.append(module.base_code())
        return seen[-1]
    seen = []
    before = digest()
    assert digest("train.py", "    strategy.after_task(model, t, rows)\n",
                  "    strategy.after_task(model, t, rows)  # an exercise's edit\n") == before
    assert digest("train.py", "    return model, paths[-1]\n", "    return model, paths[-1]  # edited\n") != before
    assert digest("model.py", "class VLM(nn.Module):", "class VLM(nn.Module):  # edited") not in seen[:-1]
