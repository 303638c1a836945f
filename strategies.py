"""Continual-learning strategies: one class each, all on the same few hooks.

train.py calls, for every task in order:
    before_task(model, task_id, train) -> steps of [batch(fresh, gen) -> loss + penalty] -> after_task(...)
and answers test questions through generate(...), where an expansion strategy would route. State lives in
`state_dict()`, which checkpoints save; `build("replay+ewc", cfg)` composes strategies. After He et al. (arXiv
2311.16206), sec. 4: replay, joint (the upper bound), EWC, MAS, LwF, LoRA, expansion (EProj), TIR; where this
project departs: docs/methods.md. eval.py measures (importance, features); llava.py has the replay buffer."""
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

import llava
from eval import examples_features, importance, instruction_features, task_similarity, token_features
from model import LORA_SITES, add_lora, arg


@dataclass
class StrategyConfig:
    """Options of the strategies; each strategy lists the ones it reads in `options`."""
    buffer_size: int = arg(200, "replay buffer capacity in rows (the paper replays ~1 %; we afford more)")
    replay_ratio: float = arg(0.25, "fraction of each batch drawn from the replay buffer")
    ewc_lambda: float = arg(100.0, "EWC, TIR: penalty weight λ, by study.py --sweep; larger stops learning")
    mas_lambda: float = arg(1e-3, "MAS: penalty weight λ, by study.py --sweep; larger stops learning")
    importance_decay: float = arg(1.0, "online EWC/MAS: γ in F ← γF + F_new; 1 keeps every task in full")
    importance_samples: int = arg(256, "rows whose per-sample gradients estimate the importances")
    ewc_fisher: str = arg("model", "EWC/TIR: Fisher of the model's own answers, sampled (Kirkpatrick et "
                          "al.), or empirical (the true answers': it vanishes once a task is fitted)")
    tir_importance: str = arg("ewc", "TIR: importance measure, ewc (Fisher) or mas")
    tir_temperature: float = arg(0.5, "TIR: τ of similarity exp(-Σ(1-cos)/τ): a smaller τ tells tasks "
                                 "apart more sharply")
    lwf_alpha: float = arg(0.3, "LwF: weight of distillation beside the task loss, by study.py --sweep")
    lwf_temperature: float = arg(2.0, "LwF: softens both distributions so small logits still teach")
    lora_rank: int = arg(8, "LoRA: rank r of each adapter: a few % of the tiny model per adapter set")
    lora_alpha: float = arg(16.0, "LoRA: scaling α/r = 2 lets the zero-initialised B grow quickly")
    lora_targets: str = arg("attn.qkv,attn.proj,mlp.0,mlp.2", "LoRA layers: " + ", ".join(LORA_SITES))


class Strategy:
    """Sequential fine-tuning ('naive'): every hook does nothing, so old tasks are forgotten."""
    name = "naive"
    options = ()  # names of the StrategyConfig fields it reads; train.py refuses the others
    state = {}  # attribute -> its value before the first task: what checkpoints keep
    naive_first = True  # trains its first task exactly as naive does: no old rows, no penalty, no new weights

    def __init__(self, cfg, seed=0):
        self.cfg, self.seed = cfg, seed  # StrategyConfig; the run's seed for any generator of its own
        Strategy.load_state_dict(self, copy.deepcopy(self.state))  # each instance its own fresh {} and []

    def before_task(self, model, task_id, train):
        """Called before training on a task; may freeze or add parameters."""

    def restore(self, model):
        """After a resume loaded the state: add to the model what before_task added, so saved weights fit."""

    def batch(self, fresh, gen):
        """Fresh training rows (Examples) -> the rows to train on, e.g. with replayed ones mixed in."""
        return fresh

    def penalty(self, model, batch, logits):
        """An extra loss term (a scalar tensor), or None. batch = (images, inputs, targets)."""
        return None

    def after_task(self, model, task_id, train):
        """Called after training on a task; e.g. store samples or compute importances."""

    def stored_rows(self):
        """The stored rows (Examples) that `batch` may mix in, or None: train.py encodes their images once."""
        return None

    def generate(self, model, images, ids, max_new_tokens, eos_id):
        """Answer a batch of prompts. Expansion strategies route each example to an expert here."""
        return model.generate(images, ids, max_new_tokens, eos_id)

    def extra_bytes(self):
        """Memory this strategy keeps beyond the model (buffers, importances, experts)."""
        return nbytes([getattr(self, k) for k in self.state])

    def extra_results(self, model, tests):
        """Numbers for results.json beyond the accuracy matrix, given every task's test rows."""
        return {}

    def oracle(self, task_id):
        """A strategy told that every question is of task `task_id` (expansion: routing's bound), or None."""
        return None

    def state_dict(self):
        """Tensors, lists, numbers and strings only: checkpoints load with weights_only=True."""
        return {k: getattr(self, k) for k in self.state}

    def load_state_dict(self, state):
        for k in self.state:
            setattr(self, k, state[k])


def nbytes(obj):
    """Bytes held by the tensors in a nest of dicts, lists and tuples."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    parts = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(map(nbytes, parts))


def copy_params(named):
    """(name, tensor) pairs -> {name: a detached copy}: anchors, teachers, snapshots, experts."""
    return {n: p.detach().clone() for n, p in named}


class Replay(Strategy):
    """Experience replay. After each task, its training rows are offered once to a reservoir buffer of fixed
    capacity (llava.ReservoirBuffer), a uniform sample of all tasks seen so far; a fraction `replay_ratio` of
    each later batch comes from it. Only fresh rows enter it, so old tasks are not over-represented."""
    name, options = "replay", ("buffer_size", "replay_ratio")

    def __init__(self, cfg, seed=0, capacity=None):
        super().__init__(cfg, seed)
        self.buffer = llava.ReservoirBuffer(capacity or cfg.buffer_size, seed)

    def batch(self, fresh, gen):
        n_old = round(self.cfg.replay_ratio * len(fresh)) if len(self.buffer) else 0
        if n_old == 0:
            return fresh
        kept = fresh.subset(range(len(fresh) - n_old))
        return llava.Examples.concat([kept, self.buffer.sample(n_old, gen)])

    def after_task(self, model, task_id, train):
        self.buffer.add(train)

    def stored_rows(self):
        return self.buffer.rows

    def extra_bytes(self):
        return self.buffer.nbytes()

    def state_dict(self):
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state):
        self.buffer.load_state_dict(state["buffer"])


class Joint(Replay):
    """Multitask training on all tasks seen so far: the upper bound, not a continual method. Each task's rows
    join a pool (a buffer never full) before it trains, and every batch comes from the pool: all the data."""
    name, options = "joint", ()
    naive_first = False  # its batches come from the pool, drawn otherwise than naive's

    def __init__(self, cfg, seed=0):
        super().__init__(cfg, seed, capacity=2 ** 62)  # a buffer never full keeps every row

    def before_task(self, model, task_id, train):  # the rows go in before the task, not after it
        self.buffer.add(train)

    after_task = Strategy.after_task  # nothing: Replay's would add the rows a second time

    def batch(self, fresh, gen):
        return self.buffer.sample(len(fresh), gen)


class EWC(Strategy):
    """Online Elastic Weight Consolidation (Kirkpatrick et al. 2017; Schwarz et al. 2018). After each task the
    diagonal Fisher F = E[g²] (eval.importance: g per row, of the log-likelihood of the model's own sampled
    answers) says how sharply that task's loss rises when a parameter moves. One running F ← γF + F_new and
    one anchor θ* (the parameters after the last task) serve every task; new tasks train with
    λ·Σ F·(θ − θ*)², which keeps important parameters where old tasks need them."""
    name, options = "ewc", ("ewc_lambda", "importance_decay", "importance_samples", "ewc_fisher")
    state = {"importance": {}, "anchor": {}}  # name -> tensor, for the parameters that were trainable
    measure, strength = "ewc", "ewc_lambda"  # how importance is measured; the option that is λ

    def __init__(self, cfg, seed=0):
        super().__init__(cfg, seed)
        if cfg.ewc_fisher not in ("model", "empirical"):
            raise ValueError(f"--ewc-fisher must be model or empirical, got {cfg.ewc_fisher!r}")

    def weights(self):  # each parameter's weight in the penalty; TIR rescales them
        return self.importance

    def after_task(self, model, task_id, train):
        gen = torch.Generator().manual_seed(self.seed * 1000 + task_id)  # which rows estimate it
        new = importance(model, train, self.measure, self.cfg.importance_samples, gen,
                         fisher=self.cfg.ewc_fisher)
        self.merge(new, task_id)
        self.anchor = copy_params((n, p) for n, p in model.named_parameters() if n in self.anchor or n in new)

    def merge(self, new, task_id):  # a parameter frozen in this task keeps its old importance, decayed
        old = {n: self.cfg.importance_decay * f for n, f in self.importance.items()}
        self.importance = {**old, **{n: old.get(n, 0) + f for n, f in new.items()}}

    def penalty(self, model, batch, logits):
        if not self.anchor:
            return None
        params = dict(model.named_parameters())
        weighted = sum((w * (params[n] - self.anchor[n]) ** 2).sum() for n, w in self.weights().items())
        return getattr(self.cfg, self.strength) * weighted


class MAS(EWC):
    """Memory Aware Synapses (Aljundi et al. 2018): EWC's penalty, with |∂‖logits‖²/∂θ| (mean over
    rows, at the answers) as a label-free importance: a parameter matters if moving it moves the output."""
    name, options = "mas", ("mas_lambda", "importance_decay", "importance_samples")
    measure, strength = "mas", "mas_lambda"


def tir_weights(per_task, similarity, task_id):
    """EWC's summed importance, each earlier task's part counted 1 - similarity(new task, it) times."""
    keep, weights = (1 - similarity[task_id]).tolist(), {}
    for k, task_importance in enumerate(per_task):
        for n, f in task_importance.items():
            weights[n] = weights.get(n, 0) + keep[k] * f
    return weights


class TIR(EWC):
    """Task-similarity-informed regularisation (He et al. 2023, sec. 4.3) on EWC's footing (λ too; MAS's with
    --tir-importance mas), each earlier task's importance counted 1 − similarity(new task, it) times: an old
    task like the new one needs less protection, as learning the new one serves it too. With every
    similarity 0 it is EWC (γ = 1). He et al.'s are the idea and the weighting; this project's: the
    similarity (eval.task_similarity, on the frozen base), each task's importance kept apart (T copies)."""
    name, options = "tir", ("ewc_lambda", "mas_lambda", "tir_importance", "importance_samples",
                            "tir_temperature", "ewc_fisher")
    state = {"anchor": {}, "per_task": [], "base": None, "prototypes": [], "scaled": {}, "used": []}

    def __init__(self, cfg, seed=0):
        super().__init__(cfg, seed)
        if cfg.tir_importance not in ("ewc", "mas"):
            raise ValueError(f"--tir-importance must be ewc or mas, got {cfg.tir_importance!r}")
        self.measure, self.strength = cfg.tir_importance, f"{cfg.tir_importance}_lambda"

    def weights(self):  # tir_weights of per_task (each task's importances), made before each task
        return self.scaled

    def before_task(self, model, task_id, train):
        if self.base is None:  # before the first task: a copy of the base, which task features come from
            frozen = [(n, p) for n, p in model.named_parameters() if n.startswith(("vision", "tok_emb"))]
            self.base = copy_params(frozen)
        self.prototypes.append([f.mean(0) for f in examples_features(model, self.base, train)])
        similarity = task_similarity(self.prototypes, self.cfg.tir_temperature)
        self.used.append(similarity[task_id].tolist())
        self.scaled = tir_weights(self.per_task, similarity, task_id)

    def merge(self, new, task_id):
        self.per_task.append(new)

    def extra_results(self, model, tests):
        return {"task_similarity": task_similarity(self.prototypes, self.cfg.tir_temperature).tolist(),
                "task_similarity_used": self.used}


KEYS = 64  # training rows per task whose instructions are kept: LwF's old questions, Expansion's keys


class LwF(Strategy):
    """Learning without Forgetting (Li & Hoiem 2016) with one head: old tasks' questions play the old heads.
    Each task leaves KEYS instructions; before a later task the parameters are copied as a frozen teacher, and
    each batch gains a row per image asking it an old question (no answer: no task loss), where the model is
    pulled towards the teacher's first answer token, which decides an answer's form: α·T²·KL(softmax(
    teacher/T) ‖ softmax(model/T)). On the new questions it would fight their labels (the teacher gives them
    p ≈ 0) and leave the old questions free."""
    name, options = "lwf", ("lwf_alpha", "lwf_temperature")
    state = {"teacher": None, "questions": []}  # questions: per task (tokens, answer blanked; prompt lengths)

    def before_task(self, model, task_id, train):
        self.teacher = copy_params(model.named_parameters()) if task_id > 0 else None

    def after_task(self, model, task_id, train):
        rows = train.subset(range(min(KEYS, len(train))))  # rows are drawn at random: the first will do
        prompt = torch.arange(rows.tokens.size(1)) < rows.prompt_len[:, None].long()
        self.questions.append((rows.tokens * prompt, rows.prompt_len))

    def batch(self, fresh, gen):
        if self.teacher is None:
            return fresh
        tokens, lengths = (torch.cat(parts) for parts in zip(*self.questions))
        pick = torch.randint(len(tokens), (len(fresh),), generator=gen)  # an old question for each image
        asked = llava.Examples("asked", fresh.images, tokens[pick], lengths[pick], [""] * len(fresh))
        return llava.Examples.concat([fresh, asked])

    def penalty(self, model, batch, logits):
        asked = (batch[2] == -100).all(1)  # the rows batch() added: no answer to learn
        if self.teacher is None or not asked.any():
            return None
        at = (torch.arange(int(asked.sum())), (batch[1][asked] == llava.SEP).int().argmax(1))  # at each [SEP]
        with torch.no_grad():
            teacher = functional_call(model, self.teacher, (batch[0][asked], batch[1][asked]))[0][at]
        T = self.cfg.lwf_temperature
        old, new = (F.log_softmax(x / T, dim=-1) for x in (teacher, logits[asked][at]))  # (rows, V)
        return self.cfg.lwf_alpha * T * T * F.kl_div(new, old, log_target=True, reduction="batchmean")


class LoRA(Strategy):
    """One low-rank adapter set (LoRALinear, model.py) on the chosen layers, tuned through every task while
    the whole base stays frozen: far fewer parameters move than in full tuning, but the same ones for every
    task, so LoRA alone still forgets. The adapters live in the model, and so in its checkpoints."""
    naive_first = False  # adapters from the first task on
    name, options = "lora", ("lora_rank", "lora_alpha", "lora_targets")

    def __init__(self, cfg, seed=0):
        super().__init__(cfg, seed)
        self.targets, self.adapters = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()], []
        if not self.targets or set(self.targets) - set(LORA_SITES):
            raise ValueError(f"--lora-targets {cfg.lora_targets!r}: choose from {', '.join(LORA_SITES)}")

    def restore(self, model):  # adapters exist from the first task on, and every checkpoint is later
        self.adapters = add_lora(model, self.targets, self.cfg.lora_rank, self.cfg.lora_alpha, self.seed)

    def before_task(self, model, task_id, train):
        self.restore(model)
        for p in model.parameters():  # runs after train.py's --freeze-vision switch, so this wins
            p.requires_grad_(any(p is a for a in self.adapters))

    def extra_bytes(self):
        return nbytes(self.adapters)


class Expansion(LoRA):
    """Model expansion with task-ID routing, after EProj (He et al. 2023, sec. 4.2). Each task gets an expert
    (LoRA adapters and a projector copy) trained from one common start while all else stays frozen, and leaves
    keys: the instruction features (eval.token_features) of KEYS training rows. Untold its task, a test row
    goes to the expert of the key nearest its instruction (cosine): nearest neighbour, since tasks' mean keys
    are nearly alike, but no two tasks share an instruction template."""
    name = "expansion"
    state = {"start": None, "experts": [], "keys": []}  # keys: per task, (KEYS, dim) instruction features

    extra_bytes = Strategy.extra_bytes  # what the state holds: every expert, the start, the keys (not LoRA's)

    def live(self, model):  # the parameters that make up the expert in place
        return {n: p for n, p in model.named_parameters() if ".lora_" in n or n.startswith("projector.")}

    def load(self, model, expert):  # copies in place, so only the expert's own tensors change
        model.load_state_dict(expert, strict=False)

    def before_task(self, model, task_id, train):
        super().before_task(model, task_id, train)  # adds the adapters (first task), freezes all else
        if self.start is None:  # the first task: remember where every expert starts
            self.start = copy_params(self.live(model).items())
        self.load(model, self.start)
        model.projector.requires_grad_(True)

    def after_task(self, model, task_id, train):
        self.experts.append(copy_params(self.live(model).items()))
        self.keys.append(instruction_features(model, train.subset(range(min(KEYS, len(train))))))

    def route(self, instruction):
        """Each row's instruction features (B, dim) -> the expert of the nearest key (cosine)."""
        owner = torch.cat([torch.full((len(k),), t) for t, k in enumerate(self.keys)]).to(instruction.device)
        keys = F.normalize(torch.cat(self.keys), dim=-1)
        return owner[(F.normalize(instruction, dim=-1) @ keys.T).argmax(1)]

    def generate(self, model, images, ids, max_new_tokens, eos_id):
        if not self.experts:  # before the first task there is only the base model
            return model.generate(images, ids, max_new_tokens, eos_id)
        prompt_len = torch.full((len(ids),), ids.size(1), device=ids.device)
        chosen = self.route(token_features(dict(model.named_parameters()), ids, prompt_len)[0])  # (B,)
        in_place = copy_params(self.live(model).items())
        out = ids.new_full((len(ids), max_new_tokens), eos_id)
        for k in chosen.unique().tolist():  # one batch per expert; rows that stop early stay EOS-padded
            rows = chosen == k
            self.load(model, self.experts[k])
            answer = model.generate(images[rows], ids[rows], max_new_tokens, eos_id)
            out[rows, :answer.size(1)] = answer
        self.load(model, in_place)
        return out

    def extra_results(self, model, tests):
        """How often (%) a test row of task j goes to expert j: the task-identification accuracy."""
        hits = [100 * (self.route(instruction_features(model, t)) == j).float().mean().item()
                for j, t in enumerate(tests)]
        return {"task_id_accuracy": sum(hits) / len(hits), "task_id_accuracy_per_task": hits}

    def oracle(self, task_id):
        """Expansion told the task (a bound, not a method): its experts, every row routed to task_id's."""
        told = copy.copy(self)  # shares the experts; only the router differs
        told.route = lambda instruction: torch.full((len(instruction),), task_id, device=instruction.device)
        return told


class Compose:
    """Several strategies at once ('replay+ewc'), each part keeping its own state. Hooks whose results combine
    are below: batches pass from part to part, penalties and bytes add, results merge, one part may route.
    Every other hook (and any new one that Strategy gains) goes to each part in turn by __getattr__."""

    def __init__(self, parts):
        self.parts, self.name = parts, "+".join(p.name for p in parts)
        self.naive_first = all(p.naive_first for p in parts)
        self.options = tuple(o for p in parts for o in p.options)
        routers = [p for p in parts if type(p).generate is not Strategy.generate]
        if len(routers) > 1:
            raise ValueError(f"{self.name}: only one part may route; {', '.join(p.name for p in routers)} do")
        self.router = routers[0] if routers else Strategy(None)  # a plain Strategy lets the model answer

    def __getattr__(self, hook):  # called only for names not defined in this class
        if not callable(getattr(Strategy, hook, None)):
            raise AttributeError(f"{type(self).__name__} has no attribute {hook!r}")

        def every_part(*args):
            for part in self.parts:
                getattr(part, hook)(*args)
        return every_part

    def batch(self, fresh, gen):
        for p in self.parts:  # each part sees the rows the one before it chose
            fresh = p.batch(fresh, gen)
        return fresh

    def penalty(self, model, batch, logits):
        terms = [t for t in (p.penalty(model, batch, logits) for p in self.parts) if t is not None]
        return sum(terms) if terms else None

    def stored_rows(self):
        stored = [rows for rows in (p.stored_rows() for p in self.parts) if rows is not None]
        return llava.Examples.concat(stored, "stored") if stored else None

    def generate(self, model, images, ids, max_new_tokens, eos_id):
        return self.router.generate(model, images, ids, max_new_tokens, eos_id)

    def oracle(self, task_id):
        return self.router.oracle(task_id)

    def extra_bytes(self):
        return sum(p.extra_bytes() for p in self.parts)

    def extra_results(self, model, tests):
        return {k: v for p in self.parts for k, v in p.extra_results(model, tests).items()}

    def state_dict(self):
        return {p.name: p.state_dict() for p in self.parts}

    def load_state_dict(self, state):
        for p in self.parts:
            p.load_state_dict(state[p.name])


STRATEGIES = {cls.name: cls for cls in (Strategy, Replay, Joint, EWC, MAS, LwF, LoRA, Expansion, TIR)}


def build(spec, cfg, seed=0):
    """'replay' or 'replay+ewc' -> a Strategy. Raises ValueError naming the bad part."""
    names = spec.split("+")
    if any(not n for n in names):
        raise ValueError(f"malformed strategy {spec!r}: empty part around '+'")
    for n in names:
        if n not in STRATEGIES:
            raise ValueError(f"unknown strategy {n!r}; choose from {', '.join(STRATEGIES)} (join with '+')")
    if len(set(names)) < len(names):
        raise ValueError(f"strategy {spec!r} names a part twice")
    parts = [STRATEGIES[n](cfg, seed) for n in names]
    return parts[0] if len(parts) == 1 else Compose(parts)
