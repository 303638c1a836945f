"""What report.py draws and writes: a heatmap's cells and size; the command line that reprints a run's report
and compares runs. (The study's report is tested in test_study.py, through the study that writes it.)

Run: python -m pytest tests/test_report.py -q
"""
import json

from PIL import Image

import report


def test_heatmap_draws_each_cell_in_its_colour():
    tasks = ["classify", "attribute", "count"]
    img = report.heatmap(tasks, [[0, 100, 50], [100, 0, 50], [50, 50, 100]], "title")
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    wide = report.heatmap(tasks + ["read"], [[0] * 4] * 4)
    assert wide.size[0] > img.size[0] and wide.size[1] > img.size[1]  # one more task: one more row and column
    cell, left, top = 44, 110, 40  # the layout heatmap() draws with

    def corner(i, j):  # a pixel of cell (i, j) away from its printed number
        return img.getpixel((left + j * cell + 3, top + i * cell + 3))
    assert corner(0, 0) == corner(1, 1) == (255, 255, 255)   # 0 %: white
    assert corner(0, 1) == corner(1, 0) == (40, 145, 60)     # 100 %: dark green
    assert sum(corner(0, 0)) > sum(corner(0, 2)) > sum(corner(0, 1))  # 50 % is in between


def test_eval_main_refuses_a_missing_run(tmp_path, capsys):
    assert report.main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_compare_puts_runs_side_by_side(tmp_path):
    def fake_run(strategy, aa, **extra):
        results = dict(config={"train": {"strategy": strategy}}, tasks=["a", "b"], wall_seconds=12.3,
                       metrics=dict(AA=aa, BWT=-4.0, forgetting=4.0, FWT=1.5), extra_bytes=3 * 1024 ** 2,
                       timings=[{"trainable": 10}, {"trainable": 1234}], **extra)
        folder = tmp_path / strategy
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(results))
        return folder
    runs = [fake_run("naive", 20.0), fake_run("expansion", 55.5, task_id_accuracy=97.25)]
    out = tmp_path / "out"
    assert report.main(["--compare", *map(str, runs), str(tmp_path / "empty"), "--out", str(out)]) == 0
    table = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert table[0].startswith("| strategy | AA | BWT |") and table[0].endswith("task ID |")
    best = "| expansion | 55.5 | -4.0 | 4.0 | +1.5 | 1,234 | 3.0 MB | 12 s | 97.2 |"
    assert table[2] == best  # best AA first
    assert table[3].startswith("| naive | 20.0 |") and table[3].endswith("| - |")
    assert (tmp_path / "out" / "table.png").stat().st_size > 0
