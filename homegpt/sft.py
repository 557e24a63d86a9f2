"""
Supervised fine-tuning (SFT) data: instruction or label examples -> token ids with a loss mask ->
batches whose targets are the completions only; and the generation accuracy of a model on them.

    from homegpt.dataloader import Tokenizer
    from homegpt.sft import load_examples, tokenize_examples, SFTSampler
    examples = load_examples("data/classify/train.jsonl")      # [{"prompt": ..., "completion": ...}]
    data, n_truncated = tokenize_examples(examples, Tokenizer({"tokenizer": "gpt2"}), block_size=128)
    x, y = SFTSampler(data, batch_size=8, block_size=128, seed=1337).next_batch()   # y == -1: no loss

    python train.py config/finetune_classify_lora.py             # trains on these batches
    python eval.py --out_dir=out-classify-lora --tasks=generate --data_file=data/classify/test.jsonl

Conventions:
- An example is a prompt and a completion. The loss covers the completion and the end-of-text token
  after it (so the model learns to stop), never the prompt: y[t] = -1 wherever the next token is not
  a target, and the model ignores -1 targets. Prompt and completion are tokenized separately, exactly
  as generation sees them (the prompt encoded alone, the completion generated after it).
- Loss normalisation is the caller's: sum the token losses of every micro-batch and divide by the
  number of targets (y != -1) of the whole optimizer step, so that micro-batches holding different
  numbers of target tokens weigh each token equally. Averaging per micro-batch first would weigh a
  token of a micro-batch with few targets more than one of a micro-batch with many.
"""

import json
import random
import string
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from homegpt import runtime
from homegpt.errors import MissingFile, UserError, many_errors
from homegpt.dataloader import EpochOrder
from homegpt.generate import generate

# Stanford Alpaca's prompt format (Taori et al. 2023), with and without the optional input
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")
SHOT_TEMPLATE = "{prompt}{completion}\n\n"  # one demonstration of a k-shot prompt
MAX_LABELS = 20  # gold completions with at most this many distinct values are treated as class labels


# ----------------------------------------------------------------------------- reading examples

def _template_fields(template, allowed, what):
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    bad = sorted(fields - set(allowed))
    if bad:
        raise UserError(f"{what} {template!r} has unknown fields {bad}; it may use only "
                         + ", ".join("{" + a + "}" for a in allowed))
    return fields


def load_examples(path, template=None):
    """Read SFT examples: a list of {"prompt": str, "completion": str}.

    The file is JSONL (one object per line) or one JSON array (as alpaca_data.json is published).
    Records are either {"prompt", "completion"}, used as they are, or Alpaca's {"instruction",
    "input" (optional, may be empty), "output"}, formatted with the Alpaca template, or with
    `template`, a format string with {instruction} and {input} fields (None or '' for Alpaca's).
    Bad records raise one ValueError naming the file, the line and the missing fields.
    """
    check_template(template)
    return [format_example(r, template) for r in read_records(path)]


def check_template(template):
    """An instruction template (sft_template) must use {instruction} and may use {input}, nothing else."""
    if template and "instruction" not in _template_fields(template, ("instruction", "input"), "sft_template"):
        raise UserError(f"sft_template {template!r} must contain {{instruction}}")


def read_records(path):
    """The records of an SFT file, checked: {"prompt", "completion"} or {"instruction", "input", "output"}
    ("input" '' when absent). load_examples formats them; the judge needs their fields apart."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"{path}: no such file; SFT data is JSONL with prompt/completion or "
                          f"instruction/input/output records (python data/instruct/prepare.py writes some)")
    text = path.read_text(encoding="utf-8")
    errors, records = [], []
    if text.lstrip().startswith("["):
        try:
            records = [(f"record {i}", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                errors.append(f"line {lineno}: not valid JSON ({e.msg})")
    checked = []
    for where, r in records:
        try:
            checked.append(_record(r))
        except ValueError as e:
            errors.append(f"{where}: {e}")
    if errors:
        raise many_errors(f"{path}: {len(errors)} bad record(s); each needs prompt+completion or "
                          f"instruction+output (Alpaca) string fields", errors)
    if not checked:
        raise UserError(f"{path}: holds no examples")
    return checked


def _record(r):
    if not isinstance(r, dict):
        raise UserError(f"expected a JSON object, got {type(r).__name__}")
    if "prompt" in r or "completion" in r:
        fields = ("prompt", "completion")
    elif "instruction" in r or "output" in r:
        fields = ("instruction", "output")
    else:
        raise UserError(f"missing fields: found keys {sorted(r)[:8]}")
    missing = [f for f in fields if not isinstance(r.get(f), str)]
    if missing:
        raise UserError(f"missing or non-string fields {missing}")
    if fields[0] == "prompt":
        return {"prompt": r["prompt"], "completion": r["completion"]}
    inp = r.get("input") or ""
    if not isinstance(inp, str):
        raise UserError(f"field 'input' must be a string, got {type(inp).__name__}")
    return {"instruction": r["instruction"], "input": inp, "output": r["output"]}


def prompt_templates(template=None):
    """The prompt formats a run applies to instruction records, as recorded in its checkpoint (data_meta)
    so that chat and the judge wrap an instruction exactly as training did: {"input": ..., "no_input": ...}."""
    if template:
        return {"input": template, "no_input": template}
    return {"input": ALPACA_TEMPLATE, "no_input": ALPACA_TEMPLATE_NO_INPUT}


def format_example(r, template=None):
    """A record of read_records as {"prompt", "completion"}: instruction records through `template`
    (a string, Alpaca's when None, or a checkpoint's prompt_templates dict), prompt/completion records
    as they are."""
    if "prompt" in r:
        return {"prompt": r["prompt"], "completion": r["completion"]}
    formats = template if isinstance(template, dict) else prompt_templates(template)
    fmt = formats["input"] if r["input"].strip() else formats["no_input"]
    return {"prompt": fmt.format(instruction=r["instruction"], input=r["input"]), "completion": r["output"]}


# ----------------------------------------------------------------------------- tokens and masks

def tokenize_examples(examples, tokenizer, block_size):
    """Token ids and target masks: ([(ids int64 (n,), mask bool (n,)), ...], n_truncated).

    ids = prompt tokens + completion tokens + end-of-text (when the tokenizer has one); mask is True on
    the completion and the end-of-text. A window of block_size positions sees block_size+1 tokens,
    so longer examples are truncated: the prompt keeps its tail (the question and the cue just before
    the answer, e.g. "### Response:" or "Label:"), as much of it as leaves room for the whole
    completion, but at least half the window; the completion then keeps its head. n_truncated counts
    the examples that were cut; a cut example left with no target is dropped (len(result) tells how
    many remain). The first token is never a target: nothing before it predicts it.
    """
    L = block_size + 1
    eot = [tokenizer.eot] if tokenizer.eot is not None else []
    out, n_truncated = [], 0
    for i, ex in enumerate(examples):
        try:
            p = list(tokenizer.encode(ex["prompt"]))
            c = list(tokenizer.encode(ex["completion"])) + eot
        except ValueError as e:
            raise UserError(f"SFT example {i}: {e}") from e
        if not c:
            raise UserError(f"SFT example {i} has an empty completion and the tokenizer has no end-of-text "
                             f"token: nothing to learn; remove it or give it a completion")
        if len(p) + len(c) > L:
            n_truncated += 1
            keep = min(len(p), max(L - len(c), L // 2))
            p, c = p[len(p) - keep:], c[:L - keep]
        ids = np.array(p + c, dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        mask[len(p):] = True
        if mask[1:].any():
            out.append((ids, mask))
    return out, n_truncated


def _rows(tokenized, T):
    """(x, y) int64 (B, T) from examples laid out right-padded: one example per row."""
    x = np.zeros((len(tokenized), T), dtype=np.int64)
    y = np.full((len(tokenized), T), -1, dtype=np.int64)
    for r, (ids, mask) in enumerate(tokenized):
        n = len(ids) - 1
        x[r, :n] = ids[:-1]
        y[r, :n] = np.where(mask[1:], ids[1:], -1)  # position t predicts token t+1 where that is a target
    return x, y


class SFTSampler:
    """Batches of SFT examples: every example once per epoch, in a seeded order that changes each epoch.

    Padding mode: one example per row, right-padded to the longest example of the batch (at most
    block_size); padded positions are never targets, and causal attention keeps them from affecting
    the real positions. Packing mode: whole examples are laid end to end in rows of exactly
    block_size (an example that does not fit starts the next row; the rest is padding). A position
    only ever predicts a token of its own example, so targets never cross into the next example's
    prompt. Attention, though, still sees the earlier examples of the row and the positions do not
    restart at 0 (the model has no per-example mask); this is the common trade-off of packing:
    fewer wasted positions, a little context from unrelated examples.

    The position is one global counter of examples consumed by all ranks together (as
    dataloader.SequentialSampler): rank r takes examples [cursor + r*B, cursor + (r+1)*B); packed,
    every rank lays out the rows of all ranks (index arithmetic only) and builds its own B rows. So
    ranks never share an example, and state_dict() resumes exactly, on any world size.
    """

    def __init__(self, tokenized, batch_size, block_size, seed, rank=0, world_size=1, packing=False):
        if not tokenized:
            raise UserError("no SFT examples to sample from (the file was empty or every example was "
                             "dropped by truncation; use a larger block_size)")
        longest = max(len(ids) for ids, _ in tokenized)
        assert longest <= block_size + 1, f"an example has {longest} tokens > block_size+1: tokenize_examples first"
        assert 0 <= rank < world_size, f"rank {rank} of world size {world_size}"
        self.tokenized, self.batch_size, self.block_size = tokenized, batch_size, block_size
        self.seed, self.rank, self.world_size, self.packing = seed, rank, world_size, packing
        self.n_examples = len(tokenized)
        self.cursor = 0
        self._index = EpochOrder(self.n_examples, seed)  # position in the stream of epochs -> example

    def next_batch(self):
        B, W = self.batch_size, self.world_size
        if not self.packing:
            base = self.cursor + self.rank * B
            batch = [self.tokenized[self._index(base + j)] for j in range(B)]
            self.cursor += W * B
            return _rows(batch, max(len(ids) for ids, _ in batch) - 1)
        # packing: lay out the rows of every rank from the global stream, keep this rank's
        rows, g, L = [], self.cursor, self.block_size + 1
        for _ in range(W * B):
            row, used = [], 0
            while True:
                n = len(self.tokenized[self._index(g)][0])
                if row and used + n > L:
                    break
                row.append(g)
                used, g = used + n, g + 1
            rows.append(row)
        self.cursor = g
        buf = np.zeros((B, L), dtype=np.int64)  # a row holds block_size+1 tokens: x = buf[:, :-1]
        y = np.full((B, self.block_size), -1, dtype=np.int64)
        for r, row in enumerate(rows[self.rank * B:(self.rank + 1) * B]):
            s = 0
            for gi in row:
                ids, mask = self.tokenized[self._index(gi)]
                n = len(ids)
                buf[r, s:s + n] = ids
                # an example's last token predicts nothing: the token after it is another example's
                y[r, s:s + n - 1] = np.where(mask[1:], ids[1:], -1)
                s += n
        return buf[:, :-1], y

    @property
    def epoch(self):
        return self.cursor / self.n_examples

    def state_dict(self):
        return {"kind": "sft", "cursor": self.cursor, "seed": self.seed, "n_examples": self.n_examples,
                "packing": self.packing}

    def load_state_dict(self, state):
        assert state["kind"] == "sft", f"cannot resume a {state['kind']} sampler as an SFT one"
        if state["n_examples"] != self.n_examples:
            raise UserError(f"the SFT data has {self.n_examples} examples but the checkpoint's sampler had "
                             f"{state['n_examples']}: sft_train_file or block_size changed since the checkpoint")
        self.cursor, self.seed = state["cursor"], state["seed"]
        self._index = EpochOrder(self.n_examples, self.seed)


def sft_eval_batches(tokenized, batch_size, block_size, max_batches=0):
    """The fixed validation batches: examples in file order, right-padded, the first max_batches
    batches (all when <= 0). The loss over y != -1 is the validation loss on target tokens only."""
    assert all(len(ids) <= block_size + 1 for ids, _ in tokenized), "tokenize_examples with this block_size first"
    n = len(tokenized) if max_batches <= 0 else min(len(tokenized), max_batches * batch_size)
    for i in range(0, n, batch_size):
        chunk = tokenized[i:min(i + batch_size, n)]
        yield _rows(chunk, max(len(ids) for ids, _ in chunk) - 1)


# ----------------------------------------------------------------------------- generation accuracy

def normalize(text):
    """Exact-match normal form: whitespace runs collapsed, ends stripped, lower case."""
    return " ".join(text.split()).lower()


def choose_shots(shots, k, seed=0, exclude=()):
    """k demonstrations from shots (dicts with prompt/completion), seeded, skipping prompts in exclude.

    When the completions form a small label set, the shots go round-robin over the labels (in a seeded
    order), so that k >= number of labels shows every class once; otherwise a seeded random sample.
    """
    exclude = set(exclude)
    pool = [s for s in shots if s["prompt"] not in exclude]
    if len(pool) < k:
        raise UserError(f"k_shot={k} but only {len(pool)} shot examples are available (outside the test set)")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    groups = {}
    for i in order:
        groups.setdefault(normalize(pool[i]["completion"]), []).append(pool[i])
    if len(groups) > MAX_LABELS:
        return [pool[i] for i in order[:k]]
    queues, picked = list(groups.values()), []
    while len(picked) < k:
        for q in queues:
            if q and len(picked) < k:
                picked.append(q.pop(0))
    return picked


def few_shot_prefix(chosen, template=None):
    """The demonstrations in front of each test prompt: template ('{prompt}{completion}\\n\\n') per shot."""
    template = template or SHOT_TEMPLATE
    fields = _template_fields(template, ("prompt", "completion"), "the shot template")
    if fields != {"prompt", "completion"}:
        raise UserError(f"the shot template {template!r} must contain {{prompt}} and {{completion}}")
    return "".join(template.format(prompt=s["prompt"], completion=s["completion"]) for s in chosen)


def evaluate_generation(model, tokenizer, examples, device, ctx, max_new_tokens=16, k_shot=0, shots=None,
                        template=None, batch_size=16, seed=0, progress=True):
    """Greedy generation of each example's completion; exact-match accuracy, per-class table, confusion.

    Generation: generate_answers (greedy, KV cache, equal-length prompts batched; n_cropped counts the
    prompts cut to fit the window). Answer: the text up to the first end-of-text token; when the gold completion is one
    line (labels, short answers), leading whitespace is dropped and the answer ends at the first
    newline. Prediction and gold are compared after normalize() (whitespace and case).
    Classes: when the gold completions take at most 20 distinct values, a per-class table (n,
    predicted, correct, precision, recall, F1), macro F1 and the confusion counts (gold -> predicted;
    predictions outside the label set count as '<other>').
    k-shot baseline: k_shot demonstrations chosen from `shots` (choose_shots, the same for every test
    example, none of them a test prompt) are put before each prompt, formatted by `template`
    (default '{prompt}{completion}\\n\\n'); the model is not trained.
    progress: a bar over the examples on a terminal (generate_answers).
    Returns a JSON-able dict; format_generation_report(result) prints it.
    """
    if not examples:
        raise UserError("evaluate_generation: no examples")
    if k_shot > 0 and not shots:
        raise UserError(f"k_shot={k_shot} needs shot examples (the training file), got none")
    chosen = choose_shots(shots, k_shot, seed, exclude=[e["prompt"] for e in examples]) if k_shot > 0 else []
    prefix = few_shot_prefix(chosen, template) if k_shot > 0 else ""
    texts, n_cropped = generate_answers(model, tokenizer, [prefix + ex["prompt"] for ex in examples], device, ctx,
                                        max_new_tokens, batch_size, progress=progress)
    predictions, golds = [], []
    for ex, text in zip(examples, texts):
        if "\n" not in ex["completion"].strip():
            text = text.lstrip().split("\n", 1)[0]
        predictions.append(normalize(text))
        golds.append(normalize(ex["completion"]))
    correct = sum(p == g for p, g in zip(predictions, golds))
    result = {"n": len(examples), "correct": correct, "accuracy": correct / len(examples), "k_shot": k_shot,
              "n_cropped": n_cropped, "max_new_tokens": max_new_tokens, "predictions": predictions,
              "golds": golds, "labels": None}
    if k_shot:
        result["shots"] = chosen
    counts = Counter(golds)
    if len(counts) <= MAX_LABELS:
        result.update(_classes(golds, predictions, counts))
    return result


def generate_answers(model, tokenizer, prompts, device, ctx, max_new_tokens, batch_size=16, progress=True):
    """Greedy answers to text prompts: (texts, n_cropped). Each text is what the model generated up
    to its first end-of-text token.

    Prompts of equal token length share a batch (no padding, so a batch gives the same tokens as one
    at a time up to float rounding), and a batch ends once every row has produced end-of-text. A
    prompt longer than block_size - max_new_tokens (but at least half the window) keeps its tail, so
    the answer is generated without the window sliding; n_cropped counts them. An empty prompt starts
    from end-of-text, as GPT-2 documents do. progress: a bar counting the answers, on a terminal only
    (runtime.progress).
    """
    ctx = ctx if ctx is not None else nullcontext()
    device = torch.device(device)
    block_size = model.config.block_size
    max_prompt = max(block_size - max_new_tokens, block_size // 2)
    encoded, n_cropped = [], 0
    for i, text in enumerate(prompts):
        ids = list(tokenizer.encode(text))
        if not ids:  # generation needs a first token: GPT-2 documents start after <|endoftext|>
            if tokenizer.eot is None:
                raise UserError(f"example {i} has an empty prompt: give it a prompt to generate from")
            ids = [tokenizer.eot]
        if len(ids) > max_prompt:
            ids, n_cropped = ids[-max_prompt:], n_cropped + 1
        encoded.append(ids)
    generated = [None] * len(prompts)
    by_len = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    batches = [(n, idxs[j:j + batch_size]) for n, idxs in sorted(by_len.items())
               for j in range(0, len(idxs), batch_size)]
    bar = runtime.progress(None, "generating", total=len(prompts), unit="answer") if progress else None
    with bar if bar is not None else nullcontext():
        for n, chunk in batches:
            idx = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device)
            with ctx:
                out = generate(model, idx, max_new_tokens, temperature=0.0, stop_id=tokenizer.eot)
            for i, row in zip(chunk, out[:, n:].tolist()):
                generated[i] = row
            if bar is not None:
                bar.update(len(chunk))
    texts = []
    for ids in generated:
        if tokenizer.eot is not None and tokenizer.eot in ids:
            ids = ids[:ids.index(tokenizer.eot)]
        texts.append(tokenizer.decode(ids))
    return texts, n_cropped


def _classes(golds, predictions, counts):
    labels = sorted(counts, key=lambda l: (-counts[l], l))
    columns = labels + ["<other>"]
    confusion = {g: {p: 0 for p in columns} for g in labels}
    for g, p in zip(golds, predictions):
        confusion[g][p if p in counts else "<other>"] += 1
    per_class = {}
    for l in labels:
        tp = confusion[l][l]
        predicted = sum(confusion[g][l] for g in labels)
        precision = tp / predicted if predicted else 0.0
        recall = tp / counts[l]
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[l] = {"n": counts[l], "predicted": predicted, "correct": tp,
                        "precision": precision, "recall": recall, "f1": f1}
    macro_f1 = sum(c["f1"] for c in per_class.values()) / len(labels)
    return {"labels": labels, "per_class": per_class, "confusion": confusion, "macro_f1": macro_f1}


def format_generation_report(result):
    """Accuracy with n, the per-class table and the confusion matrix, as printable text."""
    r = result
    shots = f", {r['k_shot']}-shot" if r.get("k_shot") else ", 0-shot"
    lines = [f"generation exact match: {r['accuracy']:.4f} ({r['correct']}/{r['n']}){shots}, "
             f"max_new_tokens {r['max_new_tokens']}, {r['n_cropped']} prompt(s) cropped"]
    if r.get("labels"):
        w = max(8, *(len(l) for l in r["labels"])) + 2
        lines.append(f"{'label':<{w}}{'n':>6}{'pred':>7}{'correct':>9}{'precision':>11}{'recall':>8}{'f1':>7}")
        for l, c in r["per_class"].items():
            lines.append(f"{l:<{w}}{c['n']:>6}{c['predicted']:>7}{c['correct']:>9}"
                         f"{c['precision']:>11.3f}{c['recall']:>8.3f}{c['f1']:>7.3f}")
        lines.append(f"macro F1: {r['macro_f1']:.4f}")
        cols = r["labels"] + ["<other>"]
        cw = max(9, *(len(c) + 2 for c in cols))
        lines.append("confusion (rows: gold, columns: predicted)")
        lines.append(f"{'':<{w}}" + "".join(f"{c:>{cw}}" for c in cols))
        for g in r["labels"]:
            lines.append(f"{g:<{w}}" + "".join(f"{r['confusion'][g][c]:>{cw}}" for c in cols))
    wrong = [(g, p) for g, p in zip(r["golds"], r["predictions"]) if g != p][:3]
    for g, p in wrong:
        lines.append(f"  e.g. gold {g[:60]!r} -> predicted {p[:60]!r}")
    return "\n".join(lines)
