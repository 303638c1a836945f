"""Continual-learning strategies: reservoir sampling is uniform, replay mixes only stored fresh rows,
and build() composes, or refuses, strategy names.

Run: python -m pytest tests/test_strategies.py -q
"""
import math
from types import SimpleNamespace

import pytest
import torch

import strategies
from data import Examples
from strategies import Compose, Replay, ReservoirBuffer, Strategy


def rows(first, n):
    """n rows whose first token is their id (first, first+1, ...): every row can be traced."""
    ids = torch.arange(first, first + n)
    return Examples("t", images=(ids % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone(),
                    tokens=torch.stack([ids, ids % 7], 1).to(torch.int16),
                    prompt_len=(ids % 5).to(torch.int16), answers=[f"a{i}" for i in ids.tolist()])


def row_ids(ex):
    return ex.tokens[:, 0].tolist()


def consistent(ex):
    """Every field of every row still belongs to the same original row."""
    ids = ex.tokens[:, 0].long()
    return (torch.equal(ex.images[:, 0, 0, 0], (ids % 256).to(torch.uint8)) and torch.equal(ex.tokens[:, 1].long(), ids % 7)
            and torch.equal(ex.prompt_len.long(), ids % 5) and ex.answers == [f"a{i}" for i in ids.tolist()])


def config(**kw):
    return SimpleNamespace(**{**dict(buffer_size=10, replay_ratio=0.25), **kw})


# ----------------------------------------------------------------------------------------------
# reservoir sampling

def test_reservoir_keeps_each_row_with_probability_k_over_n():
    n, k, trials = 200, 20, 300
    chunks = [5, 30, 15, 150]  # several add() calls; the second fills the buffer part way (15 of its 30 rows)
    kept = torch.zeros(n)
    for seed in range(trials):
        buffer, first = ReservoirBuffer(k, seed), 0
        for size in chunks:
            buffer.add(rows(first, size))
            first += size
            assert len(buffer) == min(k, first) and buffer.seen == first
        ids = row_ids(buffer.rows)
        assert len(set(ids)) == k and consistent(buffer.rows)
        kept[ids] += 1
    freq, p = kept / trials, k / n
    std = math.sqrt(p * (1 - p) / trials)  # binomial std of one row's inclusion frequency
    assert (freq - p).abs().max() < 4.5 * std, (freq - p).abs().max()
    # early and late rows are equally likely: means over 50 rows each, std of the difference ~ std * sqrt(2/50)
    early, late = freq[:50].mean(), freq[-50:].mean()
    assert abs(early - late) < 4 * std * math.sqrt(2 / 50), (early, late)
    # the rows sampled inside the call that filled the buffer (20..34) are kept k/n too, not more: a count
    # that left out that call's first 15 rows would keep each with probability about n/200 (~0.14)
    straddling = freq[20:35].mean()
    assert abs(straddling - p) < 4 * std / math.sqrt(15), straddling


def test_reservoir_exact_probabilities_on_a_small_case():
    """Capacity 1, three rows offered one by one: each ends up kept 1/3 of the time (k/(n+1) would give 1/4)."""
    trials = 3000
    kept = torch.zeros(3)
    for seed in range(trials):
        buffer = ReservoirBuffer(1, seed)
        for i in range(3):
            buffer.add(rows(i, 1))
        kept[row_ids(buffer.rows)] += 1
    std = math.sqrt((1 / 3) * (2 / 3) / trials)
    assert ((kept / trials - 1 / 3).abs() < 4 * std).all(), kept / trials


def test_buffer_never_exceeds_capacity():
    buffer = ReservoirBuffer(5, seed=0)
    for first, size in [(0, 2), (2, 2), (4, 9), (13, 1), (14, 40)]:
        buffer.add(rows(first, size))
        assert len(buffer) == min(5, first + size) and buffer.rows.tokens.shape[0] == len(buffer)
        assert consistent(buffer.rows)


def test_buffer_state_dict_round_trips():
    buffer = ReservoirBuffer(8, seed=3)
    buffer.add(rows(0, 30))
    fresh = ReservoirBuffer(1, seed=99)
    fresh.load_state_dict(buffer.state_dict())
    assert (fresh.capacity, fresh.seen) == (buffer.capacity, buffer.seen)
    for name in ("images", "tokens", "prompt_len", "answers"):
        a, b = getattr(fresh.rows, name), getattr(buffer.rows, name)
        assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), name
    assert torch.equal(fresh.gen.get_state(), buffer.gen.get_state())
    buffer.add(rows(30, 30))  # the same future: both replace the same slots
    fresh.add(rows(30, 30))
    assert row_ids(fresh.rows) == row_ids(buffer.rows)
    empty = ReservoirBuffer(4, seed=0)
    empty.load_state_dict(ReservoirBuffer(4, seed=1).state_dict())
    assert len(empty) == 0


# ----------------------------------------------------------------------------------------------
# replay

def test_replay_mixes_buffer_rows_only_after_a_task():
    B = 16
    replay = Replay(config(buffer_size=10, replay_ratio=0.25))
    gen = torch.Generator().manual_seed(0)
    fresh = rows(1000, B)
    assert row_ids(replay.batch(fresh, gen)) == row_ids(fresh)  # nothing stored yet: all fresh
    task0 = rows(0, 50)
    replay.after_task(None, 0, task0)
    assert replay.buffer.seen == 50 and len(replay.buffer) == 10
    stored = set(row_ids(replay.buffer.rows))
    for _ in range(20):
        mixed = replay.batch(rows(1000, B), gen)
        ids = row_ids(mixed)
        n_old = round(0.25 * B)
        assert len(mixed) == B and consistent(mixed)
        assert sum(i >= 1000 for i in ids) == B - n_old
        assert set(i for i in ids if i < 1000) <= stored
        assert replay.buffer.seen == 50 and set(row_ids(replay.buffer.rows)) == stored  # batch() never adds
    replay.after_task(None, 1, rows(2000, 50))
    assert replay.buffer.seen == 100 and all(i < 1000 or i >= 2000 for i in row_ids(replay.buffer.rows))


@pytest.mark.parametrize("ratio,B", [(0.5, 10), (0.1, 7), (0.0, 8)])
def test_replay_ratio_sets_the_number_of_old_rows(ratio, B):
    replay = Replay(config(buffer_size=20, replay_ratio=ratio))
    replay.after_task(None, 0, rows(0, 30))
    mixed = replay.batch(rows(1000, B), torch.Generator().manual_seed(1))
    assert len(mixed) == B
    assert sum(i < 1000 for i in row_ids(mixed)) == round(ratio * B)


def test_replay_state_dict_round_trips():
    replay = Replay(config(buffer_size=6), seed=1)
    replay.after_task(None, 0, rows(0, 20))
    other = Replay(config(buffer_size=6), seed=5)
    other.load_state_dict(replay.state_dict())
    assert row_ids(other.buffer.rows) == row_ids(replay.buffer.rows) and other.extra_bytes() == replay.extra_bytes() > 0


# ----------------------------------------------------------------------------------------------
# build and compose

def test_build_single_and_composed():
    cfg = config()
    naive = strategies.build("naive", cfg)
    assert type(naive) is Strategy and naive.name == "naive"
    assert type(strategies.build("replay", cfg)) is Replay
    both = strategies.build("naive+replay", cfg)
    assert isinstance(both, Compose) and both.name == "naive+replay"
    assert [type(p) for p in both.parts] == [Strategy, Replay] and both.options == Replay.options


@pytest.mark.parametrize("spec,message", [
    ("agem", r"unknown strategy 'agem'; choose from naive, replay, joint"),
    ("replay+foo", r"unknown strategy 'foo'"),
    ("replay+", r"empty part"),
    ("+replay", r"empty part"),
    ("", r"empty part"),
    ("replay+replay", r"names a part twice"),
])
def test_build_rejects_bad_names(spec, message):
    with pytest.raises(ValueError, match=message):
        strategies.build(spec, config())


class Recorder(Strategy):
    """Logs every hook call into cfg.log; penalty returns its weight; batch appends a tagged row."""
    weight = 1.0

    def before_task(self, model, task_id, train):
        self.cfg.log.append((self.name, "before", task_id))

    def batch(self, fresh, gen):
        self.cfg.log.append((self.name, "batch", len(fresh)))
        return Examples.concat([fresh, rows(self.tag, 1)])

    def penalty(self, model, batch, logits):
        self.cfg.log.append((self.name, "penalty"))
        return torch.tensor(self.weight)

    def after_task(self, model, task_id, train):
        self.cfg.log.append((self.name, "after", task_id))

    def extra_bytes(self):
        return self.tag

    def state_dict(self):
        return {"tag": self.tag}

    def load_state_dict(self, state):
        self.cfg.log.append((self.name, "load", state["tag"]))


class First(Recorder):
    name, tag, weight = "first", 100, 1.5


class Second(Recorder):
    name, tag, weight = "second", 200, 2.0


class Router(Strategy):
    name = "router"

    def generate(self, model, images, ids, max_new_tokens, eos_id):
        return "routed"


class OtherRouter(Router):
    name = "other-router"


@pytest.fixture
def registry(monkeypatch):
    for cls in (First, Second, Router, OtherRouter):
        monkeypatch.setitem(strategies.STRATEGIES, cls.name, cls)


def test_compose_runs_every_part_in_order(registry):
    cfg = config(log=[])
    both = strategies.build("first+second", cfg)
    both.before_task(None, 0, None)
    out = both.batch(rows(0, 3), None)
    assert row_ids(out) == [0, 1, 2, 100, 200]  # second saw first's output
    assert float(both.penalty(None, None, None)) == 3.5
    both.after_task(None, 0, None)
    assert both.extra_bytes() == 300
    state = both.state_dict()
    assert state == {"first": {"tag": 100}, "second": {"tag": 200}}
    both.load_state_dict(state)
    assert cfg.log == [("first", "before", 0), ("second", "before", 0), ("first", "batch", 3), ("second", "batch", 4),
                       ("first", "penalty"), ("second", "penalty"), ("first", "after", 0), ("second", "after", 0),
                       ("first", "load", 100), ("second", "load", 200)]


def test_compose_routes_through_its_one_router(registry):
    assert strategies.build("first+router", config(log=[])).generate(None, None, None, 1, 0) == "routed"
    with pytest.raises(ValueError, match="only one part may route"):
        strategies.build("router+other-router", config())


def test_compose_penalty_is_none_when_no_part_has_one():
    assert strategies.build("naive+replay", config()).penalty(None, None, None) is None


def test_compose_passes_a_new_hook_to_every_part_in_order(monkeypatch):
    """A hook that Strategy gains (A-GEM's after-backward one, say) reaches each part of a composition, in
    order, with no edit of Compose; a name that is no hook is still an AttributeError."""
    monkeypatch.setattr(Strategy, "after_backward", lambda self, model: None, raising=False)
    calls = []

    class Part(Strategy):
        def after_backward(self, model):
            calls.append((self.name, model))
    first, second = Part(None), Part(None)
    first.name, second.name = "first", "second"
    both = Compose([first, second])
    both.after_backward("the model")
    assert calls == [("first", "the model"), ("second", "the model")]
    with pytest.raises(AttributeError):
        both.no_such_hook
