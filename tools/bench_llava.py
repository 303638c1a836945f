"""Time loading a LLaVA-format task file of 10,000 records: cold (decoding every image) and warm (cache).

    OMP_NUM_THREADS=1 python tools/bench_llava.py

It writes 10,000 records with 64 px PNG scenes into a temporary folder (not timed), each record a
two-turn conversation (attribute, then ground, about one scene: 20,000 pairs), then loads the file
twice into one run folder as train.py does: read and check every record, train the tokenizer, encode
and resize to the tiny preset's 48 px. The first load decodes the images and caches them in the run
folder; the second reads the cache. The freshly written files are in the OS page cache, so "cold"
here means cold for nanoCIT, not for the disk.
"""
import random
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import llava  # noqa: E402

N_RECORDS, SOURCE_SIZE, IMAGE_SIZE, MAX_LEN = 10_000, 64, 48, 40


def write_task_file(folder):
    """N_RECORDS records about random scenes, their images as PNG -> the task file's path."""
    rng, records = random.Random("bench-llava"), []
    attribute, ground = data.TASKS["attribute"], data.TASKS["ground"]  # both ask of uniquely coloured objects
    (folder / "images").mkdir()
    for i in range(N_RECORDS):
        scene = attribute.scene(rng)
        turns = []
        for task in (attribute, ground):
            question, answer = task.make(scene, rng)
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
        image = Image.fromarray(data.render(scene, SOURCE_SIZE).transpose(1, 2, 0))
        image.save(folder / "images" / f"{i}.png")
        records.append({"id": i, "image": f"images/{i}.png", "conversations": turns})
    path = folder / "bench.json"
    path.write_text(llava.records_json(records))
    return path


def load(path, run_dir):
    """What train.py does for one task file -> (seconds to read and check, to train the tokenizer, to load
    rows)."""
    t0 = time.perf_counter()
    tasks = llava.read_tasks([str(path)], cache=run_dir / "cache")
    t1 = time.perf_counter()
    tok = llava.train_tokenizer(data.ALL_TASKS, 0, llava.file_texts(tasks.values()))
    t2 = time.perf_counter()
    train, test = llava.load_file_task(tasks["bench"], 0, tok, IMAGE_SIZE, MAX_LEN)
    assert len(train) + len(test) == 2 * N_RECORDS
    return t1 - t0, t2 - t1, time.perf_counter() - t2


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = write_task_file(Path(tmp))
        print(f"wrote {N_RECORDS:,} records and {SOURCE_SIZE} px PNGs in {time.perf_counter() - t0:.1f} s "
              "(not timed below)")
        cold, warm = load(path, Path(tmp) / "run"), load(path, Path(tmp) / "run")
    print(f"\n{'seconds':<28}{'cold':>8}{'warm':>8}")
    parts = ("read and check records", "tokenizer (+ file words)", "images and rows")
    for name, c, w in zip(parts, cold, warm):
        print(f"{name:<28}{c:>8.2f}{w:>8.2f}")
    print(f"{'total':<28}{sum(cold):>8.2f}{sum(warm):>8.2f}")
