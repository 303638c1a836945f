"""Metrics over the accuracy matrix, answer scoring, statistics and a run's report; and the features that
tell tasks apart (TIR's task similarity, expansion's routing).

A[i][j] is the accuracy (in %) on task j after training on task i; `base` is the row of the model
before any task. Definitions follow Lopez-Paz & Ranzato (2017) and Chaudhry et al. (2018), plus the
worst-drop BWT of He et al. (arXiv 2311.16206).
report.py reprints a run's report and compares runs; re-evaluating a checkpoint needs the model:
`python train.py --evaluate FILE`. The whole study is study.py.
"""
import math
import random
import statistics
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import data
import llava


# ----------------------------------------------------------------------------------------------
# metrics: pure functions of the matrix

LEARNT = 90  # % right after its own training: below it, a task was not learnt, so it cannot be forgotten


def average_accuracy(A):
    """AA: mean accuracy over all tasks after the last one."""
    return sum(A[-1]) / len(A[-1])


def backward_transfer(A):
    """BWT: mean over earlier tasks of (final accuracy - accuracy just after learning it); < 0: forgetting."""
    T = len(A)
    return sum(A[-1][j] - A[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else 0.0


def forgetting(A):
    """Mean over earlier tasks of (best accuracy it ever had - final accuracy)."""
    T = len(A)
    if T < 2:
        return 0.0
    return sum(max(A[i][j] for i in range(j, T - 1)) - A[-1][j] for j in range(T - 1)) / (T - 1)


def forward_transfer(A, base):
    """FWT: mean over tasks 2..T of (zero-shot accuracy just before training it - the reference row's). The
    reference is the base model's row (FWT), or a randomly initialised model's (FWT_random, as in Lopez-Paz &
    Ranzato), which is the same for both bases."""
    T = len(A)
    return sum(A[j - 1][j] - base[j] for j in range(1, T)) / (T - 1) if T > 1 else 0.0


def mean_average_accuracy(A):
    """MAA: the average accuracy over tasks seen so far, averaged over all stages."""
    return sum(sum(A[i][:i + 1]) / (i + 1) for i in range(len(A))) / len(A)


def worst_drop_bwt(A):
    """He et al.'s BWT: mean over earlier tasks of the worst (minimum) later accuracy minus the first."""
    T = len(A)
    if T < 2:
        return 0.0
    return sum(min(A[i][j] - A[j][j] for i in range(j + 1, T)) for j in range(T - 1)) / (T - 1)


def mean_learnt(A):
    """The mean diagonal: each task right after its own training. A strategy that stops learning shows here,
    not in BWT."""
    return sum(A[i][i] for i in range(len(A))) / len(A)


def learnt_bwt(A):
    """BWT over the earlier tasks that were learnt (A[j][j] >= LEARNT) alone, None if none was: a task never
    learnt has nothing to lose, so plain BWT rewards a model that learns nothing."""
    kept = [j for j in range(len(A) - 1) if A[j][j] >= LEARNT]
    return sum(A[-1][j] - A[j][j] for j in kept) / len(kept) if kept else None


def format_drop(A, F, C):
    """The part of -BWT that format explains: the mean over earlier tasks j of (F[j][j] - F[T][j]) ·
    C[j][j] / 100, what task j would lose if only the share of its answers in its task's space changed, and
    those answers stayed as often right. F, C: the format and content matrices (format_content)."""
    T = len(A)
    return sum((F[j][j] - F[-1][j]) * (C[j][j] or 0) / 100 for j in range(T - 1)) / (T - 1) if T > 1 else 0.0


def all_metrics(A, base, random_row=None):
    metrics = dict(AA=average_accuracy(A), BWT=backward_transfer(A), forgetting=forgetting(A),
                   FWT=forward_transfer(A, base), MAA=mean_average_accuracy(A), BWT_worst=worst_drop_bwt(A))
    if random_row:
        metrics["FWT_random"] = forward_transfer(A, random_row)
    return metrics


# ----------------------------------------------------------------------------------------------
# statistics over seeds and task pairs

def ranks(xs):
    """1-based ranks; ties share the mean of the ranks they span: [10, 20, 20, 5] -> [2, 3.5, 3.5, 1]. A
    value's rank is how many lie below it, plus the middle of those equal to it."""
    below, equal = {}, Counter(xs)
    for k, x in enumerate(sorted(xs)):
        below.setdefault(x, k)
    return [below[x] + (equal[x] + 1) / 2 for x in xs]


def spearman(xs, ys):
    """Spearman's rank correlation: the Pearson correlation of the ranks. NaN when either side is constant."""
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(var) if var > 0 else math.nan


def mantel_p(similarity, drop, seed=0, n=10000):
    """One-sided p of Spearman ρ(similarity, drop) < 0 over the cells of a task x task grid where drop is
    defined (not None): the share of n seeded relabellings of the tasks in `similarity` whose ρ is at most
    the observed one (Mantel's test). Tasks are relabelled, not cells shuffled: the cells of one task are not
    independent (a task hard to forget lowers its whole column). NaN where ρ is undefined."""
    cells = [(i, j) for i, row in enumerate(drop) for j, d in enumerate(row) if d is not None]
    ys, order, rng = [drop[i][j] for i, j in cells], list(range(len(drop))), random.Random(seed)

    def rho():
        return spearman([similarity[order[i]][order[j]] for i, j in cells], ys)
    observed, low = rho(), 0
    if math.isnan(observed):
        return math.nan
    for _ in range(n):
        rng.shuffle(order)
        low += rho() <= observed + 1e-12
    return (low + 1) / (n + 1)


ALPHA = 0.05  # the level of the study's verdicts, after Holm's correction across its findings


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom. With x = √df·tan θ the density's
    integral from 0 to t is c·√df·∫cos^(df-1) θ dθ over [0, atan(t/√df)]: a smooth integrand on a
    short interval, which Simpson's rule with 2000 intervals gets right to more digits than p needs."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    n, end = 2000, math.atan(abs(t) / math.sqrt(df))
    ys = [math.cos(end * i / n) ** (df - 1) for i in range(n + 1)]
    area = end / n / 3 * (ys[0] + ys[-1] + 4 * sum(ys[1:-1:2]) + 2 * sum(ys[2:-1:2]))
    return 0.5 + math.copysign(c * math.sqrt(df) * area, t)


def t_quantile(q, df):
    """The t with t_cdf(t, df) = q (0.5 < q < 1), by bisection."""
    lo, hi = 0.0, 1e6
    for _ in range(100):
        lo, hi = ((lo + hi) / 2, hi) if t_cdf((lo + hi) / 2, df) < q else (lo, (lo + hi) / 2)
    return (lo + hi) / 2


def paired_test(values):
    """Per-seed paired differences -> (mean, half-width of its 95 % interval, one-sided p that the mean is
    above 0), by the one-sample t-test; None for the last two with a single seed. No spread at all: p is 0
    (every seed above 0), 1 (below) or 0.5 (at 0)."""
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return mean, None, None
    se = statistics.stdev(values) / math.sqrt(n)
    if se == 0:
        return mean, 0.0, 0.0 if mean > 0 else 1.0 if mean < 0 else 0.5
    return mean, t_quantile(0.975, n - 1) * se, 1 - t_cdf(mean / se, n - 1)


def holm(ps):
    """Holm's step-down adjustment of p-values for testing them together (None: not tested, kept)."""
    order = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    adjusted, running = list(ps), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


# ----------------------------------------------------------------------------------------------
# scoring one answer

def normalize(text):
    return " ".join(text.lower().replace(".", " ").replace(",", " ").split())


def exact_match(pred, ref):
    return float(normalize(pred) == normalize(ref))


def token_f1(pred, ref):
    """F1 of the word multisets, as in SQuAD: partial credit for partly right captions."""
    p, r = normalize(pred).split(), normalize(ref).split()
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return float(p == r)
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


SCORERS = {"exact": exact_match, "f1": token_f1}


def score_tests(answer, tests, tok, batch_size):
    """Every test row answered -> per task (accuracy in %, [(question, predicted, reference), ...],
    [(predicted, score) of each row, in row order]).
    answer(images, prompt ids) gives the answers' texts: the model (and the strategy's routing) at work.
    Prompts of equal length go together, so a batch needs no padding."""
    results = []
    for test in tests:
        score, total, mistakes, answered = SCORERS[test.metric], 0.0, [], [None] * len(test)
        lengths = test.prompt_len.tolist()
        for p in sorted(set(lengths)):
            rows = [i for i, n in enumerate(lengths) if n == p]
            for k in range(0, len(rows), batch_size):
                idx = rows[k:k + batch_size]
                for i, pred in zip(idx, answer(test.images[idx], test.tokens[idx, :p])):
                    total += (s := score(pred, test.answers[i]))
                    answered[i] = (pred, s)
                    if s < 1:  # the question without [BOS] and [SEP]
                        mistakes.append((tok.decode(test.tokens[i, 1:p - 1].tolist()), pred, test.answers[i]))
        results.append((100.0 * total / len(test), mistakes, answered))
    return results


# ----------------------------------------------------------------------------------------------
# forgetting taken apart: format (the answer is of the right kind) and content (it is right)

# Answer spaces: for a task, is this answer text of the right kind, right or wrong? Accuracy splits into
# format (the answer lies in its task's space) and content (right, given the format). A task without an
# entry, such as a task file, falls back on its train split's answers.
_PLACES = tuple(data.where(c) for c in range(9))
_DESCRIPTIONS = {data.describe(data.Obj(shape, color, size, cell))  # every object a caption can mention
                 for shape in data.SHAPES for color in data.COLORS for size in data.SIZES
                 for cell in range(9)}
ANSWER_SPACES = {
    "classify": lambda a: a in data.SHAPES,
    "attribute": lambda a: a in data.SHAPES,
    "count": lambda a: a.isdigit(),  # a number, right or wrong
    "read": lambda a: a != "" and all(ch in data.GLYPHS for ch in a),  # a glyph string
    "ground": lambda a: a in _PLACES,
    "spatial": lambda a: a in ("left", "right", "top", "bottom"),
    "caption": lambda a: all(part in _DESCRIPTIONS for part in a.removesuffix(".").split(" and ")),
    "unanswerable": lambda a: a in data.SHAPES or a == "unanswerable",
}


def answer_space(name, train_answers):
    """A task's answer space as a predicate on an answer's text: ANSWER_SPACES, else (a task file, or
    a task whose answers may change, like spatial) the answers its train split contains, as normalize()d."""
    seen = frozenset(map(normalize, train_answers))
    return ANSWER_SPACES.get(name) or (lambda text: normalize(text) in seen)


MINOR_SPACES = (lambda a: a in ("yes", "no"), lambda a: a.isdigit())  # data.MINOR_KINDS' answers


def row_spaces(space, references):
    """Each row's answer space: its task's, or where the reference answer lies outside it, the space of the
    minor kind of question it answers (data.MINORS: yes/no, a number), which no task's own space shares."""
    return [space if space(r) else next((s for s in MINOR_SPACES if s(r)), space) for r in references]


def format_content(answered, in_spaces):
    """[(predicted, score)] of one task and each row's answer space -> (format: % of answers in their space,
    content: % score of those answers; None when no answer is)."""
    if not answered:  # under DDP a rank other than 0 answers nothing
        return math.nan, None
    scores = [s for (pred, s), in_space in zip(answered, in_spaces) if in_space(pred.strip())]
    return 100 * len(scores) / len(answered), 100 * sum(scores) / len(scores) if scores else None


def space_shares(answered_by_task, spaces):
    """Every task's answers after one stage -> per answer space, the % of all answers that lie in it."""
    preds = [pred.strip() for answered in answered_by_task for pred, _ in answered]
    return [100 * sum(map(in_space, preds)) / max(len(preds), 1) for in_space in spaces]


def stage_rows(results, spaces, per_row):
    """score_tests' results after one stage, each task's space and each test row's (row_spaces) -> that
    stage's row of each matrix a run keeps: accuracy, format, content (see format_content) and the share of
    all answers in each task's space."""
    split = [format_content(answered, in_spaces) for (*_, answered), in_spaces in zip(results, per_row)]
    return dict(matrix=[acc for acc, *_ in results], format_matrix=[f for f, _ in split],
                content_matrix=[c for _, c in split],
                space_shares=space_shares([answered for *_, answered in results], spaces))


def format_story(tasks, shares):
    """What a student sees: after which stages most answers to every question take that task's form."""
    return [f"after {t}, {shares[i][i]:.0f} % of all answers (to every task's questions) are of {t}'s kind"
            for i, t in enumerate(tasks) if shares[i][i] >= 50]


# ----------------------------------------------------------------------------------------------
# reports

def _width(tasks):
    return min(9, max(6, max(len(t) for t in tasks) + 1))  # long names are cut to fit


def format_header(tasks):
    w = _width(tasks)
    return f"{'after':>14} " + "".join(f"{t[:w - 1]:>{w}}" for t in tasks) + f"{'mean':>{w}}"


def format_row(label, row, tasks):
    w = _width(tasks)
    return f"{label[:14]:>14} " + "".join(f"{a:>{w}.1f}" for a in row) + f"{sum(row) / len(row):>{w}.1f}"


def format_matrix(tasks, A, base=None):
    """The matrix as text: a header, the base row if given, then one row per training stage."""
    rows = [format_row("base", base, tasks)] if base else []
    rows += [format_row(tasks[i], r, tasks) for i, r in enumerate(A)]
    return "\n".join([format_header(tasks)] + rows)


def learnt_line(tasks, A):
    """The worst diagonal entry (a task right after its own training), and every task below LEARNT."""
    worst = min(range(len(A)), key=lambda i: A[i][i])
    low = [f"{tasks[i]} {A[i][i]:.1f}" for i in range(len(A)) if A[i][i] < LEARNT]
    verdict = f"NOT LEARNT (below {LEARNT}): {', '.join(low)}" if low else f"every task learnt (>= {LEARNT})"
    return f"worst task right after its own training: {tasks[worst]} {A[worst][worst]:.1f}; {verdict}"


def format_report(results):
    tasks, A, base = results["tasks"], results["matrix"], results.get("base_row")
    m = results.get("metrics") or all_metrics(A, base, results.get("random_row"))
    strategy = results["config"]["train"]["strategy"]
    lines = [f"strategy {strategy}: accuracy (%) on each task (columns) after each stage (rows)",
             format_matrix(tasks, A, base), "",
             "  ".join(f"{k} {v:+.1f}" if k.startswith(("BWT", "FWT")) else f"{k} {v:.1f}"
                       for k, v in m.items())]
    lines.append(learnt_line(tasks, A))
    if "FWT_random" in m:
        lines.append("FWT: zero-shot accuracy over the base model's; FWT_random: over a random model's")
    if "oracle_row" in results:  # expansion: router errors against expert quality
        oracle = sum(results["oracle_row"]) / len(results["oracle_row"])
        lines.append(f"routed AA {m['AA']:.1f}, with oracle routing (each task's own expert) "
                     f"{oracle:.1f}; task-ID accuracy {results['task_id_accuracy']:.1f} %")
    if "format_matrix" in results:
        F, C = results["format_matrix"], results["content_matrix"]
        content = [c for c in C[-1] if c is not None]
        lines.append(f"after the last task {sum(F[-1]) / len(F[-1]):.1f} % of answers lie in their task's "
                     f"space (format), {sum(content) / max(len(content), 1):.1f} % of those are right "
                     "(content); "
                     f"format explains {format_drop(A, F, C):.1f} of the {-m['BWT']:.1f} points of -BWT")
        lines += format_story(tasks, results["space_shares"])
    if "wall_seconds" in results:
        lines.append(f"wall time {results['wall_seconds']:.0f} s")
    return "\n".join(lines)


# importance: how much each parameter matters to a task (EWC, MAS, TIR)

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



# features that tell tasks apart: TIR's task similarity, expansion's routing

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

