"""Metrics on hand-built accuracy matrices, answer scoring, the heatmap and the text report.

Every expected number below was worked out by hand from the definitions in eval.py's docstrings.
Run: python -m pytest tests/test_eval.py -q
"""
import pytest
from PIL import Image

import eval as ev
import pictures

A = [[90, 10, 20],  # row i: accuracy on each task after training task i
     [60, 80, 30],
     [40, 50, 70]]
BASE = [5, 10, 15]


def test_metrics_of_a_hand_built_matrix():
    assert ev.average_accuracy(A) == pytest.approx((40 + 50 + 70) / 3)                # 53.33
    assert ev.backward_transfer(A) == pytest.approx(((40 - 90) + (50 - 80)) / 2)      # -40
    assert ev.forgetting(A) == pytest.approx(((90 - 40) + (80 - 50)) / 2)             # 40
    assert ev.forward_transfer(A, BASE) == pytest.approx(((10 - 10) + (30 - 15)) / 2)  # 7.5
    assert ev.mean_average_accuracy(A) == pytest.approx((90 + (60 + 80) / 2 + (40 + 50 + 70) / 3) / 3)  # 71.11
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


def test_one_task_has_no_transfer():
    one = [[70]]
    assert ev.all_metrics(one, [10]) == dict(AA=70, BWT=0.0, forgetting=0.0, FWT=0.0, MAA=70, BWT_worst=0.0)


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


def test_heatmap_draws_each_cell_in_its_colour():
    tasks = ["classify", "attribute", "count"]
    img = pictures.heatmap(tasks, [[0, 100, 50], [100, 0, 50], [50, 50, 100]], "title")
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    wide = pictures.heatmap(tasks + ["read"], [[0] * 4] * 4)
    assert wide.size[0] > img.size[0] and wide.size[1] > img.size[1]  # one more task: one more row and column
    cell, left, top = 44, 110, 40  # the layout heatmap() draws with

    def corner(i, j):  # a pixel of cell (i, j) away from its printed number
        return img.getpixel((left + j * cell + 3, top + i * cell + 3))
    assert corner(0, 0) == corner(1, 1) == (255, 255, 255)   # 0 %: white
    assert corner(0, 1) == corner(1, 0) == (40, 145, 60)     # 100 %: dark green
    assert sum(corner(0, 0)) > sum(corner(0, 2)) > sum(corner(0, 1))  # 50 % is in between


def test_format_report_on_a_minimal_result():
    results = dict(config=dict(train=dict(strategy="replay")), tasks=["classify", "attribute", "count"],
                   matrix=A, base_row=BASE)
    report = ev.format_report(results)
    lines = report.splitlines()
    assert "strategy replay" in lines[0]
    assert lines[2].split() == ["base", "5.0", "10.0", "15.0", "10.0"]
    assert lines[5].split() == ["count", "40.0", "50.0", "70.0", "53.3"]
    assert "BWT -40.0" in report and "FWT +7.5" in report and "forgetting 40.0" in report and "MAA 71.1" in report


def test_eval_main_refuses_a_missing_run(tmp_path, capsys):
    assert ev.main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_the_report_names_the_worst_diagonal_entry_and_every_task_not_learnt():
    A = [[95, 0, 0], [40, 62, 0], [30, 20, 91]]
    line = ev.learnt_line(["read", "spatial", "count"], A)
    assert "worst task right after its own training: spatial 62.0" in line
    assert "NOT LEARNT (below 90): spatial 62.0" in line and "read" not in line.split("NOT LEARNT")[1]
    assert ev.learnt_line(["a"], [[90]]).endswith("every task learnt (>= 90)")
