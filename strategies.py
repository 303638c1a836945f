"""Continual-learning strategies: one class each, all on the same few hooks.

train.py calls, for every task in order:
    before_task(model, task_id, train) -> steps of [batch(fresh, gen) -> loss + penalty(...)] -> after_task(...)
and answers test questions through generate(...), where an expansion strategy would route.
A strategy keeps its state in `state_dict()`, which checkpoints save. `build("replay+ewc", cfg)`
composes strategies: every part's hooks run. Methods follow He et al. (arXiv 2311.16206), sec. 4.
"""
from dataclasses import dataclass

import torch

from data import Examples
from model import arg


@dataclass
class StrategyConfig:
    """Options of the strategies; each strategy lists the ones it reads in `options`."""
    buffer_size: int = arg(200, "replay buffer capacity in rows (the paper replays ~1 %; we afford more)")
    replay_ratio: float = arg(0.25, "fraction of each batch drawn from the replay buffer")


class Strategy:
    """Sequential fine-tuning ('naive'): every hook does nothing, so old tasks are forgotten."""
    name = "naive"
    options = ()  # names of the StrategyConfig fields it reads; train.py refuses the others

    def __init__(self, cfg, seed=0):
        self.cfg, self.seed = cfg, seed  # StrategyConfig; the run's seed for any generator of its own

    def before_task(self, model, task_id, train):
        """Called before training on a task; may freeze or add parameters."""

    def batch(self, fresh, gen):
        """Fresh training rows (Examples) -> the rows to train on, e.g. with replayed ones mixed in."""
        return fresh

    def penalty(self, model, batch, logits):
        """An extra loss term (a scalar tensor), or None. batch = (images, inputs, targets)."""
        return None

    def after_task(self, model, task_id, train):
        """Called after training on a task; e.g. store samples or compute importances."""

    def generate(self, model, images, ids, max_new_tokens, eos_id):
        """Answer a batch of prompts. Expansion strategies route each example to an expert here."""
        return model.generate(images, ids, max_new_tokens, eos_id)

    def extra_bytes(self):
        """Memory this strategy keeps beyond the model (buffers, importances, experts)."""
        return 0

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class ReservoirBuffer:
    """A fixed-capacity sample of every row offered so far, each kept with probability capacity/seen.

    Rows stay compact (uint8 pixels, int16 tokens), as in the task data itself.
    """

    def __init__(self, capacity, seed):
        self.capacity, self.seen, self.rows = capacity, 0, None
        self.gen = torch.Generator().manual_seed(seed)  # its own stream: replay never shifts the data order

    def add(self, ex):
        """Reservoir sampling (Vitter's algorithm R): row n is kept with probability capacity/n."""
        n_fill = min(self.capacity - len(self), len(ex))  # while not full, every row is kept
        if n_fill > 0:
            head = ex.subset(range(n_fill))
            self.rows = head if self.rows is None else Examples.concat([self.rows, head], "buffer")
            self.seen += n_fill
        for i in range(max(n_fill, 0), len(ex)):
            self.seen += 1
            slot = int(torch.randint(self.seen, (1,), generator=self.gen))  # uniform in [0, seen)
            if slot < self.capacity:  # overwrite a random slot
                self.rows.images[slot] = ex.images[i]
                self.rows.tokens[slot] = ex.tokens[i]
                self.rows.prompt_len[slot] = ex.prompt_len[i]
                self.rows.answers[slot] = ex.answers[i]

    def __len__(self):
        return 0 if self.rows is None else len(self.rows)

    def sample(self, n, gen):
        return self.rows.subset(torch.randint(len(self), (n,), generator=gen))

    def nbytes(self):
        if self.rows is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.rows.images, self.rows.tokens, self.rows.prompt_len))

    def state_dict(self):
        rows = None if self.rows is None else dict(images=self.rows.images, tokens=self.rows.tokens,
                                                     prompt_len=self.rows.prompt_len, answers=self.rows.answers)
        return dict(capacity=self.capacity, seen=self.seen, gen=self.gen.get_state(), rows=rows)

    def load_state_dict(self, state):
        self.capacity, self.seen = state["capacity"], state["seen"]
        self.gen.set_state(state["gen"])
        r = state["rows"]
        self.rows = None if r is None else Examples("buffer", r["images"], r["tokens"], r["prompt_len"], list(r["answers"]))


class Replay(Strategy):
    """Experience replay: keep a reservoir sample of past tasks' rows and mix them into every batch.

    After each task, every training row of that task is offered once to a reservoir buffer of fixed
    capacity, so the buffer is a uniform sample of all tasks seen so far. While training a new task,
    a fraction `replay_ratio` of each batch is drawn from the buffer instead of the new task. Only
    fresh rows enter the buffer, never replayed ones, so old tasks are not over-represented.
    """
    name = "replay"
    options = ("buffer_size", "replay_ratio")

    def __init__(self, cfg, seed=0):
        super().__init__(cfg, seed)
        self.buffer = ReservoirBuffer(cfg.buffer_size, seed)

    def batch(self, fresh, gen):
        n_old = round(self.cfg.replay_ratio * len(fresh)) if len(self.buffer) else 0
        if n_old == 0:
            return fresh
        return Examples.concat([fresh.subset(range(len(fresh) - n_old)), self.buffer.sample(n_old, gen)])

    def after_task(self, model, task_id, train):
        self.buffer.add(train)

    def extra_bytes(self):
        return self.buffer.nbytes()

    def state_dict(self):
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state):
        self.buffer.load_state_dict(state["buffer"])


class Compose(Strategy):
    """Several strategies at once ('replay+ewc'): hooks run in order; each part keeps its own state."""

    def __init__(self, parts):
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.options = tuple(o for p in parts for o in p.options)
        routers = [p for p in parts if type(p).generate is not Strategy.generate]
        if len(routers) > 1:
            raise ValueError(f"{self.name}: only one part may route, but {', '.join(p.name for p in routers)} all do")
        self.router = routers[0] if routers else None

    def before_task(self, model, task_id, train):
        for p in self.parts:
            p.before_task(model, task_id, train)

    def batch(self, fresh, gen):
        for p in self.parts:
            fresh = p.batch(fresh, gen)
        return fresh

    def penalty(self, model, batch, logits):
        terms = [t for t in (p.penalty(model, batch, logits) for p in self.parts) if t is not None]
        return sum(terms) if terms else None

    def after_task(self, model, task_id, train):
        for p in self.parts:
            p.after_task(model, task_id, train)

    def generate(self, model, images, ids, max_new_tokens, eos_id):
        if self.router is not None:
            return self.router.generate(model, images, ids, max_new_tokens, eos_id)
        return model.generate(images, ids, max_new_tokens, eos_id)

    def extra_bytes(self):
        return sum(p.extra_bytes() for p in self.parts)

    def state_dict(self):
        return {p.name: p.state_dict() for p in self.parts}

    def load_state_dict(self, state):
        for p in self.parts:
            p.load_state_dict(state[p.name])


STRATEGIES = {cls.name: cls for cls in (Strategy, Replay)}


def build(spec, cfg, seed=0):
    """'replay' or 'replay+ewc' -> a Strategy. Raises ValueError naming the bad part."""
    names = spec.split("+")
    if any(not n for n in names):
        raise ValueError(f"malformed strategy {spec!r}: empty part around '+'")
    for n in names:
        if n not in STRATEGIES:
            raise ValueError(f"unknown strategy {n!r}; choose from {', '.join(STRATEGIES)} (combine with '+')")
    if len(set(names)) < len(names):
        raise ValueError(f"strategy {spec!r} names a part twice")
    parts = [STRATEGIES[n](cfg, seed) for n in names]
    return parts[0] if len(parts) == 1 else Compose(parts)
