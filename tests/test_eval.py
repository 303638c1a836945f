"""Metrics on hand-built accuracy matrices, answer scoring, answer spaces and the format/content split, the
statistics (ranks, Spearman, the permutation test) and the text report (eval.py).

Every expected number below was worked out by hand from the definitions in eval.py's docstrings.
Run: python -m pytest tests/test_eval.py -q   (a few seconds)
"""
import math
import random

import pytest

import data
import eval as ev

A = [[90, 10, 20],  # row i: accuracy on each task after training task i
     [60, 80, 30],
     [40, 50, 70]]


BASE = [5, 10, 15]


# ----------------------------------------------------------------------------------------------
# metrics

def test_metrics_of_a_hand_built_matrix():
    assert ev.average_accuracy(A) == pytest.approx((40 + 50 + 70) / 3)                # 53.33
    assert ev.backward_transfer(A) == pytest.approx(((40 - 90) + (50 - 80)) / 2)      # -40
    assert ev.forgetting(A) == pytest.approx(((90 - 40) + (80 - 50)) / 2)             # 40
    assert ev.forward_transfer(A, BASE) == pytest.approx(((10 - 10) + (30 - 15)) / 2)  # 7.5
    maa = (90 + (60 + 80) / 2 + (40 + 50 + 70) / 3) / 3
    assert ev.mean_average_accuracy(A) == pytest.approx(maa)  # 71.11
    assert ev.worst_drop_bwt(A) == pytest.approx((min(60 - 90, 40 - 90) + (50 - 80)) / 2)  # -40
    assert ev.all_metrics(A, BASE) == pytest.approx(dict(AA=53.3333333, BWT=-40, forgetting=40, FWT=7.5,
                                                         MAA=71.1111111, BWT_worst=-40))


def test_forgetting_counts_from_the_best_accuracy_not_the_first():
    improved = [[50, 0, 0],
                [70, 80, 0],  # task 0 got better after task 1: its best is 70
                [40, 50, 60]]
    assert ev.forgetting(improved) == pytest.approx(((70 - 40) + (80 - 50)) / 2)         # 30
    assert ev.backward_transfer(improved) == pytest.approx(((40 - 50) + (50 - 80)) / 2)  # -20


def test_worst_drop_bwt_takes_the_lowest_later_accuracy():
    dipped = [[90, 0, 0],
              [30, 80, 0],  # task 0 fell to 30 and recovered to 40
              [40, 50, 60]]
    assert ev.worst_drop_bwt(dipped) == pytest.approx(((30 - 90) + (50 - 80)) / 2)     # -45
    assert ev.backward_transfer(dipped) == pytest.approx(((40 - 90) + (50 - 80)) / 2)  # -40


def test_a_model_that_stops_learning_shows_in_learnt_not_in_bwt():
    """Three tasks: only the first is learnt, and it is kept. Plain BWT (-0.0 for task 1, +5 for task 2, never
    learnt) calls this stable; the diagonal and BWT over learnt tasks say what happened."""
    frozen = [[100, 0, 0], [100, 10, 0], [100, 15, 20]]
    assert ev.backward_transfer(frozen) == pytest.approx(2.5)
    assert ev.mean_learnt(frozen) == pytest.approx(130 / 3)
    assert ev.learnt_bwt(frozen) == 0.0  # task 1 alone: the only learnt earlier task
    forgets = [[95, 0], [10, 100]]
    assert ev.learnt_bwt(forgets) == -85.0 and ev.learnt_bwt([[50, 0], [0, 100]]) is None


def test_one_task_has_no_transfer():
    one = [[70]]
    assert ev.all_metrics(one, [10]) == dict(AA=70, BWT=0.0, forgetting=0.0, FWT=0.0, MAA=70, BWT_worst=0.0)


def test_fwt_random_uses_the_random_models_row():
    A, base, random_row = [[90, 40], [50, 80]], [10, 30], [0, 5]
    m = ev.all_metrics(A, base, random_row)
    assert m["FWT"] == pytest.approx(40 - 30) and m["FWT_random"] == pytest.approx(40 - 5)
    assert "FWT_random" not in ev.all_metrics(A, base)


# ----------------------------------------------------------------------------------------------
# scoring, answer spaces, format and content

@pytest.mark.parametrize("pred,ref,score", [
    ("top left", "top left", 1.0),
    ("Top Left.", "top left", 1.0),       # case and punctuation do not count
    ("K7A", "K7A", 1.0),
    ("top left", "top right", 0.0),
    ("top left", "top left corner", 0.0),
    ("", "red", 0.0),
])
def test_exact_match(pred, ref, score):
    assert ev.exact_match(pred, ref) == score


@pytest.mark.parametrize("pred,ref,score", [
    ("a red circle", "a red circle.", 1.0),
    ("a red circle", "a red square", 2 / 3),        # 2 common words: precision 2/3, recall 2/3
    ("red", "a red circle", 0.5),                   # precision 1, recall 1/3 -> 2*(1/3)/(4/3)
    ("red red", "red", 2 / 3),                      # a word counts at most as often as the reference has it
    ("blue square", "a red circle", 0.0),
    ("", "", 1.0),
    ("", "a red circle", 0.0),
])
def test_token_f1(pred, ref, score):
    assert ev.token_f1(pred, ref) == pytest.approx(score)


def test_answer_spaces_hold_every_answer_their_task_makes_and_refuse_other_kinds():
    for name, task in data.TASKS.items():
        rng = random.Random(name)
        answers = [task.make(task.scene(rng), rng)[1] for _ in range(200)]
        in_space = ev.answer_space(name, answers[:100])
        assert all(in_space(a) for a in answers), name
    assert not ev.answer_space("count", [])("circle") and ev.answer_space("count", [])("7")
    assert not ev.answer_space("classify", [])("3") and not ev.answer_space("caption", [])("top left")
    # a task without an entry (a task file) falls back on its train answers
    assert ev.answer_space("my_file", ["yes", "no"])("No") and not ev.answer_space("my_file", ["yes"])("2")


def test_a_row_of_a_minor_kind_is_judged_in_its_kinds_space():
    """attribute (mixed) asks shapes, and some yes/no and number questions: each row's reference answer says
    its kind, so a shape given to a yes/no question is out of format there, though in the task's space."""
    spaces = ev.row_spaces(ev.answer_space("attribute", []), ["circle", "yes", "2"])
    assert [[s(a) for a in ("square", "no", "4")] for s in spaces] == [[True, False, False],
                                                                      [False, True, False],
                                                                      [False, False, True]]
    fmt, content = ev.format_content([("square", 0.0), ("circle", 0.0), ("2", 1.0)], spaces)
    assert fmt == pytest.approx(200 / 3) and content == 50
    count = ev.answer_space("count", [])
    assert ev.row_spaces(count, ["2", "0"]) == [count, count]  # a task's own kind keeps its own space


def test_format_and_content_split_an_accuracy():
    answered = [("circle", 1.0), ("square", 0.0), ("3", 0.0), ("top left", 0.0)]  # of a shape task
    fmt, content = ev.format_content(answered, [ev.answer_space("classify", [])] * 4)
    assert fmt == 50 and content == 50  # 2 of 4 are shapes; 1 of those 2 is right
    assert ev.format_content([("3", 0.0)], [ev.answer_space("classify", [])]) == (0, None)
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
# statistics

def test_ranks_average_ties():
    assert ev.ranks([10, 20, 20, 5]) == [2, 3.5, 3.5, 1]
    assert ev.ranks([7, 7, 7]) == [2, 2, 2]


def test_ranks_sorted_once_are_the_ranks_counted_pair_by_pair():
    """eval.ranks sorts; its reference counts, for each value, those below it and those equal to it."""
    rng = random.Random(0)
    for _ in range(200):
        xs = [rng.choice([1, 2, 3, 4.5, 7]) for _ in range(rng.randint(1, 20))]  # many ties
        assert ev.ranks(xs) == [sum(y < x for y in xs) + (sum(y == x for y in xs) + 1) / 2 for x in xs]


@pytest.mark.parametrize("xs,ys,rho", [
    ([1, 2, 3, 4], [1, 8, 27, 64], 1.0),        # monotone but not linear: Pearson would be < 1
    ([1, 2, 3, 4], [40, 30, 20, 10], -1.0),
    ([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], 0.8),    # no ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 24/120
    ([1, 2, 2, 3], [1, 3, 2, 4], math.sqrt(0.9)),  # x ranks 1, 2.5, 2.5, 4: cov 4.5 / sqrt(4.5 * 5)
])
def test_spearman_on_known_cases(xs, ys, rho):
    assert ev.spearman(xs, ys) == pytest.approx(rho)
    assert ev.spearman(ys, xs) == pytest.approx(rho)  # symmetric


def test_spearman_of_a_constant_is_undefined():
    assert math.isnan(ev.spearman([1, 2, 3], [5, 5, 5]))


def test_students_t_against_its_closed_form_and_its_tables():
    for t in (-3.0, -0.5, 0.0, 1.0, 4.0):  # two degrees of freedom: P(T <= t) = 1/2 + t / (2 sqrt(2 + t^2))
        assert ev.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-9)
    assert ev.t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)  # printed tables
    assert ev.t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)
    assert ev.t_quantile(0.975, 10 ** 6) == pytest.approx(1.960, abs=1e-3)  # the normal's


def test_paired_test_on_a_worked_example():
    # [1, 2, 3]: mean 2, sd 1, se 1/sqrt(3), t = 3.464 with 2 degrees of freedom
    mean, half, p = ev.paired_test([1, 2, 3])
    t = 2 * math.sqrt(3)
    assert mean == 2 and half == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert p == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-9)  # 0.0371
    assert ev.paired_test([-1, -2, -3])[2] == pytest.approx(1 - p)
    assert ev.paired_test([5]) == (5, None, None)  # one seed: no test
    assert ev.paired_test([2, 2])[2] == 0.0 and ev.paired_test([0, 0])[2] == 0.5


def test_holm_on_a_worked_example():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.04, then never below the one before: 0.06
    assert ev.holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    assert ev.holm([0.5, 0.9]) == [1.0, 1.0]


def grid(similar, drop):
    """A task x task similarity (a_i + a_j) and a drop that is defined off the diagonal: drop[j][i] = c_i."""
    return ([[x + y for y in similar] for x in similar],
            [[None if i == j else c for i, c in enumerate(drop)] for j in range(len(drop))])


def test_mantels_test_finds_a_strong_correlation_and_not_one_that_eight_tasks_cannot_show():
    assert ev.mantel_p(*grid([0, 1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2]), n=2000) < 0.001
    # 56 cells with ρ -0.37, which shuffling cells would call clear (p 0.003), but only 8 tasks: the
    # cells of one task share its drop, and relabelling the tasks often does as well
    similarity, drop = grid([0, 1, 2, 3, 4, 5, 6, 7], [3, 7, 5, 6, 0, 4, 2, 1])
    assert ev.spearman(*zip(*[(similarity[j][i], d) for j, row in enumerate(drop) for i, d in enumerate(row)
                              if d is not None])) == pytest.approx(-0.3686, abs=1e-4)
    assert 0.05 < ev.mantel_p(similarity, drop, n=2000) < 0.1
    assert math.isnan(ev.mantel_p(*grid(list(range(8)), [1] * 8)))


# ----------------------------------------------------------------------------------------------
# reports

def test_format_report_on_a_minimal_result():
    results = dict(config=dict(train=dict(strategy="replay")), tasks=["classify", "attribute", "count"],
                   matrix=A, base_row=BASE)
    report = ev.format_report(results)
    lines = report.splitlines()
    assert "strategy replay" in lines[0]
    assert lines[2].split() == ["base", "5.0", "10.0", "15.0", "10.0"]
    assert lines[5].split() == ["count", "40.0", "50.0", "70.0", "53.3"]
    assert "BWT -40.0" in report and "FWT +7.5" in report
    assert "forgetting 40.0" in report and "MAA 71.1" in report


def test_the_report_names_the_worst_diagonal_entry_and_every_task_not_learnt():
    A = [[95, 0, 0], [40, 62, 0], [30, 20, 91]]
    line = ev.learnt_line(["read", "spatial", "count"], A)
    assert "worst task right after its own training: spatial 62.0" in line
    assert "NOT LEARNT (below 90): spatial 62.0" in line and "read" not in line.split("NOT LEARNT")[1]
    assert ev.learnt_line(["a"], [[90]]).endswith("every task learnt (>= 90)")


def test_the_report_shows_routed_and_oracle_accuracy_with_task_id_accuracy():
    results = dict(config=dict(train=dict(strategy="expansion")), tasks=["a", "b"], base_row=[0, 0],
                   matrix=[[90, 0], [60, 80]], oracle_row=[90, 80], task_id_accuracy=75.0)
    report = ev.format_report(results)
    assert "routed AA 70.0, with oracle routing (each task's own expert) 85.0" in report
    assert "task-ID accuracy 75.0 %" in report
