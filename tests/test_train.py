"""The protocol (train.py) end to end: a tiny run writes every artefact, reuses its cached base and repeats
itself exactly; each strategy's work shows in its checkpoints; the savings (images encoded once, a first task
shared with naive's run) change no bit; and two gloo processes train like one. Whether a base finds the
objects of the colour named is tools/check_lookup.py: it trains the default model for 2000 steps.

Run: python -m pytest tests/test_train.py -q
"""
import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

import data
import llava
import eval as ev
import runner
import strategies
import train
from background import background
from background import run as run_in_background
from model import VLM, ModelConfig
from test_runner import ENV, ROOT, SMALL, assert_one_line_error, load, main_here, run

# ----------------------------------------------------------------------------------------------
# a tiny run, twice

TASKS = ["classify", "attribute"]
# 20 steps per task, not fewer: some test answers come out right, so comparing scores means something
ARGS = ["--strategy", "replay", "--tasks", ",".join(TASKS), "--steps", "40", "--base-steps", "5",
        "--n-train", "40", "--n-test", "8", "--n-base", "40", "--buffer-size", "10",
        "--device", "cpu"]  # cpu: bitwise repeatable
FILES = ["config.json", "tokenizer.json", "base.pt", "task1-classify.pt", "task2-attribute.pt",
         "results.json", "accuracy.png"]


@background
def runs(folder):
    """Two identical runs sharing one cache, one after the other: the second must reuse the first's base."""
    procs = [run_in_background([sys.executable, ROOT / "train.py", *ARGS, "--run-dir", folder / name,
                                "--cache-dir", folder / "cache"], timeout=240, cwd=ROOT, env=ENV)
             for name in ("run1", "run2")]
    return folder, procs


def test_tiny_run_writes_every_artefact(runs):
    tmp, (first, _) = runs
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = tmp / "run1"
    for name in FILES:
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("*.tmp")) and not (run_dir / ".write-test").exists()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["strategy"] == "replay" and config["train"]["steps"] == 40
    vocab = json.loads((run_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert config["model"]["vocab_size"] == len(vocab)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["tasks"] == TASKS and len(results["base_row"]) == 2
    assert len(results["matrix"]) == 2 and all(len(row) == 2 for row in results["matrix"])
    assert all(0 <= a <= 100 for row in results["matrix"] for a in row)
    assert results["metrics"] == pytest.approx(ev.all_metrics(results["matrix"], results["base_row"],
                                                              results["random_row"]))
    assert results["extra_bytes"] > 0  # the replay buffer
    with Image.open(run_dir / "accuracy.png") as img:
        assert img.format == "PNG" and img.size[0] > 100


def test_checkpoints_load_with_weights_only(runs):
    tmp, _ = runs
    run_dir = tmp / "run1"
    base = load(run_dir / "base.pt")
    first, second = load(run_dir / "task1-classify.pt"), load(run_dir / "task2-attribute.pt")
    assert first["task"] == 0 and second["task"] == 1
    results = json.loads((run_dir / "results.json").read_text())
    assert len(first["matrix"]) == 1 and second["matrix"] == results["matrix"]
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
    for name in ("base.pt", "task1-classify.pt", "task2-attribute.pt"):  # the same weights, not only scores
        a, b = load(tmp / "run1" / name)["model"], load(tmp / "run2" / name)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    b1, b2 = (load(tmp / n / "task2-attribute.pt")["strategy"]["buffer"] for n in ("run1", "run2"))
    assert torch.equal(b1["rows"]["tokens"], b2["rows"]["tokens"]) and torch.equal(b1["gen"], b2["gen"])


def test_a_cold_cache_trains_the_same_base_again(runs, tmp_path, capsys):
    """The base stage trained twice from nothing (two empty caches) gives the same bits, so the same run."""
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
    tmp, (first, _) = runs
    assert first.returncode == 0, first.stderr[-2000:]
    before = torch.get_num_threads()
    try:
        for torch_threads, taken in ((1, 1), (2, 2), (4, 2)):
            torch.set_num_threads(torch_threads)
            assert runner.parse(SMALL)[0].threads == taken
        assert runner.parse([*SMALL, "--threads", "3"])[0].threads == 3  # given: as given
        short = [*ARGS, "--steps", "2"]  # the last --steps counts: the base is what this test is about
        two = [*short, "--threads", "2", "--run-dir", str(tmp_path / "two"),
               "--cache-dir", str(tmp / "cache")]
        assert train.main(two) == 0
    finally:
        torch.set_num_threads(before)
    assert "base model: pretrained stage" in capsys.readouterr().out  # run1's one-thread base: not reused
    assert json.loads((tmp_path / "two" / "config.json").read_text())["train"]["threads"] == 2
    run1 = json.loads((tmp / "run1" / "config.json").read_text())
    assert run1["train"]["threads"] == 1  # OMP_NUM_THREADS=1


def test_report_reprints_a_runs_report(runs):
    tmp, (first, _) = runs
    proc = run("report.py", tmp / "run1")
    assert proc.returncode == 0, proc.stderr
    report = proc.stdout.strip()
    assert report.startswith("strategy replay") and report in first.stdout
    assert_one_line_error(run("report.py", tmp / "missing"), "no results.json")


def test_reevaluating_the_last_checkpoint_gives_the_last_row(runs):
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
    foreign = main_here(["--evaluate", tmp_path / "foreign.pt"])
    assert_one_line_error(foreign, "foreign.pt", "does not fit")
    assert_one_line_error(main_here(["--evaluate", tmp / "missing" / "x.pt"]), "config.json")


# ----------------------------------------------------------------------------------------------
# where train.py stands before torch loads, and what its base key covers

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
    Passive: two threads beside a busy process do not spin for their turn (tools/bench_train.py)."""
    env = {k: v for k, v in ENV.items() if k != "OMP_WAIT_POLICY"}
    env |= {"OMP_WAIT_POLICY": given} if given else {}
    proc = subprocess.run([sys.executable, "-c", WAIT_POLICY_AT_TORCH_IMPORT, str(ROOT)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"policy at torch import: {expected}" in proc.stdout


def test_the_base_key_covers_the_base_stage_and_not_the_task_loop(tmp_path):
    """An edit of the task loop (an exercise's new hook) keeps every cached base; an edit of base_model, or of
    model.py, retrains it. Each edit is made in a copy of the files, loaded as a module of its own."""
    import importlib.util
    for name in ("data.py", "llava.py", "attention.py", "model.py", "train.py"):
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
    edited = "    return model, paths[-1]  # edited\n"
    assert digest("train.py", "    return model, paths[-1]\n", edited) != before
    assert digest("model.py", "class VLM(nn.Module):", "class VLM(nn.Module):  # edited") not in seen[:-1]


# ----------------------------------------------------------------------------------------------
# each strategy through train.py: what it did shows in the checkpoints it leaves

@pytest.mark.parametrize("spec", ["ewc", "lora", "expansion", "tir"])
def test_tiny_end_to_end_run(spec, tmp_path_factory):
    """train.py with each strategy: what the strategy did shows in the checkpoints it leaves."""
    cache, run = tmp_path_factory.getbasetemp() / "cache", tmp_path_factory.mktemp(spec.replace("+", "_"))
    argv = ["--strategy", spec, "--tasks", "classify,read", "--steps", "3", "--base-steps", "30",
            "--n-train", "32", "--n-test", "8", "--n-base", "32", "--batch-size", "8", "--run-dir", str(run),
            "--cache-dir", str(cache), "--vit-dim", "32", "--d-model", "32", "--n-head", "2",
            "--n-layer", "1", "--vit-layers", "1"]
    if spec in ("ewc", "tir"):
        argv += ["--importance-samples", "8"]
    assert train.main(argv) == 0
    results = json.loads((run / "results.json").read_text())
    assert len(results["matrix"]) == 2 and math.isfinite(results["metrics"]["AA"])
    assert all(0 <= a <= 100 for row in results["matrix"] for a in row)
    base, first, last = (torch.load(run / f, weights_only=True)
                         for f in ("base.pt", "task1-classify.pt", "task2-read.pt"))
    state = last["strategy"]
    trained = [n for n in base["model"] if not torch.equal(base["model"][n], last["model"][n])]
    adapters = [v for k, v in last["model"].items() if ".lora_" in k]
    assert results["extra_bytes"] == strategies.nbytes(adapters if spec == "lora" else state) > 0
    if spec in ("ewc", "tir"):  # importances of the trainable parameters; anchored where each task ended
        importance = set(state["importance"]) if spec == "ewc" else set().union(*state["per_task"])
        assert importance == set(last["trainable"]) == set(state["anchor"])
        for ckpt in (first, last):
            assert all(torch.equal(a, ckpt["model"][n]) for n, a in ckpt["strategy"]["anchor"].items())
        assert not any(n.startswith("vision.") for n in importance)  # --freeze-vision
    if spec == "tir":  # each task's importances kept apart
        assert len(state["prototypes"]) == len(state["per_task"]) == 2
        assert len(results["task_similarity"]) == 2
    if spec in ("lora", "expansion"):  # the base stays frozen: only adapters (and expansion's projector) move
        if spec == "lora":
            assert trained == []
        else:
            assert trained and all(n.startswith("projector.") for n in trained), trained
        assert all(".lora_" in n or n.startswith("projector.") for n in last["trainable"])
        assert any(v.abs().sum() > 0 for k, v in last["model"].items() if ".lora_B" in k)  # adapters learnt
    if spec == "expansion":
        assert results["task_id_accuracy"] == 100.0 and len(state["experts"]) == 2
        for k, ckpt in enumerate((first, last)):  # expert k is what task k's checkpoint held in place
            assert all(torch.equal(v, ckpt["model"][n]) for n, v in state["experts"][k].items())
        assert not all(torch.equal(state["experts"][0][n], v) for n, v in state["experts"][1].items())
    # train.py --evaluate: adapters and experts load back, and the last row comes out again
    assert train.reevaluate(run / "task2-read.pt") == results["matrix"][1]


# ----------------------------------------------------------------------------------------------
# savings that must change no result: each is checked against the slower way, bit for bit

def tiny_setup(seed=0):
    tok = llava.train_tokenizer(data.ALL_TASKS, 0)
    mcfg = ModelConfig(vocab_size=tok.get_vocab_size(), vit_dim=32, d_model=32, n_head=2, vit_layers=1,
                       n_layer=1)
    rows = llava.make_split(data.TASKS["attribute"], "train", 16, 0, tok, mcfg.image_size,
                           mcfg.max_text_len)[0]
    model = VLM(mcfg, seed=seed)
    model.vision.requires_grad_(False)  # as in task tuning (--freeze-vision, the default)
    return model, rows


def count_vision_rows(model):
    """Wrap model.vision so that it counts the images it encodes -> the list holding the count."""
    counted, forward = [0], model.vision.forward

    def counting(images):
        counted[0] += len(images)
        return forward(images)
    model.vision.forward = counting
    return counted


def tune(model, rows, strategy, steps=12):
    cfg = runner.TrainConfig(batch_size=8, checkpoint_every=1000)
    gen = torch.Generator().manual_seed(1)
    train.train_steps(model, rows, strategy, steps, 1e-3, cfg, gen, torch.device("cpu"), "test")
    return model.state_dict()


def test_a_frozen_vision_tower_encodes_each_image_once_and_changes_no_weight(monkeypatch):
    replay = strategies.build("replay", strategies.StrategyConfig(buffer_size=8, replay_ratio=0.5))
    model, rows = tiny_setup()
    replay.after_task(model, 0, rows.subset(range(8, 16)))  # replayed rows, mixed into every batch
    cached_model, counted = model, count_vision_rows(model)
    cached = tune(cached_model, rows, replay)
    assert counted[0] <= len(rows), "each of the 16 images is encoded once, not in every one of 12 steps"

    monkeypatch.setattr(llava, "encode_images", lambda *args: {})
    monkeypatch.setattr(llava, "vision_seen", lambda model, images, seen, device: model.vision(
        llava.pixels(images).to(device)))  # the slow way: the whole batch through the tower, every step
    model, _ = tiny_setup()
    replay = strategies.build("replay", strategies.StrategyConfig(buffer_size=8, replay_ratio=0.5))
    replay.after_task(model, 0, rows.subset(range(8, 16)))
    counted = count_vision_rows(model)
    slow = tune(model, rows, replay)
    assert counted[0] == 12 * 8
    assert cached.keys() == slow.keys()
    assert all(torch.equal(cached[k], slow[k]) for k in cached), "the cache changed the weights"


def test_a_trainable_vision_tower_is_encoded_every_step():
    model, rows = tiny_setup()
    model.vision.requires_grad_(True)  # --no-freeze-vision: the tower changes with every step
    counted = count_vision_rows(model)
    tune(model, rows, strategies.Strategy(None), steps=3)
    assert counted[0] == 3 * 8


def test_a_rows_vision_output_does_not_depend_on_the_rows_beside_it():
    """What makes the cache exact: a row encoded among any others gives the same floats. (A batch of one row
    may take other kernels: on an AVX-512 CPU its floats came out 1.5e-6 off at one thread. No path encodes a
    lone row on one side only: llava.encode_images cuts the same chunks, fresh or resumed.)"""
    model, rows = tiny_setup()
    with torch.no_grad():
        whole = model.vision(llava.pixels(rows.images))
        for i in (0, 5, 14):
            assert torch.equal(model.vision(llava.pixels(rows.images[i:i + 2])), whole[i:i + 2])
        assert torch.equal(model.vision(llava.pixels(rows.images[3:11])), whole[3:11])


# a first task shared with naive's run (train.py --first-task-from, which the study passes)
TINY = ["--tasks", "classify,count", "--steps", "6", "--base-steps", "4", "--n-train", "16", "--n-test", "6",
        "--n-base", "16", "--batch-size", "4", "--device", "cpu", "--checkpoint-every", "1000"]
SAME = ("base_row", "random_row", "matrix", "format_matrix", "content_matrix", "space_shares", "final_loss",
        "metrics", "extra_bytes")


def tiny_run(folder, name, *flags, cache):
    assert train.main([*TINY, "--cache-dir", str(cache), "--run-dir", str(folder / name), *flags]) == 0
    return json.loads((folder / name / "results.json").read_text())


@pytest.fixture(scope="module")
def naive_run(tmp_path_factory):
    """One naive tiny run, whose first task the tests below share -> (its folder, the cache of its base)."""
    folder = tmp_path_factory.mktemp("first-task")
    tiny_run(folder, "naive", "--strategy", "naive", cache=folder / "cache")
    return folder / "naive", folder / "cache"


@pytest.mark.parametrize("strategy", ["replay+tir", "lwf"])
def test_a_run_from_naives_first_task_is_the_run_that_trains_it(naive_run, tmp_path, strategy):
    naive, cache = naive_run
    trained = tiny_run(tmp_path, "trained", "--strategy", strategy, cache=cache)
    shared = tiny_run(tmp_path, "shared", "--strategy", strategy, "--first-task-from", str(naive),
                      cache=cache)
    assert shared["timings"][0]["reused_seconds"] > 0 and trained["timings"][0]["reused_seconds"] == 0
    for key in SAME:
        assert shared[key] == trained[key], key
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("trained", "shared"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert str(a["strategy"]) == str(b["strategy"])  # the buffer, the importances, the prototypes


@pytest.mark.parametrize("flags,fragment", [
    (["--strategy", "lora"], "lora does not train its first task as naive does"),
    (["--strategy", "replay", "--lr", "0.01"], "lr 0.0005 -> 0.01"),
    (["--strategy", "replay", "--tasks", "count,classify"], "no "),
], ids=["lora", "other-lr", "other-first-task"])
def test_first_task_from_refuses_what_would_not_give_the_same_bits(naive_run, tmp_path, capsys, flags,
                                                                   fragment):
    naive, cache = naive_run
    capsys.readouterr()
    assert train.main([*TINY, "--cache-dir", str(cache), "--run-dir", str(tmp_path / "other"),
                       "--first-task-from", str(naive), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --first-task-from") and fragment in err[0], err
    assert not (tmp_path / "other").exists()  # refused before any work


def test_a_task_pair_run_is_naives_run_of_each_pair(naive_run, tmp_path):
    """--pair-first classify over three tasks: each branch starts from classify's weights, as naive's second
    task would (classify,count is naive_run; classify,read is trained here), and classify's features are
    those TIR measures before its first task."""
    naive, cache = naive_run
    pair = tiny_run(tmp_path, "pairs", "--tasks", "classify,count,read", "--pair-first", "classify",
                    cache=cache)
    tiny_run(tmp_path, "tir", "--strategy", "tir", cache=cache)
    for other, two in (("count", json.loads((naive / "results.json").read_text())),
                       ("read", tiny_run(tmp_path, "read", "--tasks", "classify,read", cache=cache))):
        A, after = two["matrix"], pair["after"][other]
        assert [pair["alone"]["acc"], after["first"], after["own"]] == [A[0][0], A[1][0], A[1][1]]
        assert [pair["alone"]["loss"], after["loss"]] == two["final_loss"], other
    prototype = torch.load(tmp_path / "tir" / "checkpoint.pt", weights_only=True)["strategy"]["prototypes"][0]
    assert pair["features"] == [f.tolist() for f in prototype]


# ----------------------------------------------------------------------------------------------
# past one process: two gloo processes under torchrun train like one process with the same global
# batch, and only rank 0 writes

# answers of unequal length (a place, a caption), so the ranks' shares of answer tokens differ, which must
# weight their losses; LwF's rows asking old questions split over the ranks with the rest
DDP_ARGS = ["--strategy", "replay+lwf", "--tasks", "ground,caption", "--steps", "30", "--base-steps", "5",
            "--n-train", "40", "--n-test", "8", "--n-base", "40", "--buffer-size", "10", "--device", "cpu"]


@background
def one_and_two_processes(folder):
    """The same run in one process, then in two gloo processes under torchrun (the first caches the base)."""
    cache = ["--cache-dir", folder / "cache"]
    one = [sys.executable, ROOT / "train.py", *DDP_ARGS, "--run-dir", folder / "one", *cache]
    one = run_in_background(one, timeout=240, cwd=ROOT, env=ENV)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                ROOT / "train.py", *DDP_ARGS, "--run-dir", folder / "two", *cache]
    two = run_in_background(torchrun, timeout=240, cwd=ROOT, env=ENV)
    return folder, one, two


def test_two_gloo_processes_train_like_one(one_and_two_processes):
    tmp_path, one, two = one_and_two_processes
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1 and "| 2 processes" in two.stdout  # rank 1 prints nothing
    r1, r2 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    # each rank takes half of every batch and DDP averages the gradients: the same steps up to float rounding
    a, b = (load(tmp_path / d / "task2-caption.pt") for d in ("one", "two"))
    for k in a["model"]:
        x, y = a["model"][k], b["model"][k]
        if k.endswith("attn.qkv.bias"):  # not the key bias: softmax ignores a score added to every key, so
            x, y = x.view(3, -1)[[0, 2]], y.view(3, -1)[[0, 2]]  # its gradient is rounding noise, which AdamW
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-3, msg=k)  # scales up to full-size steps
    flat = [[a for row in r["matrix"] for a in row] for r in (r1, r2)]
    assert flat[0] == pytest.approx(flat[1], abs=12.5)  # at most one of 8 test rows answered otherwise
    names = [sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("two", "one")]
    assert names[0] == names[1]


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    train.atomic_write(tmp_path / "x.json", lambda p: p.write_text("{}"))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("RANK", "0")
    train.atomic_write(tmp_path / "x.json", lambda p: p.write_text("{}"))
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_compiled_run_with_the_kernel_finishes(tmp_path):
    """--bf16 --compile with attention.cu in the loop: 3 heads of 96 dims make head size 32, which the kernel
    covers (the tiny preset's 24 is not). load_cuda_attention prints 'compiling attention.cu', and without a
    warning the kernel ran."""
    flags = [a if a != "cpu" else "cuda" for a in DDP_ARGS]
    flags += ["--n-head", "3", "--bf16", "--compile", "--attn", "cuda"]
    proc = run("train.py", *flags, "--run-dir", tmp_path / "r", "--cache-dir", tmp_path / "c", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "compiling attention.cu" in proc.stdout and "CUDA attention unavailable" not in proc.stderr
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["config"]["model"]["n_head"] == 3 and results["config"]["model"]["attn"] == "cuda"
    assert results["config"]["train"]["bf16"] is True
    assert all(torch.isfinite(torch.tensor(results["final_loss"])))
