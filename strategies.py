"""Continual-learning strategies: one class each, all on the same few hooks.

train.py calls, for every task in order:
    before_task(model, task_id, train) -> steps of [batch(fresh, gen) -> loss + penalty] -> after_task(...)
and answers test questions through generate(...), where an expansion strategy would route.
A strategy keeps its state in `state_dict()`, which checkpoints save. `build("replay+ewc", cfg)`
composes strategies: every part's hooks run. Methods follow He et al. (arXiv 2311.16206), sec. 4:
replay, joint (the upper bound), EWC, MAS, LwF, LoRA, model expansion (EProj) and TIR."""
import copy
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import llava
from model import LORA_SITES, add_lora, arg


@dataclass
class StrategyConfig:
    """Options of the strategies; each strategy lists the ones it reads in `options`."""
    buffer_size: int = arg(200, "replay buffer capacity in rows (the paper replays ~1 %; we afford more)")
    replay_ratio: float = arg(0.25, "fraction of each batch drawn from the replay buffer")
    ewc_lambda: float = arg(1e5, "EWC: penalty weight λ; too small holds nothing, too large stops learning")
    mas_lambda: float = arg(1.0, "MAS: penalty weight λ on its importances, which are larger than EWC's")
    importance_decay: float = arg(1.0, "online EWC/MAS: γ in F ← γF + F_new; 1 keeps every task in full")
    importance_samples: int = arg(256, "rows whose per-sample gradients estimate the importances")
    ewc_fisher: str = arg("model", "EWC/TIR: Fisher of the model's own answers, sampled (Kirkpatrick et "
                          "al.), or empirical (the true answers': it vanishes once a task is fitted)")
    tir_importance: str = arg("ewc", "TIR: importance measure, ewc (Fisher) or mas")
    tir_temperature: float = arg(0.5, "TIR: τ of similarity exp(-Σ(1-cos)/τ): a smaller τ tells tasks "
                                 "apart more sharply")
    lwf_alpha: float = arg(1.0, "LwF: weight of distillation beside the task loss; larger stops new tasks")
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
        """A strategy told that every question is of task `task_id`, or None where knowing it changes nothing.
        Expansion's oracle uses that task's expert: the bound its routing could reach."""
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


class ReservoirBuffer:
    """A fixed-capacity sample of every row offered so far, each kept with probability capacity/seen."""

    def __init__(self, capacity, seed):
        self.capacity, self.seen, self.rows = capacity, 0, None  # rows: an Examples, compact as task data
        self.gen = torch.Generator().manual_seed(seed)  # its own stream: replay never shifts the data order

    def add(self, ex):
        """Reservoir sampling (Vitter's algorithm R): row n is kept with probability capacity/n."""
        n_fill = max(min(self.capacity - len(self), len(ex)), 0)  # while not full, every row is kept
        head = ex.subset(range(n_fill))
        self.rows = head if self.rows is None else llava.Examples.concat([self.rows, head], "buffer")
        self.seen += n_fill
        for i in range(n_fill, len(ex)):
            self.seen += 1
            slot = int(torch.randint(self.seen, (1,), generator=self.gen))  # uniform in [0, seen)
            if slot < self.capacity:  # overwrite a random slot
                for field in ("images", "tokens", "prompt_len", "answers"):
                    getattr(self.rows, field)[slot] = getattr(ex, field)[i]

    def __len__(self):
        return 0 if self.rows is None else len(self.rows)

    def sample(self, n, gen):
        return self.rows.subset(torch.randint(len(self), (n,), generator=gen))

    def nbytes(self):
        return 0 if self.rows is None else nbytes(vars(self.rows))  # the answers, strings, count nothing

    def state_dict(self):  # the rows as a dict of their fields: tensors, a list and strings
        rows = None if self.rows is None else dict(vars(self.rows))
        return dict(capacity=self.capacity, seen=self.seen, gen=self.gen.get_state(), rows=rows)

    def load_state_dict(self, state):
        self.capacity, self.seen, rows = state["capacity"], state["seen"], state["rows"]
        self.gen.set_state(state["gen"])
        self.rows = None if rows is None else llava.Examples(**{**rows, "answers": list(rows["answers"])})


class Replay(Strategy):
    """Experience replay: keep a reservoir sample of past tasks' rows and mix them into every batch. After
    each task, every training row of that task is offered once to a reservoir buffer of fixed capacity, so the
    buffer is a uniform sample of all tasks seen so far. While training a new task, a fraction `replay_ratio`
    of each batch is drawn from the buffer instead of the new task. Only fresh rows enter the buffer, never
    replayed ones, so old tasks are not over-represented."""
    name, options = "replay", ("buffer_size", "replay_ratio")

    def __init__(self, cfg, seed=0, capacity=None):
        super().__init__(cfg, seed)
        self.buffer = ReservoirBuffer(capacity or cfg.buffer_size, seed)

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
    """Multitask training on all tasks seen so far: the upper-bound row, not a continual method. Each task's
    rows join a pool (a buffer too big ever to fill) before the task is trained, and every batch comes from
    the pool alone: stage t trains on the union of tasks 1..t, at the price of keeping all the data."""
    name, options = "joint", ()
    naive_first = False  # its batches come from the pool, drawn otherwise than naive's

    def __init__(self, cfg, seed=0):
        super().__init__(cfg, seed, capacity=2 ** 62)  # a buffer never full keeps every row

    def before_task(self, model, task_id, train):  # the rows go in before the task, not after it
        self.buffer.add(train)

    def after_task(self, model, task_id, train):
        pass

    def batch(self, fresh, gen):
        return self.buffer.sample(len(fresh), gen)


def importance(model, rows, measure, n_samples, gen, chunk=32, fisher="model"):
    """Each trainable parameter's importance: the mean over n_samples random rows of g² ('ewc': a diagonal
    Fisher) or |g| ('mas'), g the gradient on one row alone of the mean over its answer positions of the
    negative log-likelihood ('ewc') or of ‖logits‖² ('mas', label-free). EWC's labels are the model's own
    answers, each token sampled from its prediction at that position (fisher='model', the Fisher as
    Kirkpatrick et al. define it, an expectation over the model's distribution), or the true answers
    (fisher='empirical'). The empirical g shrinks with the model's error, so its g² vanishes as the square of
    it once a task is fitted; the model's own Fisher only as the error itself. Squaring the batch-mean
    gradient instead, as Avalanche does, gives E[g]², which shrinks as the batch grows."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}

    def one_row(params, image, inputs, targets):  # inside vmap each row is a batch of one
        logits = functional_call(model, params, (image[None], inputs[None]))[0][0]  # (T, V)
        answer = targets != -100
        if measure == "ewc":  # (T,): the answer's negative log-likelihood
            per_token = -logits.log_softmax(-1).gather(-1, targets.clamp_min(0)[:, None])[:, 0]
        else:  # (T,): ‖logits‖², label-free
            per_token = logits.pow(2).sum(-1)
        return (per_token * answer).sum() / answer.sum()
    idx = torch.randperm(len(rows), generator=gen)[:n_samples]
    for i in range(0, len(idx), chunk):
        images, inputs, targets = llava.to_batch(rows, idx[i:i + chunk], next(iter(params.values())).device)
        if measure == "ewc" and fisher == "model":  # each answer token drawn from the model's prediction
            answer = targets != -100
            with torch.no_grad():
                probs = model(images, inputs)[0][answer].float().softmax(-1).cpu()
            targets = targets.clone()
            targets[answer] = torch.multinomial(probs, 1, generator=gen)[:, 0].to(targets.device)
        with warnings.catch_warnings():  # SDPA has no vmap rule yet; its fallback still beats a loop
            warnings.filterwarnings("ignore", message=".*batching rule")
            grads = vmap(grad(one_row), in_dims=(None, 0, 0, 0))(params, images, inputs, targets)
        for n, g in grads.items():
            total[n] += (g.square() if measure == "ewc" else g.abs()).sum(0)
    return {n: t / len(idx) for n, t in total.items()}


class EWC(Strategy):
    """Online Elastic Weight Consolidation (Kirkpatrick et al. 2017; Schwarz et al. 2018). After each task the
    diagonal Fisher F = E[g²], over per-sample gradients g of the log-likelihood of the model's own answers
    (sampled; --ewc-fisher empirical takes the true ones), says how sharply that task's loss rises when a
    parameter moves. The online variant keeps one running F ← γF + F_new and
    one anchor θ*, the parameters after the last task: two copies of the trainable parameters however many
    tasks come. New tasks train with λ·Σ F·(θ − θ*)², which keeps important parameters where old
    tasks need them."""
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
        decay = self.cfg.importance_decay
        old = {n: decay * f for n, f in self.importance.items()}
        self.importance = {**old, **{n: old.get(n, 0) + f for n, f in new.items()}}

    def penalty(self, model, batch, logits):
        if not self.anchor:
            return None
        params = dict(model.named_parameters())
        weighted = sum((w * (params[n] - self.anchor[n]) ** 2).sum() for n, w in self.weights().items())
        return getattr(self.cfg, self.strength) * weighted


class MAS(EWC):
    """Memory Aware Synapses (Aljundi et al. 2018): EWC's penalty with a label-free importance. A parameter
    matters if moving it changes what the model outputs, whatever the labels: its importance is the mean
    over rows of |∂‖logits‖²/∂θ|, the norm over the logits at a row's answer positions. It
    accumulates like F."""
    name, options = "mas", ("mas_lambda", "importance_decay", "importance_samples")
    measure, strength = "mas", "mas_lambda"


@torch.no_grad()
def token_features(base, tokens, prompt_len):
    """Per row, with the token embedding in `base`: the mean embedding of the instruction tokens and of the
    answer tokens. tokens: [BOS] instruction [SEP] answer [EOS] [PAD]... Embeddings are centred on the
    vocabulary's mean: a trained embedding gives every token one large common direction (cosines of two
    tasks' raw instruction means were all >= 0.993), which would hide what the tokens say."""
    table = base["tok_emb.weight"]
    emb = F.embedding(tokens, table - table.mean(0))  # (B, L, d)
    pos, p = torch.arange(tokens.size(1), device=tokens.device)[None], prompt_len[:, None]
    spans = ((pos >= 1) & (pos < p - 1), (pos >= p) & (tokens != llava.PAD) & (tokens != llava.EOS))
    return tuple((emb * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1) for m in spans)


@torch.no_grad()
def row_features(model, base, images, tokens, prompt_len):
    """Per row, with the vision tower and token embedding in `base` ({name: tensor}, e.g. a snapshot of the
    base model): the mean ViT feature, then token_features (instruction, answer)."""
    vision = {n.removeprefix("vision."): p for n, p in base.items() if n.startswith("vision.")}
    image = functional_call(model.vision, vision, (images,)).mean(1)  # (B, N, vit_dim) -> (B, vit_dim)
    return (image,) + token_features(base, tokens, prompt_len)


def examples_features(model, base, rows):
    """row_features of an Examples (uint8 pixels, int16 tokens)."""
    device = base["tok_emb.weight"].device
    return row_features(model, base, llava.pixels(rows.images).to(device), rows.tokens.long().to(device),
                        rows.prompt_len.long().to(device))


def instruction_features(model, rows):
    """token_features' instruction part of an Examples, by the model's own embedding: no image is encoded."""
    base = dict(model.named_parameters())
    device = base["tok_emb.weight"].device
    return token_features(base, rows.tokens.long().to(device), rows.prompt_len.long().to(device))[0]


def task_similarity(prototypes, temperature):
    """[(image, instruction, answer) mean features] of T tasks -> (T, T) similarities in (0, 1]:
    exp(-Σ (1 - cos) / temperature), the sum over the three kinds of the cosine gap between two tasks' means.
    It is 1 for equal means and falls as any of the three parts differ. The scale is fixed, not fitted to the
    tasks at hand, so the similarity of two tasks is the same whichever tasks came before or after them.
    Instruction and answer features are centred embeddings (row_features), so a direction every token
    shares does not make all tasks alike."""
    gap = torch.zeros(len(prototypes), len(prototypes))
    for kind in zip(*prototypes):  # every task's image mean, then every task's instruction mean, then ...
        unit = F.normalize(torch.stack(kind).float().cpu(), dim=1)
        gap += 1 - unit @ unit.T
    return torch.exp(-gap.clamp_min(0) / temperature)


def tir_weights(per_task, similarity, task_id):
    """EWC's summed importance, each earlier task's part counted (1 - its similarity to the new task)
    times."""
    keep, weights = (1 - similarity[task_id]).tolist(), {}
    for k, importance in enumerate(per_task):
        for n, f in importance.items():
            weights[n] = weights.get(n, 0) + keep[k] * f
    return weights


class TIR(EWC):
    """Task-similarity-informed regularisation (He et al. 2023, sec. 4.3) on EWC's footing: EWC's penalty and
    λ (MAS's, with --tir-importance mas), where each earlier task's importance counts 1 − similarity(new
    task, that task) times instead of once: an old task much like the new one needs little protection, since
    learning the new task also serves it. With every similarity 0 it is EWC (γ = 1). The similarity is
    measured before each task on the frozen base model (task_similarity); the similarities used are kept
    (`used`) and reported. He et al.'s are the idea and the weighting by similarity; this project's own are
    the similarity's features and scale (task_similarity), keeping each task's importance apart (T copies
    of the trainable parameters, not EWC's one: the weights change with every new task), and EWC's λ."""
    name, options = "tir", ("ewc_lambda", "mas_lambda", "tir_importance", "importance_samples",
                            "tir_temperature", "ewc_fisher")
    # per_task: each task's importances; scaled: the weights in use; used: per task, its similarity to
    # every task up to it, as used then
    state = {"anchor": {}, "per_task": [], "base": None, "prototypes": [], "scaled": {}, "used": []}

    def __init__(self, cfg, seed=0):
        super().__init__(cfg, seed)
        if cfg.tir_importance not in ("ewc", "mas"):
            raise ValueError(f"--tir-importance must be ewc or mas, got {cfg.tir_importance!r}")
        self.measure, self.strength = cfg.tir_importance, f"{cfg.tir_importance}_lambda"

    def weights(self):
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


class LwF(Strategy):
    """Learning without Forgetting (Li & Hoiem 2016), for a model that answers in tokens. Before each task
    after the first, the parameters are copied as a frozen teacher. The teacher reads each batch too, and the
    model is pulled towards its answer-token distributions,
    α·T²·KL(softmax(teacher/T) ‖ softmax(model/T)), at every answer position. No old data is kept:
    old tasks live on in how the old model answers new questions."""
    name, options = "lwf", ("lwf_alpha", "lwf_temperature")
    state = {"teacher": None}  # {name: tensor}, made afresh before each task

    def before_task(self, model, task_id, train):
        self.teacher = copy_params(model.named_parameters()) if task_id > 0 else None

    def penalty(self, model, batch, logits):
        if self.teacher is None:
            return None
        with torch.no_grad():
            teacher_logits, _ = functional_call(model, self.teacher, batch[:2])  # (images, inputs)
        T, answer = self.cfg.lwf_temperature, batch[2] != -100
        old, new = (F.log_softmax(x[answer] / T, dim=-1) for x in (teacher_logits, logits))  # (answers, V)
        return self.cfg.lwf_alpha * T * T * F.kl_div(new, old, log_target=True, reduction="batchmean")


class LoRA(Strategy):
    """One low-rank adapter set, tuned through every task in turn while the whole base stays frozen. Before
    the first task the chosen linear layers are wrapped in LoRALinear (model.py); from then on only the
    adapters train. Far fewer parameters move than in full fine-tuning, but the same ones move for every task,
    so LoRA alone still forgets. The adapters live in the model, and so in its checkpoints."""
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


KEYS = 64  # training rows per task whose instructions Expansion keeps as routing keys


class Expansion(LoRA):
    """Model expansion with task-ID routing, after the paper's EProj (He et al. 2023, sec. 4.2). Each task
    gets its own expert, a LoRA adapter set and a projector copy, trained from one common start while all
    else stays frozen; finished experts are stored and never trained again. Each task also leaves keys: the
    instruction features (mean token embedding, by the frozen embedding) of its first KEYS training rows. At
    test time no task id is given: each row goes to the expert of the key nearest its own instruction
    (cosine), and extra_results reports how often that is the right task. Nearest neighbour, not a mean key
    per task: no two tasks share an instruction template, while their means are nearly alike, and an image
    key is noise where tasks draw the same kind of scene."""
    name = "expansion"
    state = {"start": None, "experts": [], "keys": []}  # keys: per task, (KEYS, dim) instruction features

    def extra_bytes(self):  # what the state holds: every expert, the start, the keys (LoRA's would miss them)
        return Strategy.extra_bytes(self)

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
        first = train.subset(range(min(KEYS, len(train))))
        self.keys.append(instruction_features(model, first))

    def route(self, instruction):
        """Each row's instruction features (B, dim) -> the expert of the nearest key (cosine)."""
        owner = torch.cat([torch.full((len(k),), t) for t, k in enumerate(self.keys)]).to(instruction.device)
        keys = F.normalize(torch.cat(self.keys), dim=-1)
        return owner[(F.normalize(instruction, dim=-1) @ keys.T).argmax(1)]

    def generate(self, model, images, ids, max_new_tokens, eos_id):
        if not self.experts:  # before the first task there is only the base model
            return model.generate(images, ids, max_new_tokens, eos_id)
        prompt_len = torch.full((len(ids),), ids.size(1), device=ids.device)
        chosen = self.route(token_features(dict(model.named_parameters()), ids, prompt_len)[0])
        return self.generate_with(model, images, ids, max_new_tokens, eos_id, chosen)

    def generate_with(self, model, images, ids, max_new_tokens, eos_id, chosen):
        """Answer each row with the expert chosen for it (a tensor of expert indices, one per row)."""
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
        return ExpertOracle(self, task_id)


class ExpertOracle(Strategy):
    """Expansion with the task id given: every row goes to expert `task_id`. An upper bound, not a method."""
    name = "oracle"

    def __init__(self, expansion, task_id):
        super().__init__(None)
        self.expansion, self.task_id = expansion, task_id

    def generate(self, model, images, ids, max_new_tokens, eos_id):
        chosen = torch.full((len(ids),), self.task_id, device=ids.device)
        return self.expansion.generate_with(model, images, ids, max_new_tokens, eos_id, chosen)


class Compose:
    """Several strategies at once ('replay+ewc'), each part keeping its own state. A hook whose results add up
    combines them below: batches pass from part to part, penalties and bytes add, results merge, one part may
    route. Every other hook (before_task, after_task, restore, and any new one that Strategy gains) is passed
    to each part in order by __getattr__, so a new hook needs no edit here."""

    def __init__(self, parts):
        self.parts, self.name = parts, "+".join(p.name for p in parts)
        self.naive_first = all(p.naive_first for p in parts)
        self.options = tuple(o for p in parts for o in p.options)
        routers = [p for p in parts if type(p).generate is not Strategy.generate]
        if len(routers) > 1:
            names = ", ".join(p.name for p in routers)
            raise ValueError(f"{self.name}: only one part may route, but {names} all do")
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
