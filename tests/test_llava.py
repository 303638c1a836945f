"""Instruction rows and task files (llava.py): the tokenizer's round trips and batch targets; LLaVA-format
files in, the benchmark out.

Every bad input gets one line naming the file and the record; multi-turn records split into pairs;
images resolve against the file's folder or --image-root and are cached; and the exported benchmark,
read back, gives the very tensors (and so the very training run) of the built-in path.

Run: python -m pytest tests/test_llava.py -q
"""
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import data
import llava
import train
from test_runner import assert_one_line_error, main_here  # train.main, refusals and all
from test_runner import run as run_script  # the command line, as a user runs it

SIZE, MAX_LEN = 48, 40  # the tiny preset's image size and row length
BUILTIN = list(data.TASKS.values()) + [data.ALIGN]


@pytest.fixture(scope="module")
def tok():
    return llava.train_tokenizer(BUILTIN, seed=0)


# ----------------------------------------------------------------------------------------------
# tokenizer

def test_tokenizer_round_trips_every_instruction_and_answer(tok):
    assert tok.get_vocab_size() < 200
    unk = tok.token_to_id("[UNK]")
    for task in BUILTIN:
        rng = random.Random(f"tokenizer-test-{task.name}")
        for _ in range(200):
            for text in task.make(task.scene(rng), rng):
                ids = tok.encode(text).ids
                assert unk not in ids, text
                assert tok.decode(ids) == text


def test_glyphs_are_split_one_by_one(tok):
    enc = tok.encode("K7A")
    assert [t for t in enc.tokens if t != "▁"] == ["K", "7", "A"]
    assert tok.decode(enc.ids) == "K7A"


def test_special_token_ids_match_the_constants(tok):
    assert [tok.token_to_id(s) for s in llava.SPECIAL] == list(range(len(llava.SPECIAL)))
    assert (tok.token_to_id("[PAD]"), tok.token_to_id("[BOS]"), tok.token_to_id("[SEP]"),
            tok.token_to_id("[EOS]")) == (llava.PAD, llava.BOS, llava.SEP, llava.EOS)


# ----------------------------------------------------------------------------------------------
# batches

def test_to_batch_masks_prompt_and_padding(tok):
    parts = [llava.make_split(data.TASKS[n], "train", 6, 0, tok, SIZE, MAX_LEN)[0]
             for n in ("classify", "caption", "spatial")]  # different prompt and answer lengths
    ex = llava.Examples.concat(parts)
    idx = list(range(len(ex)))
    images, inputs, targets = llava.to_batch(ex, idx, "cpu")
    tokens = ex.tokens.long()
    lengths = (tokens != llava.PAD).sum(1)
    T = int(lengths.max())
    assert inputs.shape == targets.shape == (len(ex), T - 1)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs, tokens[:, :T - 1])
    for b in range(len(ex)):
        p, n = int(ex.prompt_len[b]), int(lengths[b])
        for t in range(T - 1):
            if t < p - 1 or t + 1 >= n:  # predicting a prompt token, or padding
                assert targets[b, t] == -100, (b, t)
            else:  # predicting answer token t+1 (or the EOS)
                assert targets[b, t] == tokens[b, t + 1], (b, t)
        kept = [int(x) for x in targets[b] if x != -100]
        assert kept[-1] == llava.EOS and tok.decode(kept[:-1]) == ex.answers[b]
    assert images.dtype == torch.float32 and images.shape == (len(ex), 3, SIZE, SIZE)
    assert images.min() >= -1 and images.max() <= 1
    assert torch.allclose(images, ex.images.float() / 127.5 - 1)
    assert llava.pixels(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


def png(path, size=SIZE, color=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size) if isinstance(size, int) else size, color).save(path)
    return path


def turns(*texts):
    """human, gpt, human, gpt, ... turns with these values."""
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


def record(i, *texts, image=None):
    return {"id": f"q{i}", "image": image or f"images/{i}.png",
            "conversations": turns(*(texts or ("<image>\nWhat shape is the red object?", "circle")))}


def task_file(folder, records, name="mytask.json", images=True):
    """Write records as a task file in `folder`, and a PNG for each image under images/ (unless
    images=False)."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    for r in records if images else []:
        if isinstance(r, dict) and str(r.get("image")).startswith("images/"):
            png(folder / r["image"])
    jsonl = "\n".join(json.dumps(r) for r in records)
    path.write_text(jsonl if name.endswith(".jsonl") else llava.records_json(records))
    return path


def load(path, cache=None, **kw):
    """read_tasks + make_task as train.py calls them -> (train, test, tokenizer)."""
    tasks = llava.read_tasks([str(path)], cache=cache or path.parent / "run" / "cache", **kw)
    tok = llava.train_tokenizer(BUILTIN, 0, llava.file_texts(tasks.values()))
    (task,) = tasks.values()
    return *llava.load_file_task(task, 0, tok, SIZE, MAX_LEN), tok


def load_error(path, **kw):
    with pytest.raises(llava.TaskFileError) as e:
        load(path, **kw)
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    return message


# ----------------------------------------------------------------------------------------------
# bad input, one line each, naming the file and the record

GOOD = [record(i) for i in range(4)]
BAD = {  # name: (records, expected fragments after the file's name)
    "no image": ([*GOOD[:2], {"id": "q2", "conversations": turns("Q?", "A")}],
                 ["record 2 (id 'q2')", "no 'image'"]),
    "no conversations": ([{"id": 7, "image": "images/0.png"}, *GOOD[1:]],
                         ["record 0 (id 7)", "no 'conversations'"]),
    "not an object": ([*GOOD[:3], ["images/3.png"]], ["record 3", "JSON object, not list"]),
    "missing image": ([*GOOD[:3], record(3, image="gone/3.png")], ["record 3 (id 'q3')", "gone/3.png",
                                                                          "No such file"]),
    "empty answer": ([*GOOD[:3], record(3, "Q?", "  ")], ["record 3 (id 'q3')", "turn 2 is an empty answer"]),
    "not alternating": ([{**record(0), "conversations": [*turns("Q?", "A"), {"from": "gpt", "value": "B"}]},
                         *GOOD[1:]],
                        ["record 0 (id 'q0')", "turn 3 is from 'gpt' but a 'human' turn was expected"]),
    "unknown from": ([*GOOD[:1], {**record(1), "conversations": [{"from": "system", "value": "Be brief."},
                                                                  *turns("Q?", "A")]}],
                     ["record 1 (id 'q1')", "turn 1 is from 'system'", "'human' or 'gpt'"]),
    "question without answer": ([*GOOD[:2], record(2, "Q?", "A", "And then?")],
                                ["record 2 (id 'q2')", "turn 3 is a question without an answer"]),
    "duplicate id": ([*GOOD[:3], record(1)], ["record 3 (id 'q1')", "duplicate id: record 1"]),
    "unknown metric": ([*GOOD[:1], {**record(1), "metric": "bleu"}],
                       ["record 1 (id 'q1')", "unknown metric 'bleu'"]),
    "mixed metrics": ([*GOOD[:2], {**record(2), "metric": "f1"}],
                      ["record 2 (id 'q2')", "metric 'f1' differs"]),
    "too long": ([*GOOD[:2], record(2, "Q?", " ".join(["circle"] * 40))],  # [BOS] Q ? [SEP], 40 words, [EOS]
                 ["record 2 (id 'q2')", "pair 1 is 45 tokens, more than max_text_len=40", "--truncate"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_record_names_file_and_record(tmp_path, case):
    records, fragments = BAD[case]
    message = load_error(task_file(tmp_path, records))
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "run").exists()  # every check comes before an image is decoded or cached


@pytest.mark.parametrize("name,text,fragments", [
    ("bad.json", '[\n{"id": 1, "image": "a.png",\n "conversations": [}\n]',
     ["bad.json: invalid JSON at line 3 column 20"]),
    ("bad.jsonl", json.dumps(record(0)) + "\n\n" + '{"id": "q1", "image": }\n',
     ["bad.jsonl record 1", "line 3"]),
    ("dict.json", json.dumps(record(0)), ["dict.json: expected a non-empty list of records"]),
    ("empty.jsonl", "\n", ["empty.jsonl: expected a non-empty list"]),
    ("latin1.json", b"[\xe9]", ["latin1.json: not UTF-8 text"]),
])
def test_invalid_json_names_the_line(tmp_path, name, text, fragments):
    path = tmp_path / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    message = load_error(path)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("kind,fragment", [("text", "is not an image"), ("truncated", "cannot read image"),
                                           ("folder", "cannot read image")])
def test_unreadable_image_and_nothing_half_written(tmp_path, kind, fragment):
    path = task_file(tmp_path, GOOD)
    bad = tmp_path / "images" / "2.png"
    if kind == "text":
        bad.write_text("not a picture")
    elif kind == "truncated":  # a PNG cut in half: the header reads, the pixels do not
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:300])
    else:
        bad.unlink()
        bad.mkdir()
    message = load_error(path)
    assert "record 2 (id 'q2')" in message and fragment in message and "2.png" in message, message
    assert not list((tmp_path / "run").rglob("*.pt*")), "a cache file was written for a file that failed"


def test_truncate_cuts_the_answer_and_counts(tmp_path, capsys):
    long_answer = " ".join(["circle"] * 40)
    path = task_file(tmp_path, [*GOOD[:2], record(2, "What is it?", long_answer),
                                record(3, "Q?", long_answer)])
    path.with_name("mytask.test.json").write_text(llava.records_json([record(0)]))
    train_rows, _, tok = load(path, truncate=True)
    assert "--truncate cut 2 rows to 40 tokens" in capsys.readouterr().out
    cut = train_rows.subset([2])
    assert int((cut.tokens != llava.PAD).sum()) == MAX_LEN and llava.EOS not in cut.tokens.tolist()[0]
    # scored on what is left
    assert cut.answers[0] == " ".join(["circle"] * (MAX_LEN - int(cut.prompt_len[0])))
    assert train_rows.answers[:2] == ["circle", "circle"]  # rows that fit are untouched
    too_long_question = task_file(tmp_path / "q", [record(0, " ".join(["red"] * 40), "circle"), *GOOD[1:]])
    assert "question alone is too long" in load_error(too_long_question, truncate=True)


def test_tasks_are_named_once(tmp_path):
    a, b = task_file(tmp_path / "a", GOOD, "count.json"), task_file(tmp_path / "b", GOOD)
    c = task_file(tmp_path / "c", GOOD)
    with pytest.raises(llava.TaskFileError, match="already has a task named 'count'"):
        llava.read_tasks(["count", str(a)])
    with pytest.raises(llava.TaskFileError, match="already has a task named 'mytask'"):
        llava.read_tasks([str(b), str(c)])


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path):
    def train_py(tasks):
        return main_here(["--tasks", tasks, "--steps", "1", "--base-steps", "1", "--n-train", "4",
                          "--n-test", "2", "--n-base", "4", "--device", "cpu", "--run-dir", tmp_path / "run",
                          "--cache-dir", tmp_path / "cache"])

    missing = train_py(f"classify,{tmp_path / 'nope.json'}")
    assert_one_line_error(missing, "nope.json: No such file or directory")
    jsonl = tmp_path / "files" / "broken.jsonl"
    task_file(jsonl.parent, GOOD, jsonl.name).write_text(json.dumps(record(0)) + "\n{oops\n")
    assert_one_line_error(train_py(f"classify,{jsonl}"), "broken.jsonl record 1", "invalid JSON at line 2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["files"]
    # an image that does not decode is found after the tokenizer is trained: no cache, no checkpoint
    path = task_file(tmp_path / "files", GOOD)
    (tmp_path / "files" / "images" / "1.png").write_text("not a picture")
    assert_one_line_error(train_py(path), "mytask.json record 1 (id 'q1')", "1.png is not an image")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "tokenizer.json"]
    assert not list((tmp_path / "cache").glob("*"))  # proven writable up front, but no base trained into it


def bad_file(folder, case):
    """Every bad input above, as a task file in folder -> (its path, fragments its error must hold)."""
    if case in BAD:
        records, fragments = BAD[case]
        return task_file(folder, records), fragments
    if case in BAD_JSON:
        name, text, fragments = BAD_JSON[case]
        folder.mkdir(parents=True)
        (folder / name).write_bytes(text) if isinstance(text, bytes) else (folder / name).write_text(text)
        return folder / name, fragments
    path, bad = task_file(folder, GOOD), folder / "images" / "2.png"
    if case == "image: text":
        bad.write_text("not a picture")
    elif case == "image: truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:300])
    return path, ["record 2 (id 'q2')", "2.png"]


BAD_JSON = {  # case: (file name, text, fragments), as in test_invalid_json_names_the_line
    "json: syntax": ("bad.json", '[\n{"id": 1, "image": "a.png",\n "conversations": [}\n]',
                     ["invalid JSON at line 3"]),
    "jsonl: syntax": ("bad.jsonl", json.dumps(record(0)) + "\n\n" + '{"id": "q1", "image": }\n',
                      ["record 1", "line 3"]),
    "json: not a list": ("dict.json", json.dumps(record(0)), ["expected a non-empty list of records"]),
    "jsonl: empty": ("empty.jsonl", "\n", ["expected a non-empty list"]),
    "json: not UTF-8": ("latin1.json", b"[\xe9]", ["not UTF-8 text"]),
    "json: nested too deeply": ("deep.json", "[" * 5000 + "]" * 5000, ["nested too deeply"]),
    "jsonl: nested too deeply": ("deep.jsonl", json.dumps(record(0)) + "\n" + "[" * 5000 + "]" * 5000,
                                 ["record 1", "nested too deeply"]),
}


@pytest.mark.parametrize("case", [*BAD, *BAD_JSON, "image: text", "image: truncated"])
def test_every_bad_input_through_the_cli_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    """train.py's main() on each bad file: exit code 2, one line naming the file, no traceback, no run folder
    and no cache. What only the tokenizer can find (a row too long, an image that does not decode) is found
    after it is trained and saved: then config.json and tokenizer.json alone are there."""
    path, fragments = bad_file(tmp_path / "files", case)
    code = train.main(["--tasks", f"classify,{path}", "--steps", "1", "--base-steps", "1", "--n-train", "4",
                       "--n-test", "2", "--n-base", "4", "--device", "cpu", "--run-dir",
                       str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}"), captured.err
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
    written = sorted(p.name for p in (tmp_path / "run").iterdir()) if (tmp_path / "run").exists() else []
    late = case.startswith("image") or case == "too long"
    assert written == (["config.json", "tokenizer.json"] if late else []), written
    assert not list((tmp_path / "run").rglob("*.pt*"))


# ----------------------------------------------------------------------------------------------
# what a good file becomes

def test_multi_turn_record_becomes_one_row_per_pair(tmp_path, capsys):
    conversation = record(0, "<image>\nWhat shape is the red object?", "circle", "Where is it?<image>",
                          "top left", "  And its size?  ", "small")
    path = task_file(tmp_path, [conversation, record(1, "<image>\nCount the blue objects.", "2")])
    path.with_name("mytask.test.json").write_text(llava.records_json([record(2, "Is it red?", "yes")]))
    png(tmp_path / "images" / "0.png", color=(1, 2, 3))
    png(tmp_path / "images" / "2.png")
    train_rows, test_rows, tok = load(path)
    assert "mytask: 3 records, 5 pairs -> 4 train + 1 test rows; images decoded" in capsys.readouterr().out
    questions = [tok.decode(row[1:p - 1])
                 for row, p in zip(train_rows.tokens.tolist(), train_rows.prompt_len.tolist())]
    assert questions == ["What shape is the red object?", "Where is it?", "And its size?",
                         "Count the blue objects."]
    assert train_rows.answers == ["circle", "top left", "small", "2"] and test_rows.answers == ["yes"]
    assert all(torch.equal(train_rows.images[i], train_rows.images[0]) for i in (1, 2))  # one image, 3 pairs
    assert train_rows.images[0, :, 0, 0].tolist() == [1, 2, 3]
    assert train_rows.images[3, :, 0, 0].tolist() == [200, 30, 30]
    assert train_rows.metric == test_rows.metric == "exact" and train_rows.name == "mytask"
    for row in train_rows.tokens.tolist():  # every row: [BOS] question [SEP] answer [EOS], no unknown word
        assert row[0] == llava.BOS and llava.SEP in row and llava.EOS in row
        assert tok.token_to_id("[UNK]") not in row


def test_new_words_get_new_ids_and_benchmark_ids_stay(tmp_path, tok):
    path = task_file(tmp_path, [record(0, "What breed is the dog?", "a beagle"), *GOOD[1:]])
    tasks = llava.read_tasks(["classify", str(path)])
    mixed = llava.train_tokenizer(BUILTIN, 0, llava.file_texts(tasks.values()))
    old, new = tok.get_vocab(), mixed.get_vocab()
    assert {w: new[w] for w in old} == old  # the benchmark's words keep their ids
    assert sorted(set(new) - set(old)) == ["▁beagle", "▁breed", "▁dog"]
    assert sorted(new[w] for w in set(new) - set(old)) == list(range(len(old), len(new)))
    assert mixed.decode(mixed.encode("What breed is the dog?").ids) == "What breed is the dog?"


def test_images_resolve_against_the_file_folder_or_image_root(tmp_path, monkeypatch):
    path = task_file(tmp_path / "tasks", GOOD, images=False)
    elsewhere = tmp_path / "pictures"
    for i in range(4):  # sizes and modes the model does not take: resized, made RGB
        png(elsewhere / "images" / f"{i}.png", size=(64, 32), color=90, mode="L")
    monkeypatch.chdir(tmp_path)  # relative image paths must not depend on the working folder
    assert "No such file" in load_error(path)  # the default root, the file's folder, has no images
    train_rows, test_rows, _ = load(path, image_root=str(elsewhere))
    assert train_rows.images.dtype == torch.uint8 and train_rows.images.shape == (3, 3, SIZE, SIZE)
    assert (train_rows.images == 90).all()  # grey 90 in every channel
    for i in range(4):
        png(path.parent / "images" / f"{i}.png", color=(i, 50, 60))
    train_rows, test_rows, _ = load(path, cache=tmp_path / "cache2")  # now the file's own folder has them
    pixels = torch.cat([train_rows.images, test_rows.images])[:, 0, 0, 0]
    assert sorted(int(x) for x in pixels) == [0, 1, 2, 3]


def test_held_out_split_is_seeded_and_keeps_records_whole(tmp_path, tok):
    records = [record(i, "What shape is the red object?", "circle", "Where is it?", "center")
               for i in range(30)]
    path = task_file(tmp_path, records)
    (task,) = llava.read_tasks([str(path)], cache=tmp_path / "cache").values()

    def split(seed):
        return [sorted(set(ex.images[:, 0, 0, 0].tolist()))
                for ex in llava.load_file_task(task, seed, tok, SIZE, MAX_LEN)]

    for i, r in enumerate(records):  # the record number in the pixels tells where each row came from
        png(tmp_path / r["image"], color=(i, 0, 0))
    (task,) = llava.read_tasks([str(path)], cache=tmp_path / "cache").values()
    train_ids, test_ids = split(0)
    assert len(test_ids) == 3 and len(train_ids) == 27 and not set(train_ids) & set(test_ids)
    assert split(0) == [train_ids, test_ids] and split(1) != [train_ids, test_ids]
    train_rows, _ = llava.load_file_task(task, 0, tok, SIZE, MAX_LEN)
    assert len(train_rows) == 2 * 27  # both pairs of every training record


def test_second_load_reads_the_cache_until_something_changes(tmp_path, capsys):
    path = task_file(tmp_path, GOOD)
    first = load(path)
    assert "images decoded" in capsys.readouterr().out
    second = load(path)
    assert "images cached" in capsys.readouterr().out
    assert all(torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)
               for a, b in zip(first[:2], second[:2]))
    assert len(list((tmp_path / "run" / "cache").iterdir())) == 1  # one file, no .tmp left over
    png(tmp_path / "images" / "1.png", color=(0, 0, 255))  # an image changes: its pixels are read again
    third = load(path)
    assert "images decoded" in capsys.readouterr().out
    assert not torch.equal(torch.cat([third[0].images, third[1].images]),
                           torch.cat([first[0].images, first[1].images]))


# ----------------------------------------------------------------------------------------------
# the round trip: export the benchmark, read it back, get the built-in path's tensors and run

N_TRAIN, N_TEST = 12, 6


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "bench"
    proc = run_script("train.py", "--export", out, "--n-train", N_TRAIN, "--n-test", N_TEST)
    assert proc.returncode == 0, proc.stderr
    return out


def test_export_writes_every_task_as_llava_records(exported):
    for name, task in data.TASKS.items():
        train_records = json.loads((exported / f"{name}.json").read_text())
        test_records = json.loads((exported / f"{name}.test.json").read_text())
        assert len(train_records) == N_TRAIN and len(test_records) == N_TEST
        first = train_records[0]
        assert first["image"] == f"images/{name}/train-0.png" and first["metric"] == task.metric
        assert [t["from"] for t in first["conversations"]] == ["human", "gpt"]
        assert first["conversations"][0]["value"].startswith("<image>\n")
        with Image.open(exported / first["image"]) as img:
            assert img.format == "PNG" and img.size == (SIZE, SIZE) and img.mode == "RGB"


def test_reimported_benchmark_is_identical_to_the_built_in_path(exported, tok):
    tasks = llava.read_tasks([str(exported / f"{n}.json") for n in data.TASKS],
                             cache=exported.parent / "cache")
    reread = llava.train_tokenizer(BUILTIN, 0, llava.file_texts(tasks.values()))
    assert reread.to_str() == tok.to_str()  # no new word, no new id
    for name, task in tasks.items():
        built_in = llava.make_task(data.TASKS[name], N_TRAIN, N_TEST, 0, tok, SIZE, MAX_LEN)
        for a, b in zip(built_in, llava.load_file_task(task, 0, tok, SIZE, MAX_LEN)):
            assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens), name
            assert torch.equal(a.prompt_len, b.prompt_len) and a.answers == b.answers, name
            assert (a.name, a.metric, len(a)) == (b.name, b.metric, len(b)), name


def test_training_on_the_export_repeats_the_built_in_run(exported, tmp_path):
    """The same command with files for names: the same base (reused), bit-identical weights, the same
    matrix."""
    names = ["classify", "caption"]
    args = ["--steps", "30", "--base-steps", "5", "--n-train", N_TRAIN, "--n-test", N_TEST, "--n-base", "40",
            "--device", "cpu", "--cache-dir", tmp_path / "cache"]
    files = ",".join(str(exported / f"{n}.json") for n in names)
    for tasks, run_dir in ((",".join(names), "builtin"), (files, "files")):
        assert train.main(["--tasks", tasks, "--run-dir", str(tmp_path / run_dir), *map(str, args)]) == 0
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("builtin", "files")]
    assert any(a > 0 for row in results[0]["matrix"] for a in row), "all 0: train longer so this can fail"
    assert results[0]["matrix"] == results[1]["matrix"] and results[0]["base_row"] == results[1]["base_row"]
    assert results[0]["tasks"] == results[1]["tasks"] == names
    for name in ("task1-classify.pt", "task2-caption.pt"):
        a, b = (torch.load(tmp_path / d / name, weights_only=True)["model"] for d in ("builtin", "files"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert train.reevaluate(tmp_path / "files" / "task2-caption.pt") == results[1]["matrix"][1]
