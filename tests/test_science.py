"""The science of the study: TIR's similarity on a fixed scale, EWC's online merge, expansion's oracle bound,
FWT against a random model, forgetting split into format and content, and the study's statistics (per-seed
verdicts, finding 6's permutation test, task orders), down to one tiny real study.

Run: python -m pytest tests/test_science.py -q   (about 15 s)
"""
import json
import math

import pytest
import torch

import data
import eval as ev
import strategies
import study
from model import VLM, ModelConfig
from strategies import StrategyConfig
from test_strategies_cl import TwoParams, eos_rows  # a model whose gradients are known by hand

SMALL = dict(vit_dim=32, d_model=32, n_head=2, vit_layers=1, n_layer=1)  # a VLM that steps in milliseconds


@pytest.fixture(scope="module")
def tok():
    return data.train_tokenizer(list(data.TASKS.values()) + [data.ALIGN], seed=0)


def rows(tok, name, split="train", n=24):
    return data.make_split(data.TASKS[name], split, n, 0, tok, 48, 40)[0]


def tiny_vlm(tok):
    return VLM(ModelConfig(vocab_size=tok.get_vocab_size(), **SMALL), seed=0)


# ----------------------------------------------------------------------------------------------
# TIR: similarity against a fixed scale

def tir_keep(tok, sequence):
    """TIR through its hooks on tasks in sequence (no training steps) -> the factor 1 - similarity that its
    penalty applies to the first task's importances before the last task, and the strategy."""
    model, tir = tiny_vlm(tok), strategies.build("tir", StrategyConfig(importance_samples=8))
    for t, task_rows in enumerate(sequence[:-1]):
        tir.before_task(model, t, task_rows)
        tir.after_task(model, t, task_rows)
    tir.before_task(model, len(sequence) - 1, sequence[-1])
    weights, owned = tir.weights(), tir.owner
    first = [(weights[n][owned[n] == 0].sum(), f[owned[n] == 0].sum()) for n, f in tir.importance.items()]
    return float(sum(w for w, _ in first) / sum(f for _, f in first)), tir


def test_tir_tells_an_identical_task_from_an_unrelated_one_at_the_second_task(tok):
    """The old z-score gave 0.125 to any pair at T = 2 (both off-diagonal entries equal, std 0)."""
    same, _ = tir_keep(tok, [rows(tok, "classify"), rows(tok, "classify", "test")])  # other rows, same task
    other, _ = tir_keep(tok, [rows(tok, "classify"), rows(tok, "read")])
    assert same < 0.5 < other  # the same task needs little protection, an unrelated one much


def test_tir_similarity_does_not_depend_on_the_tasks_before(tok):
    _, after_one = tir_keep(tok, [rows(tok, "count"), rows(tok, "ground")])
    _, after_two = tir_keep(tok, [rows(tok, "read"), rows(tok, "count"), rows(tok, "ground")])
    assert after_one.used[1][0] == pytest.approx(after_two.used[2][1], abs=1e-6)
    full = after_two.extra_results(None, [])  # the saved rows are the ones used, and the lower triangle
    assert full["task_similarity_used"] == after_two.used
    assert [len(row) for row in after_two.used] == [1, 2, 3]
    assert full["task_similarity"][2][:3] == pytest.approx(after_two.used[2])


# ----------------------------------------------------------------------------------------------
# EWC: the online merge keeps what is frozen now

def test_ewc_keeps_the_importance_and_anchor_of_a_parameter_frozen_in_a_later_task():
    model, train_rows = TwoParams(), eos_rows([0, 60, 200, 255])
    ewc = strategies.build("ewc", StrategyConfig(importance_samples=4, importance_decay=0.5))
    ewc.after_task(model, 0, train_rows)
    first_b = ewc.importance["b"].clone()
    model.b.requires_grad_(False)  # task 1 trains a only
    with torch.no_grad():
        model.a += 0.3
    ewc.after_task(model, 1, train_rows)
    assert torch.allclose(ewc.importance["b"], 0.5 * first_b)  # kept, decayed by γ
    assert "b" in ewc.anchor and ewc.anchor["b"] == model.b


# ----------------------------------------------------------------------------------------------
# expansion: the oracle's bound

def test_expansion_oracle_answers_with_the_named_expert_and_the_plain_strategies_have_none(tok):
    model, gen = tiny_vlm(tok), torch.Generator().manual_seed(0)
    expansion = strategies.build("expansion", StrategyConfig(lora_rank=2))
    tasks = [rows(tok, "classify"), rows(tok, "read")]
    for t, task_rows in enumerate(tasks):
        expansion.before_task(model, t, task_rows)
        with torch.no_grad():  # a different expert each: a random projector
            for p in model.projector.parameters():
                p.copy_(3 * torch.randn(p.shape, generator=gen))
        expansion.after_task(model, t, task_rows)
    images, ids = data.pixels(tasks[0].images[:8]), tasks[0].tokens[:8, :8].long()
    told = [expansion.oracle(k).generate(model, images, ids, 5, data.EOS) for k in (0, 1)]
    assert not torch.equal(told[0], told[1])  # the two experts answer differently
    assert torch.equal(expansion.generate(model, images, ids, 5, data.EOS), told[0])  # classify rows go to 0
    expansion.load(model, expansion.experts[1])
    direct = model.generate(images, ids, 5, data.EOS)
    assert torch.equal(told[1][:, :direct.size(1)], direct)
    assert strategies.build("naive", StrategyConfig()).oracle(0) is None
    assert strategies.build("replay+expansion", StrategyConfig()).oracle(0) is not None


def test_the_report_shows_routed_and_oracle_accuracy_with_task_id_accuracy():
    results = dict(config=dict(train=dict(strategy="expansion")), tasks=["a", "b"], base_row=[0, 0],
                   matrix=[[90, 0], [60, 80]], oracle_row=[90, 80], task_id_accuracy=75.0)
    report = ev.format_report(results)
    assert "routed AA 70.0, with oracle routing (each task's own expert) 85.0" in report
    assert "task-ID accuracy 75.0 %" in report


# ----------------------------------------------------------------------------------------------
# FWT against a random model; format against content

def test_fwt_random_uses_the_random_models_row():
    A, base, random_row = [[90, 40], [50, 80]], [10, 30], [0, 5]
    m = ev.all_metrics(A, base, random_row)
    assert m["FWT"] == pytest.approx(40 - 30) and m["FWT_random"] == pytest.approx(40 - 5)
    assert "FWT_random" not in ev.all_metrics(A, base)


def test_answer_spaces_hold_every_answer_their_task_makes_and_refuse_other_kinds():
    import random
    for name, task in data.TASKS.items():
        rng = random.Random(name)
        answers = [task.make(task.scene(rng), rng)[1] for _ in range(200)]
        in_space = ev.answer_space(name, answers[:100])
        assert all(in_space(a) for a in answers), name
    assert not ev.answer_space("count", [])("circle") and ev.answer_space("count", [])("7")
    assert not ev.answer_space("classify", [])("3") and not ev.answer_space("caption", [])("top left")
    # a task without an entry (a task file) falls back on its train answers
    assert ev.answer_space("my_file", ["yes", "no"])("No") and not ev.answer_space("my_file", ["yes"])("2")


def test_format_and_content_split_an_accuracy():
    answered = [("circle", 1.0), ("square", 0.0), ("3", 0.0), ("top left", 0.0)]  # of a shape task
    fmt, content = ev.format_content(answered, ev.answer_space("classify", []))
    assert fmt == 50 and content == 50  # 2 of 4 are shapes; 1 of those 2 is right
    assert ev.format_content([("3", 0.0)], ev.answer_space("classify", [])) == (0, None)
    shares = ev.space_shares([[("3", 0.0)], [("2", 1.0), ("circle", 0.0)]],
                             [ev.answer_space("classify", []), ev.answer_space("count", [])])
    assert shares == pytest.approx([100 / 3, 200 / 3])
    story = ev.format_story(["classify", "count"], [[90, 0], [10, 100]])
    assert story[1] == "after count, 100 % of all answers (to every task's questions) are of count's kind"


def test_format_drop_is_the_part_of_minus_bwt_that_format_explains():
    A = [[90, 0], [30, 80]]  # task 0 drops 60 points
    F = [[100, 0], [40, 100]]  # ... and 60 % of its answers leave its space
    C = [[90, None], [75, 80]]
    assert ev.format_drop(A, F, C) == pytest.approx(60 * 0.9)  # 54 of the 60 points: format
    assert -ev.backward_transfer(A) == 60


# ----------------------------------------------------------------------------------------------
# the study's statistics: per-seed verdicts, finding 6, task orders

TASKS = ["classify", "attribute", "count", "ground"]


def result(strategy, matrix, similarity=None):
    r = dict(config=dict(train=dict(strategy=strategy)), tasks=TASKS[:len(matrix)], matrix=matrix,
             base_row=[0] * len(matrix), metrics=ev.all_metrics(matrix, [0] * len(matrix)), extra_bytes=0,
             wall_seconds=9,
             timings=[dict(task=t, train_seconds=1, eval_seconds=1, trainable=1) for t in matrix])
    return r if similarity is None else {**r, "task_similarity": similarity}


def naive_matrix(drops, learnt=(95, 95, 95, 95)):
    """A 4-task naive matrix: task i at learnt[i] when trained, then drops[i] points while task i+1 trains."""
    T = len(learnt)
    A = [[0.0] * T for _ in range(T)]
    for i in range(T):
        A[i][i] = learnt[i]
        for j in range(i + 1, T):
            A[j][i] = max(learnt[i] - drops[i], 0) if i < len(drops) else 0
    return A


SIMILAR = [[1, .9, .1, .1], [.9, 1, .5, .1], [.1, .5, 1, .2], [.1, .1, .2, 1]]  # of i+1 to i: .9, .5, .2


def test_a_finding_holds_only_on_every_seed():
    """Seeds 0 and 1 forget, seed 2 gains: the old mean over seeds said 'holds'; it is mixed."""
    runs = {("pretrained", "naive", seed): result("naive", A) for seed, A in enumerate(
        [[[90, 0], [40, 80]], [[90, 0], [50, 80]], [[60, 0], [70, 80]]])}
    check = study.findings(runs, ["pretrained"])[0]
    assert check["per_seed"] == [True, True, False] and check["verdict"] == "mixed"
    assert check["differences"] == {"naive BWT (pretrained)": [-50, -40, 10]}
    assert "per seed: holds, holds, fails" in study.finding_text(check)
    assert study.verdict([False, None, False]) == "fails" and study.verdict([None]) == "not measured"


def test_finding_6_uses_learnt_adjacent_pairs_averaged_over_seeds_and_bases():
    runs = {}
    for base in study.BASES:
        for seed in range(3):  # task 2 is not learnt on seed 0: that seed leaves its pair out
            learnt = (95, 95, 80 if seed == 0 else 95, 95)
            runs[base, "naive", seed] = result("naive", naive_matrix([19, 57, 76], learnt))
            runs[base, "tir", seed] = result("tir", naive_matrix([0, 0, 0]), SIMILAR)
    pairs = study.interference(runs)
    assert len(pairs) == 3  # three task pairs, not 3 x 2 bases x 3 seeds, nor every later task
    assert pairs == [pytest.approx((.9, .2)), pytest.approx((.5, .6)), pytest.approx((.2, .8))]
    check = study.findings(runs, list(study.BASES))[5]
    assert check["rho"] == pytest.approx(-1) and check["n_pairs"] == 3
    assert check["p"] == ev.permutation_p([.9, .5, .2], [.2, .6, .8])  # seeded: the same every time
    assert 0.1 < check["p"] < 0.25  # 1 of 6 orderings: too few pairs to be significant, and it says so
    assert check["verdict"] == "not significant" and "not significant" in study.finding_text(check)


def test_the_permutation_test_finds_a_strong_correlation_and_not_a_weak_one():
    xs = list(range(8))
    assert ev.permutation_p(xs, [-x for x in xs]) < 0.001
    assert ev.permutation_p(xs, [3, 1, 4, 1, 5, 9, 2, 6]) > 0.3
    assert math.isnan(ev.permutation_p(xs, [1] * 8))


def test_the_report_says_whether_each_verdict_survives_the_other_order(tmp_path):
    forgets = {("pretrained", "naive", 0): result("naive", [[90, 0], [40, 80]])}
    keeps = {("pretrained", "naive", 0): result("naive", [[90, 0], [95, 80]])}
    study.write_report(tmp_path, forgets, ["naive"], ["pretrained"], others={"easy-first": keeps})
    md = (tmp_path / "study.md").read_text()
    assert "tuning forgets: BWT < 0: **holds**; easy-first order: **fails** (does not survive)" in md
    assert json.loads((tmp_path / "study.json").read_text())["orders"]["easy-first"][0]["verdict"] == "fails"


def test_the_study_defaults_run_three_seeds_and_replay_with_tir_in_the_paper_order(monkeypatch):
    seen = {}
    monkeypatch.setattr(study, "study", lambda args, names, bases, extra: seen.update(
        args=args, names=names) or 0)
    assert study.main([]) == 0
    assert seen["args"].seeds == 3 and "replay+tir" in seen["names"] and "tir" in seen["names"]
    assert study.orders_of(seen["args"]) == {"paper": "paper"}  # --orders paper,easy-first: twice the runs


TINY = ["--steps", "2", "--base-steps", "2", "--n-train", "8", "--n-test", "4", "--n-base", "8",
        "--batch-size", "4", "--device", "cpu", "--vit-dim", "32", "--d-model", "32", "--n-head", "2",
        "--n-layer", "1", "--vit-layers", "1"]


def test_tiny_study_over_two_orders_writes_every_part_of_the_report(tmp_path):
    out = tmp_path / "study"
    argv = ["--strategies", "naive,tir", "--bases", "pretrained", "--seeds", "1", "--orders", "paper,easy-first",
            "--out", str(out), "--", *TINY, "--cache-dir", str(tmp_path / "cache")]
    assert study.main(argv) == 0
    md, report = (out / "study.md").read_text(), json.loads((out / "study.json").read_text())
    assert "per seed: " in md and "one-sided permutation" in md and "easy-first order: **" in md
    assert "FWT_random" in md and "## Forgetting taken apart: format and content" in md
    assert set(report["orders"]) == {"easy-first"} and len(report["findings"]) == 6
    run_dir = out / "runs" / "easy-first" / "pretrained" / "tir" / "seed0"
    run = json.loads((run_dir / "results.json").read_text())
    assert run["tasks"] == list(data.ORDERS["easy-first"]) and len(run["random_row"]) == 8
    assert len(run["format_matrix"]) == len(run["content_matrix"]) == 8 and "FWT_random" in run["metrics"]
    assert [len(row) for row in run["task_similarity_used"]] == list(range(1, 9))
    for name in ("format-pretrained.png", "content-pretrained.png", "similarity-pretrained.png"):
        assert (out / name).is_file()
