"""The science of the study: TIR's similarity on a fixed scale, EWC's online merge, expansion's oracle bound,
FWT against a random model, forgetting split into format and content, and the study's statistics (per-seed
verdicts, finding 6's permutation test, task orders), down to one tiny real study.

Run: python -m pytest tests/test_science.py -q   (about 15 s)
"""
import json
import math

import pytest
import torch
import torch.nn as nn

import data
import eval as ev
import strategies
import study
import train
from model import VLM, ModelConfig
from strategies import StrategyConfig

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
    assert full["task_similarity_used"] == after_two.used and len(after_two.used[2]) == 3
    assert full["task_similarity"][2][:3] == pytest.approx(after_two.used[2])


# ----------------------------------------------------------------------------------------------
# EWC: the online merge keeps what is frozen now

class TwoParams(nn.Module):
    """logits = [0, 0, 0, 0, a·x, b·x] at every position, x the mean pixel."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(0.7)), nn.Parameter(torch.tensor(-0.4))

    def forward(self, images, ids, targets=None):
        x = images.mean((1, 2, 3))  # (B,)
        zero = torch.zeros_like(x)
        return torch.stack([zero, zero, zero, zero, self.a * x, self.b * x], -1)[:, None].expand(
            -1, ids.size(1), -1), None


def eos_rows(pixel_values):
    n = len(pixel_values)
    images = torch.tensor(pixel_values, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 1, 1).contiguous()
    tokens = torch.tensor([[data.BOS, data.SEP, data.EOS, data.PAD]] * n, dtype=torch.int16)
    return data.Examples("toy", images, tokens, torch.full((n,), 2, dtype=torch.int16), [""] * n)


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
    model = tiny_vlm(tok)
    expansion = strategies.build("expansion", StrategyConfig(lora_rank=2))
    tasks = [rows(tok, "classify"), rows(tok, "read")]
    for t, task_rows in enumerate(tasks):
        expansion.before_task(model, t, task_rows)
        with torch.no_grad():  # a different expert each: move the projector
            model.projector[0].weight += 0.5 * (t + 1)
        expansion.after_task(model, t, task_rows)
    images, ids = data.pixels(tasks[0].images[:4]), tasks[0].tokens[:4, :8].long()
    told = expansion.oracle(1).generate(model, images, ids, 5, data.EOS)
    expansion.load(model, expansion.experts[1])
    direct = model.generate(images, ids, 5, data.EOS)
    assert torch.equal(told[:, :direct.size(1)], direct)
    assert strategies.build("naive", StrategyConfig()).oracle(0) is None
    assert strategies.build("replay+expansion", StrategyConfig()).oracle(0) is not None


def test_the_report_shows_routed_and_oracle_accuracy_with_task_id_accuracy():
    results = dict(config=dict(train=dict(strategy="expansion")), tasks=["a", "b"], matrix=[[90, 0], [60, 80]],
                   base_row=[0, 0], oracle_row=[90, 80], task_id_accuracy=75.0)
    report = ev.format_report(results)
    assert "routed AA 70.0, with oracle routing (each task's own expert) 85.0; task-ID accuracy 75.0 %" in report


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
        in_space = ev.answer_space(name, answers[:100])  # spatial falls back on its train answers
        assert all(in_space(a) for a in answers), name
    assert not ev.answer_space("count", [])("circle") and ev.answer_space("count", [])("7")
    assert not ev.answer_space("classify", [])("3") and not ev.answer_space("caption", [])("top left")
    assert ev.answer_space("spatial", ["yes", "no"])("No") and not ev.answer_space("spatial", ["yes"])("2")


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
