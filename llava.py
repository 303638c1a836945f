"""Instruction rows in LLaVA's shape: the tokenizer, token rows and batches; task files in and out.

A row is an image and a conversation turn: [BOS] instruction [SEP] answer [EOS], stored compactly as uint8
pixels and int16 tokens (Examples) and turned into a training batch by to_batch. make_task draws the rows of
a built-in task (data.py). A task file is a JSON list (or JSONL) of LLaVA records: {"image": path,
"conversations": [{"from": "human", "value": "<image>\\nWhat shape is it?"}, {"from": "gpt", "value":
"circle"}, ...]}. read_tasks checks every record and names the file and record of anything wrong;
load_file_task turns a checked file into the same Examples, with decoded images cached in the run folder.
`python train.py --export DIR` writes the built-in benchmark in this format (train.py --tasks reads it back).
The format follows LLaVA 1.5's instruction data (Liu et al. 2023).
"""
import hashlib
import json
import random
import time
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from data import (ALL_TASKS, BENCHMARKS, COLORS, COLS, GLYPHS, ROWS, SHAPES, SIZES, atomic_write, render,
                  split_scenes, test_layouts)

SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[SEP]", "[EOS]"]  # PAD must be id 0: batches pad with zeros
PAD, BOS, SEP, EOS = 0, 2, 3, 4


def train_tokenizer(tasks, seed, extra_texts=()):
    """A word-level tokenizer trained on every instruction and answer the tasks can produce.

    Words keep a '▁' prefix (the Metaspace scheme), and glyphs and punctuation are split off one
    by one, so 'K7A' becomes '▁', 'K', '7', 'A' and decodes back to 'K7A' exactly.
    `extra_texts` (e.g. the questions and answers of a run's task files, llava.py) add the words the
    benchmark lacks with the next ids, so every benchmark word keeps its id whatever a run mixes in.
    """
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(), pre_tokenizers.Split(Regex(f"[{GLYPHS}]|[.,;:?!]"), "isolated")])
    tok.decoder = decoders.Metaspace()
    corpus = []
    for task in tasks:  # a few hundred scenes per task reach every word of every template
        rng = random.Random(f"tokenizer-{task.name}-{seed}")
        corpus += [" ".join(task.make(task.scene(rng), rng)) for _ in range(400)]
    words = SHAPES + tuple(COLORS) + SIZES + ROWS + COLS + tuple(s + "s" for s in SHAPES)
    corpus += list(GLYPHS) + [" ".join(words)]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIAL, show_progress=False))
    vocab = tok.get_vocab()
    for text in dict.fromkeys(extra_texts):
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    tok.model = models.WordLevel(vocab, unk_token="[UNK]")  # the same vocabulary serialises the same
    return tok


@dataclass
class Examples:
    """A task split stored compactly: uint8 pixels and int16 token rows.

    A token row is [BOS] instruction [SEP] answer [EOS] [PAD]...; the answer starts at `prompt_len`.
    """
    name: str
    images: torch.Tensor      # (N, 3, H, W) uint8
    tokens: torch.Tensor      # (N, L) int16
    prompt_len: torch.Tensor  # (N,) int16
    answers: list = field(default_factory=list)
    metric: str = "exact"

    def __len__(self):
        return len(self.answers)

    def subset(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Examples(self.name, self.images[idx], self.tokens[idx], self.prompt_len[idx],
                        [self.answers[i] for i in idx.tolist()], self.metric)

    @staticmethod
    def concat(parts, name="mix"):
        return Examples(name, torch.cat([p.images for p in parts]), torch.cat([p.tokens for p in parts]),
                        torch.cat([p.prompt_len for p in parts]), [a for p in parts for a in p.answers],
                        parts[0].metric if parts else "exact")


class ReservoirBuffer:
    """A fixed-capacity sample of every row offered so far, each kept with probability capacity/seen."""

    def __init__(self, capacity, seed):
        self.capacity, self.seen, self.rows = capacity, 0, None  # rows: an Examples, compact as task data
        self.gen = torch.Generator().manual_seed(seed)  # its own stream: replay never shifts the data order

    def add(self, ex):
        """Reservoir sampling (Vitter's algorithm R): row n is kept with probability capacity/n."""
        n_fill = max(min(self.capacity - len(self), len(ex)), 0)  # while not full, every row is kept
        head = ex.subset(range(n_fill))
        self.rows = head if self.rows is None else Examples.concat([self.rows, head], "buffer")
        self.seen += n_fill
        for i in range(n_fill, len(ex)):
            self.seen += 1
            slot = int(torch.randint(self.seen, (1,), generator=self.gen))  # uniform in [0, seen)
            if slot < self.capacity:  # overwrite a random slot
                for name in ("images", "tokens", "prompt_len", "answers"):
                    getattr(self.rows, name)[slot] = getattr(ex, name)[i]

    def __len__(self):
        return 0 if self.rows is None else len(self.rows)

    def sample(self, n, gen):
        return self.rows.subset(torch.randint(len(self), (n,), generator=gen))

    def nbytes(self):
        rows = self.rows  # the answers, strings, count nothing
        return 0 if rows is None else sum(t.numel() * t.element_size() for t in (rows.images, rows.tokens,
                                                                                    rows.prompt_len))

    def state_dict(self):  # the rows as a dict of their fields: tensors, a list and strings
        rows = None if self.rows is None else dict(vars(self.rows))
        return dict(capacity=self.capacity, seen=self.seen, gen=self.gen.get_state(), rows=rows)

    def load_state_dict(self, state):
        self.capacity, self.seen, rows = state["capacity"], state["seen"], state["rows"]
        self.gen.set_state(state["gen"])
        self.rows = None if rows is None else Examples(**{**rows, "answers": list(rows["answers"])})



def token_parts(tok, instruction, answer):
    """-> ([BOS] instruction [SEP], answer [EOS]) as token ids."""
    return [BOS] + tok.encode(instruction).ids + [SEP], tok.encode(answer).ids + [EOS]


def encode(tok, instruction, answer, max_len):
    """-> (token row as a list padded to max_len, prompt length). Raises if it does not fit."""
    prompt, reply = token_parts(tok, instruction, answer)
    row = prompt + reply
    if len(row) > max_len:
        raise ValueError(f"{len(row)} tokens do not fit max_text_len={max_len}: {instruction!r} -> "
                         f"{answer!r}")
    return row + [PAD] * (max_len - len(row)), len(prompt)


def make_split(task, split, n, seed, tok, image_size, max_len, exclude=frozenset()):
    """n examples of `task`, deterministic from (task, split, seed); layouts in `exclude` are skipped."""
    images, rows, plen, answers, keys = [], [], [], [], []
    for scene, instruction, answer in split_scenes(task, split, n, seed, exclude):
        row, p = encode(tok, instruction, answer, max_len)
        images.append(render(scene, image_size))
        rows.append(row), plen.append(p), answers.append(answer), keys.append(scene.key())
    ex = Examples(task.name, torch.from_numpy(np.stack(images)), torch.tensor(rows, dtype=torch.int16),
                  torch.tensor(plen, dtype=torch.int16), answers, task.metric)
    return ex, set(keys)


def make_task(task, n_train, n_test, seed, tok, image_size, max_len):
    """-> (train, test) Examples of a built-in task; no train layout equals any task's test layout."""
    test, _ = make_split(task, "test", n_test, seed, tok, image_size, max_len)
    held_out = test_layouts(n_test, seed)  # every task's test layouts, not only this task's
    train, _ = make_split(task, "train", n_train, seed, tok, image_size, max_len, exclude=held_out)
    return train, test


def to_batch(ex, idx, device):
    """Index rows of an Examples into a training batch on `device`.

    -> images (B, 3, H, W) float in [-1, 1], inputs (B, T) and targets (B, T) int64, where
    targets are the inputs shifted left with -100 on the prompt and the padding (no loss there).
    """
    idx = torch.as_tensor(idx, dtype=torch.long)
    tokens = ex.tokens[idx].long()
    T = int((tokens != PAD).sum(1).max())  # trim columns that are padding in every row
    tokens = tokens[:, :T]
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    pos = torch.arange(T - 1).unsqueeze(0)
    targets[pos < ex.prompt_len[idx].long().unsqueeze(1) - 1] = -100  # target t is token t+1
    targets[targets == PAD] = -100
    return pixels(ex.images[idx]).to(device), inputs.to(device), targets.to(device)


def pixels(images):
    """uint8 (B, 3, H, W) -> float in [-1, 1]: floats are made only at batch time."""
    return images.float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------------------------
# a frozen vision tower's outputs: each image encoded once for a whole stage

@torch.no_grad()
def encode_images(model, sources, device, chunk=256):
    """The frozen vision tower's output for every image of some Examples (or None) -> {image bytes: output}.
    Encoded in fixed chunks, in row order: with two threads a row's floats can depend on the rows encoded
    beside it, so the grouping must not depend on which batch first met an image, which a resume changes."""
    images = torch.cat([rows.images for rows in sources if rows is not None])
    first = {}  # image bytes -> its first row: each distinct image is encoded once
    for i, image in enumerate(images):
        first.setdefault(image.numpy().tobytes(), i)
    keys, order, seen = list(first), list(first.values()), {}
    for i in range(0, len(order), chunk):
        outputs = model.vision(pixels(images[order[i:i + chunk]]).to(device))
        seen.update(zip(keys[i:i + chunk], outputs))
    return seen


@torch.no_grad()
def vision_seen(model, images, seen, device):
    """uint8 images (B, 3, H, W) -> the frozen vision tower's output, looked up in `seen` by their bytes. An
    image that encode_images did not cover is encoded alone, a grouping that no resume changes, and kept."""
    keys = [image.numpy().tobytes() for image in images]
    for i, key in enumerate(keys):
        if key not in seen:
            seen[key] = model.vision(pixels(images[i:i + 1]).to(device))[0]
    return torch.stack([seen[key] for key in keys])


# ----------------------------------------------------------------------------------------------
# task files

TASK_FILE_SUFFIXES = (".json", ".jsonl")  # a JSON list of records, or one record a line
HELD_OUT = 0.1  # share of a file's records tested on when it has no sibling <stem>.test.json


class TaskFileError(ValueError):
    """Bad input in a task file: the message names the file and the record."""


# a checked record: where it is ("data/mytask.json record 3 (id 'q17')", for errors found later), its image
# path, and its (instruction, answer) pairs, one per human/gpt turn pair
Record = namedtuple("Record", "where image pairs")


@dataclass
class FileTask:
    """A task read from a LLaVA-format file and its .test sibling, checked; make_task loads its rows."""
    name: str     # the file's stem
    like: str     # the file, shown where a built-in task shows the dataset it stands in for
    metric: str   # the records' "metric": 'exact' (the default) or 'f1'
    files: list   # [(path, records, key)]; the key hashes all that makes the file's images
    truncate: bool
    cache: Path   # decoded images live here, in the run folder

    @property
    def texts(self):
        return [s for _, records, _ in self.files for r in records for pair in r.pairs for s in pair]


def read_tasks(entries, image_root="", truncate=False, cache="cache", benchmark="single"):
    """--tasks entries (built-in names, from data.BENCHMARKS[benchmark], and task files) -> {name: Task or
    FileTask}, every file checked."""
    tasks = {}
    for entry in entries:
        if entry.endswith(TASK_FILE_SUFFIXES):
            task = read_task_file(Path(entry), image_root, truncate, cache)
        else:
            task = BENCHMARKS[benchmark][entry]
        if tasks.setdefault(task.name, task) is not task:
            raise TaskFileError(f"{entry}: --tasks already has a task named {task.name!r}")
    return tasks


def read_task_file(path, image_root, truncate, cache):
    """A task file, and its sibling <stem>.test<suffix> if there is one -> FileTask."""
    files, metric = [], None
    for p in (path, path.with_name(f"{path.stem}.test{path.suffix}")):
        if p == path or p.is_file():
            records, key, metric = read_records(p, Path(image_root or p.parent), metric)
            files.append((p, records, key))
    return FileTask(path.stem, str(path), metric, files, truncate, Path(cache))


def read_records(path, root, metric):
    """A task file -> (records, key, metric); every record is checked, and must use `metric` if given."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as e:
        raise TaskFileError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise TaskFileError(f"{path}: not UTF-8 text (byte {e.start})") from None
    jsonl = path.suffix == ".jsonl"
    # (first line number, text) of each JSON value: each non-blank line of a JSONL file, else the whole file
    chunks = [(n, s) for n, s in enumerate(text.splitlines(), 1) if s.strip()] if jsonl else [(1, text)]
    values = []
    for first, chunk in chunks:
        try:
            values.append(json.loads(chunk))
        except json.JSONDecodeError as e:
            where = f"{path} record {len(values)}" if jsonl else str(path)
            line = first + e.lineno - 1  # counted in the file, not in the chunk
            raise TaskFileError(f"{where}: invalid JSON at line {line} column {e.colno}: {e.msg}") from None
        except RecursionError:  # Python's parser gives up past about a thousand levels of [ or {
            where = f"{path} record {len(values)}" if jsonl else str(path)
            raise TaskFileError(f"{where}: JSON nested too deeply to read (from line {first})") from None
    values = values if jsonl else values[0]
    if not isinstance(values, list) or not values:
        raise TaskFileError(f"{path}: expected a non-empty list of records")
    records, ids, key = [], {}, hashlib.sha256(raw + str(root.resolve()).encode())
    for i, rec in enumerate(values):
        rid = rec.get("id") if isinstance(rec, dict) else None
        where = f"{path} record {i}" + ("" if rid is None else f" (id {rid!r})")
        try:
            records.append(check_record(rec, root, key, where))
            metric, own = metric or rec.get("metric", "exact"), rec.get("metric", "exact")
            if own != metric:
                raise ValueError(f"metric {own!r} differs from the task's {metric!r}")
            if rid is not None and ids.setdefault(repr(rid), i) != i:
                raise ValueError(f"duplicate id: record {ids[repr(rid)]} has it too")
        except ValueError as e:
            raise TaskFileError(f"{where}: {e}") from None
    return records, key.hexdigest()[:12], metric


def check_record(rec, root, key, where):
    """A record -> Record, or ValueError saying what is wrong; the image's size and time go into `key`."""
    if not isinstance(rec, dict):
        raise ValueError(f"a record is a JSON object, not {type(rec).__name__}")
    if "image" not in rec or "conversations" not in rec:
        raise ValueError(f"no {'image' if 'image' not in rec else 'conversations'!r}")
    if rec.get("metric", "exact") not in ("exact", "f1"):
        raise ValueError(f"unknown metric {rec['metric']!r}; use 'exact' or 'f1'")
    image = root / str(rec["image"])
    try:
        st = image.stat()
    except OSError as e:
        raise ValueError(f"image {image}: {e.strerror}") from None
    key.update(f"{image}|{st.st_size}|{st.st_mtime_ns}\n".encode())  # a changed image invalidates the cache
    turns, pairs = rec["conversations"], []
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list of turns")
    for t, turn in enumerate(turns, 1):
        expected, who = "human" if t % 2 else "gpt", turn.get("from") if isinstance(turn, dict) else None
        if who not in ("human", "gpt") or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {t} is from {who!r}; "
                             "a turn has a 'from' ('human' or 'gpt') and a text 'value'")
        if who != expected:
            raise ValueError(f"turn {t} is from {who!r} but a {expected!r} turn was expected")
        if who == "human":
            question = turn["value"].replace("<image>", "").strip()  # the image is always the prefix here
        elif not turn["value"].strip():
            raise ValueError(f"turn {t} is an empty answer")
        else:
            pairs.append((question, turn["value"].strip()))
    if len(turns) % 2:
        raise ValueError(f"turn {len(turns)} is a question without an answer")
    return Record(where, image, pairs)


def load_file_task(task, seed, tok, image_size, max_len):
    """A FileTask -> (train, test) Examples, one row per pair; prints one line of what it read."""
    t0, records = time.time(), {path: recs for path, recs, _ in task.files}
    # (file, its records in the split)
    splits = [(path, list(range(len(recs)))) for path, recs in records.items()]
    if len(splits) == 1:  # no test file: hold out whole records, so that no image is in both splits
        path, n = splits[0][0], len(splits[0][1])
        if n < 2:
            raise TaskFileError(f"{path}: one record cannot be split into train and test; add a .test file")
        order = random.Random(f"{task.name}-held-out-{seed}").sample(range(n), n)
        n_test = max(1, round(HELD_OUT * n))
        splits = [(path, sorted(order[n_test:])), (path, sorted(order[:n_test]))]
    # the text is encoded before any image is decoded, so a bad pair is reported before the slow part
    rows = [encode_records(task, [records[path][i] for i in idx], tok, max_len) for path, idx in splits]
    images = {path: file_images(path, recs, key, image_size, task.cache) for path, recs, key in task.files}
    examples = []
    for (path, idx), (tokens, plen, answers, index, _) in zip(splits, rows):
        row_images = images[path][0][torch.tensor(idx)[index]]  # the image of each row's record
        examples.append(Examples(task.name, row_images, tokens, plen, answers, task.metric))
    train, test = examples
    cuts, n_records = sum(r[-1] for r in rows), sum(map(len, records.values()))
    hows = " and ".join(dict.fromkeys(how for _, how in images.values()))  # 'cached', 'decoded' or both
    print(f"{task.name}: {n_records} records, {len(train) + len(test)} pairs -> {len(train)} train + "
          f"{len(test)} test rows{'' if len(task.files) == 2 else ' (held out)'}"
          + (f", --truncate cut {cuts} rows to {max_len} tokens" if cuts else "")
          + f"; images {hows} in {time.time() - t0:.1f} s")
    return train, test


def file_images(path, records, key, image_size, cache):
    """-> (uint8 (N, 3, S, S) images of the records, 'cached' or 'decoded'); decoded ones are cached."""
    cached = cache / f"{path.stem}-{key}-{image_size}px.pt"
    if cached.is_file():
        return torch.load(cached, weights_only=True), "cached"
    images = torch.from_numpy(np.stack([read_image(r, image_size) for r in records]))
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, lambda p: torch.save(images, p))
    return images, "decoded"


def read_image(rec, size):
    """A record's image -> (3, size, size) uint8 RGB; resized only if needed, so PNG pixels stay exact."""
    try:
        with Image.open(rec.image) as img:
            img = img.convert("RGB")
            img = img if img.size == (size, size) else img.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(img).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    except UnidentifiedImageError:
        raise TaskFileError(f"{rec.where}: {rec.image} is not an image") from None
    except OSError as e:
        raise TaskFileError(f"{rec.where}: cannot read image {rec.image}: {e.strerror or e}") from None


def encode_records(task, records, tok, max_len):
    """-> (tokens (N, max_len) int16, prompt_len (N,) int16, answers, each row's record, rows cut)."""
    rows, plen, answers, index, cuts = [], [], [], [], 0
    for i, rec in enumerate(records):
        for k, (instruction, answer) in enumerate(rec.pairs, 1):
            prompt, reply = token_parts(tok, instruction, answer)
            n_tokens = len(prompt) + len(reply)
            if n_tokens > max_len and (not task.truncate or len(prompt) >= max_len):
                hint = ("; its question alone is too long to cut" if task.truncate
                        else "; --truncate cuts the answer to fit")
                raise TaskFileError(f"{rec.where}: pair {k} is {n_tokens} tokens, "
                                    f"more than max_text_len={max_len}{hint}")
            # --truncate: the answer loses its end and [EOS], and is scored on the rest
            if n_tokens > max_len:
                reply = reply[:max_len - len(prompt)]
                answer, cuts = tok.decode(reply), cuts + 1
            rows.append(prompt + reply + [PAD] * (max_len - len(prompt) - len(reply)))
            plen.append(len(prompt)), answers.append(answer), index.append(i)
    return torch.tensor(rows, dtype=torch.int16), torch.tensor(plen, dtype=torch.int16), answers, index, cuts


def export(out, n_train, n_test, seed, image_size, benchmark="single"):
    """Write the benchmark as task files: out/<task>.json (train), <task>.test.json, images/<task>/*.png."""
    out, tok = Path(out), train_tokenizer(ALL_TASKS, seed)
    for task in BENCHMARKS[benchmark].values():
        (out / "images" / task.name).mkdir(parents=True, exist_ok=True)
        for split, ex in zip(("train", "test"), make_task(task, n_train, n_test, seed, tok, image_size, 64)):
            records = []
            for i in range(len(ex)):
                image, p = f"images/{task.name}/{split}-{i}.png", int(ex.prompt_len[i])
                Image.fromarray(ex.images[i].permute(1, 2, 0).numpy()).save(out / image)
                # decoding gives back the text (tests/test_data.py)
                question = tok.decode(ex.tokens[i, 1:p - 1].tolist())
                conversations = [{"from": "human", "value": "<image>\n" + question},
                                 {"from": "gpt", "value": ex.answers[i]}]
                records.append({"id": f"{task.name}-{split}-{i}", "image": image, "metric": task.metric,
                                "conversations": conversations})
            name = f"{task.name}.json" if split == "train" else f"{task.name}.test.json"
            (out / name).write_text(records_json(records))


def records_json(records):
    """A JSON list of records, one a line: a JSON error's line number then points at its record."""
    return "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"


def file_texts(tasks):
    """Every question and answer of the task files among `tasks`: the words the tokenizer must add."""
    return [s for task in tasks if isinstance(task, FileTask) for s in task.texts]

