"""Savings that must change no result: each is checked against the slower way, bit for bit.

Run: python -m pytest tests/test_speed.py -q   (a few seconds)
"""
import json
import random

import pytest
import torch

import data
import strategies
import study
import runner
import train
from model import VLM, ModelConfig


def tiny_setup(seed=0):
    tok = data.train_tokenizer(data.ALL_TASKS, 0)
    mcfg = ModelConfig(vocab_size=tok.get_vocab_size(), vit_dim=32, d_model=32, n_head=2, vit_layers=1, n_layer=1)
    rows = data.make_split(data.TASKS["attribute"], "train", 16, 0, tok, mcfg.image_size, mcfg.max_text_len)[0]
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

    monkeypatch.setattr(train, "encode_images", lambda *args: {})
    monkeypatch.setattr(train, "vision_seen", lambda model, images, seen, device: model.vision(
        data.pixels(images).to(device)))  # the slow way: the whole batch through the tower, every step
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
    """What makes the cache exact: a row encoded alone or among others gives the same floats."""
    model, rows = tiny_setup()
    with torch.no_grad():
        whole = model.vision(data.pixels(rows.images))
        for i in (0, 5, 15):
            assert torch.equal(model.vision(data.pixels(rows.images[i:i + 1]))[0], whole[i])
        assert torch.equal(model.vision(data.pixels(rows.images[3:11])), whole[3:11])


# ----------------------------------------------------------------------------------------------
# a first task shared with naive's run (train.py --first-task-from, which the study passes)

TINY = ["--tasks", "classify,count", "--steps", "6", "--base-steps", "4", "--n-train", "16", "--n-test", "6",
        "--n-base", "16", "--batch-size", "4", "--device", "cpu", "--checkpoint-every", "1000"]
SAME = ("base_row", "random_row", "matrix", "format_matrix", "content_matrix", "space_shares", "final_loss",
        "metrics", "extra_bytes")


def tiny_run(tmp_path, name, *flags):
    assert train.main([*TINY, "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / name),
                       *flags]) == 0
    return json.loads((tmp_path / name / "results.json").read_text())


@pytest.mark.parametrize("strategy", ["replay+tir", "lwf"])
def test_a_run_from_naives_first_task_is_the_run_that_trains_it(tmp_path, strategy):
    tiny_run(tmp_path, "naive", "--strategy", "naive")
    trained = tiny_run(tmp_path, "trained", "--strategy", strategy)
    shared = tiny_run(tmp_path, "shared", "--strategy", strategy, "--first-task-from", str(tmp_path / "naive"))
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
def test_first_task_from_refuses_what_would_not_give_the_same_bits(tmp_path, capsys, flags, fragment):
    tiny_run(tmp_path, "naive", "--strategy", "naive")
    capsys.readouterr()
    assert train.main([*TINY, "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(tmp_path / "other"),
                       "--first-task-from", str(tmp_path / "naive"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --first-task-from") and fragment in err[0], err
    assert not (tmp_path / "other").exists()  # refused before any work


def without_times(summary):
    return {run: {k: v for k, v in m.items() if k != "extra time"} for run, m in summary.items()}


def test_a_study_sharing_naives_first_task_writes_the_same_study_json(tmp_path):
    """replay and tir start from naive's first task in one study and train it in the other; lora never can."""
    outs = {share: tmp_path / share for share in ("--share-first-task", "--no-share-first-task")}
    for share, out in outs.items():
        assert study.main(["--strategies", "naive,replay,tir,lora", "--bases", "pretrained", "--tasks",
                           "classify,count", "--seeds", "1", "--out", str(out), share, "--", *TINY[2:],
                           "--cache-dir", str(tmp_path / "cache")]) == 0
    shared, trained = (json.loads((out / "study.json").read_text()) for out in outs.values())
    runs = {(share, s): json.loads((out / "runs" / "tasks" / "pretrained" / s / "seed0" / "results.json").read_text())
            for share, out in outs.items() for s in ("naive", "replay", "tir", "lora")}
    reused = {s: r["timings"][0]["reused_seconds"] > 0 for (share, s), r in runs.items() if share == "--share-first-task"}
    assert reused == {"naive": False, "replay": True, "tir": True, "lora": False}
    for s in ("replay", "tir"):  # the tiny runs learn little, so their losses are what tells them apart
        assert runs["--share-first-task", s]["final_loss"] == runs["--no-share-first-task", s]["final_loss"]
    assert without_times(shared.pop("summary")) == without_times(trained.pop("summary"))
    shared.pop("about"), trained.pop("about")  # how each study was made: its command and wall time differ
    assert shared == trained


def test_the_loaded_once_glyph_font_draws_the_pixels_a_fresh_font_draws(monkeypatch):
    """data.glyph_font keeps Pillow's font after its first load; the text must come out the same pixels."""
    rng = random.Random(0)
    scenes = [data.Scene(data.random_objects(rng, 2), "".join(rng.sample(data.GLYPHS, 3))) for _ in range(20)]
    cached = [data.render(s) for s in scenes]
    monkeypatch.setattr(data, "glyph_font", lambda px: data.ImageFont.load_default(size=px))  # the old way
    assert all((data.render(s) == img).all() for s, img in zip(scenes, cached))
    assert (data.render(scenes[0]) != data.render(data.Scene(scenes[0].objects))).any()  # text drawn
