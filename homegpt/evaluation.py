"""
Evaluation: validation loss and perplexity, multiple-choice benchmarks (HellaSwag, PIQA, Winogrande)
and LAMBADA last-word accuracy, with 95% Wilson score intervals.

    python eval.py --out_dir=out-shakespeare-char --tasks=val
    python eval.py --init_from=gpt2 --tasks=hellaswag,lambada --limit=500

    from homegpt.evaluation import evaluate_loss, load_task, run_benchmark
    r = evaluate_loss(model, eval_batches(data, 8, 256), device, contextlib.nullcontext())

Multiple choice is scored the way lm-evaluation-harness and llm.c do it: the log-likelihood of
each ending given the context, in one padded batch per item. `pred` takes the highest sum of
log-probabilities; `pred_norm` the highest mean per token (length-normalised, as llm.c's HellaSwag
eval; the harness's acc_norm divides by bytes instead, so its numbers differ slightly).
Long runs show a progress bar on a terminal (runtime.progress) and none in a log. `datasets` is
imported only when a benchmark is downloaded (hub.load_hub_dataset, which asks whether the hub is there first).
"""

import contextlib
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

from homegpt import runtime
from homegpt.dataloader import to_device
from homegpt.errors import UserError
from homegpt.hub import load_hub_dataset


# ----------------------------------------------------------------------------- validation loss

class Stopped(Exception):
    """An evaluation given up because the process was asked to stop (SIGTERM, Ctrl-C)."""


def evaluate_loss(model, batches, device, ctx, stop=None):
    """Token-weighted mean cross-entropy over batches of (x, y) (numpy or tensors; y == -1 ignored).
    stop: a function asked before each batch; when it says True, Stopped is raised (a preemptible
    machine's SIGTERM must not wait for a 200-batch evaluation: it kills 30 s later).

    Sums the per-token losses and divides by the number of target tokens, so a ragged last batch
    counts by its tokens, not as a whole batch, and the result equals one cross-entropy over all the
    tokens. Sums stay on the device until the end: one host sync per call, not one per batch.
    Returns {"loss", "perplexity", "tokens"}.
    """
    was_training = model.training
    model.eval()  # dropout off: a loss with random masks is noisier and higher; train.py's mode is restored below
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    total = torch.zeros((), dtype=acc_dtype, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    try:
        with torch.inference_mode(), ctx:
            for x, y in batches:
                if stop is not None and stop():
                    raise Stopped
                x, y = (_as_tensor(a, device) for a in (x, y))
                _, loss_sum = model(x, y, reduction="sum")
                total += loss_sum.to(acc_dtype)
                count += (y != -1).sum()
    finally:
        model.train(was_training)
    n = int(count.item())
    if n == 0:
        raise UserError("evaluate_loss got no target tokens: the validation split is empty or shorter "
                         "than block_size+1; use a smaller block_size or more validation data")
    loss = total.item() / n
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n}


def _as_tensor(a, device):
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(np.ascontiguousarray(a))
    return a.to(device, non_blocking=device.type == "cuda")


# ----------------------------------------------------------------------------- scoring continuations

def score_pairs(model, pairs, device, ctx):
    """Score each (context_ids, continuation_ids) pair in one right-padded batch.

    Contexts longer than the model's block_size are cropped from the left (the continuation must
    fit). Returns per pair: "sum_logprob" and "mean_logprob" of the continuation tokens, "n_tokens",
    and "greedy" (True when the argmax at every continuation position is that token, i.e. greedy
    decoding would have produced the whole continuation).
    """
    T = model.config.block_size
    xs, ys = [], []
    for context, cont in pairs:
        context, cont = list(context), list(cont)
        if not context:
            raise UserError("a continuation needs at least one context token to be scored after "
                             "(with GPT-2, start the context with <|endoftext|>)")
        if not cont:
            raise UserError("empty continuation: every ending must encode to at least one token")
        if len(cont) > T:
            raise UserError(f"continuation of {len(cont)} tokens does not fit the model's block_size {T}; "
                             f"evaluate a model with a longer context or shorter items")
        seq = (context + cont)[-(T + 1):]  # keep the most recent context (left crop)
        xs.append(seq[:-1])
        ys.append([-1] * (len(seq) - 1 - len(cont)) + cont)  # targets only where the continuation is
    L = max(len(x) for x in xs)
    X = torch.zeros((len(xs), L), dtype=torch.long)  # padding id 0 sits after every real token: causal
    Y = torch.full((len(xs), L), -1, dtype=torch.long)  # attention keeps it from influencing them
    for i, (x, y) in enumerate(zip(xs, ys)):
        X[i, :len(x)] = torch.tensor(x)
        Y[i, :len(y)] = torch.tensor(y)
    X, Y = X.to(device), Y.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), ctx:
            logits, _ = model(X, Y)  # (B, L, V): with targets the model returns every position
    finally:
        model.train(was_training)
    logits = logits.float()
    mask = Y != -1
    nll = F.cross_entropy(logits.view(-1, logits.size(-1)), Y.view(-1), ignore_index=-1,
                          reduction="none").view(Y.shape)
    sums = -(nll * mask).sum(1)
    counts = mask.sum(1)
    hits = ((logits.argmax(-1) == Y) | ~mask).all(1)
    return {"sum_logprob": sums.tolist(), "mean_logprob": (sums / counts).tolist(),
            "n_tokens": counts.tolist(), "greedy": hits.tolist()}


def score_choices(model, context_ids, choice_ids_list, device, ctx):
    """Multiple choice: the log-likelihood of each ending after one shared context.

    Returns {"sum_logprob": [...], "mean_logprob": [...], "pred", "pred_norm"}: pred is the ending
    with the highest total log-probability, pred_norm the highest per-token mean (length-normalised).
    """
    return _choose(score_pairs(model, [(context_ids, c) for c in choice_ids_list], device, ctx))


def score_partial(model, context_ids_list, continuation_ids, device, ctx):
    """Winogrande's partial scoring: each option fills the blank in its own context, and only the
    shared continuation after the blank is scored, so options of different lengths compare fairly
    (Trinh & Le 2018, as lm-evaluation-harness does). Same return value as score_choices."""
    return _choose(score_pairs(model, [(c, continuation_ids) for c in context_ids_list], device, ctx))


def _choose(s):
    argmax = lambda v: max(range(len(v)), key=lambda i: v[i])  # first index wins a tie
    return {"sum_logprob": s["sum_logprob"], "mean_logprob": s["mean_logprob"],
            "pred": argmax(s["sum_logprob"]), "pred_norm": argmax(s["mean_logprob"])}


def wilson_interval(k, n, z=1.96):
    """95% Wilson score interval for k successes in n trials. Unlike the normal approximation it
    stays inside [0, 1] and is sensible at 0% or 100% on small n (Wilson 1927)."""
    if n <= 0:
        raise UserError("the Wilson interval needs at least one item (n >= 1)")
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


# ----------------------------------------------------------------------------- benchmark items

class Item(NamedTuple):
    """One benchmark question as text.

    context: a str followed by each of `endings` (multiple choice), or a list of str, one per option,
    all followed by the single shared ending endings[0] (Winogrande's partial scoring).
    label: index of the correct option. LAMBADA items hold the passage and its last word.
    """
    context: object
    endings: list
    label: int


def _hellaswag(d):
    # llm.c's convention: the dataset's ctx (ctx_a + " " + ctx_b), then " " + ending
    return Item(d["ctx"], [" " + e for e in d["endings"]], int(d["label"]))


def _piqa(d):
    # lm-evaluation-harness's prompt for PIQA
    return Item(f"Question: {d['goal']}\nAnswer:", [" " + d["sol1"], " " + d["sol2"]], int(d["label"]))


def _winogrande(d):
    sentence = d["sentence"]
    i = sentence.find("_")
    if i < 0:
        raise UserError(f"winogrande sentence has no '_' blank: {sentence!r}")
    contexts = [sentence[:i] + d["option1"], sentence[:i] + d["option2"]]
    return Item(contexts, [" " + sentence[i + 1:].strip()], int(d["answer"]) - 1)


def _lambada(d):
    # the target is the last space-separated word, scored with its leading space (as the harness)
    context, _, word = d["text"].rstrip().rpartition(" ")
    if not context or not word:
        raise UserError(f"lambada text needs a passage and a last word: {d['text'][:60]!r}")
    return Item(context, [" " + word], 0)


# name -> (Hugging Face dataset, config, split, fields every item needs, converter)
BENCHMARKS = {
    "hellaswag": ("Rowan/hellaswag", None, "validation", ("ctx", "endings", "label"), _hellaswag),
    "piqa": ("ybisk/piqa", None, "validation", ("goal", "sol1", "sol2", "label"), _piqa),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation",
                   ("sentence", "option1", "option2", "answer"), _winogrande),
    "lambada": ("EleutherAI/lambada_openai", "default", "test", ("text",), _lambada),
}


def load_task(task, data_file="", limit=0):
    """The items of a benchmark: from a local JSONL file in the dataset's schema when data_file is
    given, else from the Hugging Face hub. limit > 0 keeps the first `limit` items."""
    if task not in BENCHMARKS:
        raise UserError(f"unknown benchmark {task!r}; choose from {', '.join(BENCHMARKS)}")
    hf_name, hf_config, split, fields, convert = BENCHMARKS[task]
    if data_file:
        rows = _read_jsonl(data_file, fields, limit)
        source = data_file
    else:
        rows = _download(task, hf_name, hf_config, split, fields, limit)
        source = f"{hf_name} ({split})"
    items = []
    for where, row in rows:
        try:
            item = convert(row)
            n_options = len(item.context) if isinstance(item.context, list) else len(item.endings)
            if not 0 <= item.label < n_options:
                raise UserError(f"label {item.label} is not the index of one of {n_options} options")
        except (ValueError, TypeError) as e:
            raise UserError(f"{source}, {where}: bad {task} item: {e}") from e
        items.append(item)
    if not items:
        raise UserError(f"{source}: no {task} items")
    return items


def _read_jsonl(path, fields, limit):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data_file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e})") from e
            missing = [k for k in fields if not isinstance(row, dict) or k not in row]
            if missing:
                raise UserError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}; "
                                 f"each line needs {', '.join(fields)}")
            rows.append((f"line {lineno}", row))
            if limit > 0 and len(rows) >= limit:
                break
    return rows


def _download(task, hf_name, hf_config, split, fields, limit):
    ds = load_hub_dataset(hf_name, hf_config, split, what=task,
                          hint=f"Offline, save the split as JSON lines with the fields {', '.join(fields)} and pass "
                               f"--data_file=path.jsonl")
    n = len(ds) if limit <= 0 else min(limit, len(ds))
    return [(f"row {i}", ds[i]) for i in range(n)]


# ----------------------------------------------------------------------------- running a benchmark

def _encode_context(tokenizer, text):
    ids = tokenizer.encode(text)
    if not ids and tokenizer.eot is not None:
        ids = [tokenizer.eot]  # as the harness: an empty context becomes the document boundary
    return ids


def run_benchmark(model, tokenizer, items, device, ctx, progress=True, desc=""):
    """Accuracy of a multiple-choice benchmark (items from load_task).

    Returns {"acc", "acc_norm", "n", "correct", "correct_norm", "acc_ci95", "acc_norm_ci95",
    "interval"}; the intervals are 95% Wilson score intervals.
    """
    correct = correct_norm = 0
    with ctx:  # entered once for the whole run; the scorers get a no-op
        for item in progress_bar(items, progress, desc):
            endings = [tokenizer.encode(e) for e in item.endings]
            if isinstance(item.context, str):
                r = score_choices(model, _encode_context(tokenizer, item.context), endings,
                                  device, contextlib.nullcontext())
            else:
                contexts = [_encode_context(tokenizer, c) for c in item.context]
                r = score_partial(model, contexts, endings[0], device, contextlib.nullcontext())
            correct += r["pred"] == item.label
            correct_norm += r["pred_norm"] == item.label
    n = len(items)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n,
            "correct": correct, "correct_norm": correct_norm,
            "acc_ci95": wilson_interval(correct, n), "acc_norm_ci95": wilson_interval(correct_norm, n),
            "interval": "wilson95"}


def run_lambada(model, tokenizer, items, device, ctx, batch_size=8, progress=True, desc="lambada"):
    """LAMBADA: the last word counts as right only when greedy decoding reproduces every one of its
    tokens (teacher-forced argmax at each position, which is the same thing). Perplexity is over
    the target-word tokens; word_perplexity over whole words (lm-evaluation-harness's number).

    Returns {"acc", "n", "correct", "acc_ci95", "interval", "perplexity", "word_perplexity", "tokens"}.
    """
    correct, logprob, tokens = 0, 0.0, 0
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    with ctx:
        for batch in progress_bar(batches, progress, desc):
            pairs = [(_encode_context(tokenizer, it.context), tokenizer.encode(it.endings[0])) for it in batch]
            r = score_pairs(model, pairs, device, contextlib.nullcontext())
            correct += sum(r["greedy"])
            logprob += sum(r["sum_logprob"])
            tokens += sum(r["n_tokens"])
    n = len(items)
    return {"acc": correct / n, "n": n, "correct": correct, "acc_ci95": wilson_interval(correct, n),
            "interval": "wilson95", "perplexity": math.exp(-logprob / tokens),
            "word_perplexity": math.exp(-logprob / n), "tokens": tokens}


def progress_bar(iterable, enabled, desc, total=None):
    """iterable with a progress bar on a terminal (runtime.progress: none in a log, none off rank 0);
    enabled=False (eval.py --progress=False) gives iterable back untouched."""
    return runtime.progress(iterable, desc, total) if enabled else iterable


def validate(run, stop=None):
    """(validation loss, stopped) of a training run (train.Run): the loss is the same number on every
    rank (rank 0's: every rank then takes the same save decision, and a save is a collective), None
    without validation data or when a stop request (stop(): SIGTERM, Ctrl-C) cut the evaluation short.
    DDP: rank 0 evaluates while the others wait for its number. FSDP: every rank runs the forward,
    which gathers the shards, and the number is rank 0's; the ranks agree on a stop before each batch."""
    if run.val_batches is None:
        return None, False

    def asked():
        wanted = bool(stop and stop())
        return runtime.all_reduce_sum(float(wanted), run.device, run.dist) > 0 if run.fsdp else wanted

    val = None
    if run.dist.is_master or run.fsdp:
        model = runtime.NoInferenceMode(run.model) if run.fsdp else run.model
        batches = (to_device(b, run.device) for b in run.val_batches())
        try:
            val = evaluate_loss(model, batches, run.device, run.ctx, stop=asked)["loss"]
        except Stopped:
            val = "stopped"
    val = runtime.broadcast_object(val, run.dist)
    return (None, True) if val == "stopped" else (val, False)
