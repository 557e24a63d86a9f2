"""
Answers scored by a judge model: each test instruction is answered by the model (greedy, bounded
length), then a judge reads the instruction, its input, the reference answer and the model's answer
and replies with an integer from 0 to 100. The mean over the items is the model's score.

    python eval.py --out_dir=out-instruct --tasks=judge --judge_url=http://localhost:8000/v1 --judge_model=NAME
    python eval.py --models=out-base-instruct,out-instruct --tasks=judge --judge=path/to/hf/model

Two judges: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp's server,
Ollama, transformers serve), spoken to with the standard library; or a local Hugging Face model
directory run in this process. Requests run a few at a time, time out, and retry with backoff on
429, 5xx and dropped connections; any other HTTP error (a wrong key or model name) stops the run with
the server's words.

Nothing is thrown away and nothing is paid twice: every answer and every score is appended to a
JSON-lines results file as it arrives, and a rerun reuses what the file holds (answers per model,
prompt and length; scores per judge as well). A reply with no number from 0 to 100 in it is counted
and shown as unparseable, never turned into a zero; the mean is over the parsed scores.
"""

import hashlib
import json
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from homegpt.errors import UserError
from homegpt import sft
from homegpt.evaluation import progress_bar
from homegpt.fileio import atomic_write, read_json_lines

JUDGE_PROMPT = """You are grading a response to an instruction against a reference answer.

Instruction:
{instruction}
{input_block}
Reference answer:
{reference}

Response to grade:
{answer}

Score the response from 0 (wrong or useless) to 100 (as good as the reference answer). Reply with the integer only."""
JUDGE_MAX_TOKENS = 16  # the judge replies with a number; a little room for "Score: 85"
MAX_BACKOFF = 30.0  # seconds: the longest wait between two tries of one request
GENERATE_CHUNK = 64  # answers generated between two appends to the results file


class JudgeError(UserError):
    """The judge refused in a way a retry cannot fix (bad key, unknown model, malformed request)."""


class TransientError(Exception):
    """The judge could not be reached or was overloaded through every retry."""


def judge_prompt(item, answer):
    block = f"\nInput:\n{item['input']}\n" if item["input"].strip() else ""
    return JUDGE_PROMPT.format(instruction=item["instruction"], input_block=block, reference=item["reference"],
                               answer=answer)


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_score(reply):
    """The first number in the reply, rounded, when it lies in 0..100; else None (unparseable)."""
    m = _NUMBER.search(reply or "")
    if not m:
        return None
    v = float(m.group())
    return round(v) if 0 <= v <= 100 else None


# ----------------------------------------------------------------------------- the judges

class HTTPJudge:
    """An OpenAI-compatible chat-completions endpoint: POST {url}/chat/completions, greedy, a short reply."""

    def __init__(self, url, model, api_key=None, timeout=60.0, retries=5, workers=4, backoff=1.0):
        url = url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.retries, self.workers, self.backoff = retries, workers, backoff
        self.name = f"{model} @ {url}"
        # OpenAI's reasoning models refuse max_tokens (they take max_completion_tokens) and any
        # temperature but 1: such a refusal names the parameter, and the request is sent again without it
        self.rejected = set()

    def request_body(self, prompt):
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": 0, "max_tokens": JUDGE_MAX_TOKENS, "stream": False}
        for key in self.rejected:  # what this server refused by name (see ask)
            if key == "max_tokens":
                body["max_completion_tokens"] = body.pop("max_tokens")
            else:
                body.pop(key)
        return body

    def ask(self, prompt):
        """The judge's reply text. Raises TransientError after the retries, JudgeError at once for a refusal."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last, attempt = None, 0
        while attempt <= self.retries:
            if last:
                time.sleep(last[1])
            data = json.dumps(self.request_body(prompt)).encode()
            req = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            attempt += 1
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return self._content(json.loads(r.read().decode("utf-8", "replace")))
            except urllib.error.HTTPError as e:
                detail = e.read()[:500].decode("utf-8", "replace")
                refused = [k for k in ("max_tokens", "temperature") if e.code == 400 and f"'{k}'" in detail]
                if refused and not set(refused) <= self.rejected:
                    self.rejected.update(refused)
                    print(f"judge: {self.endpoint} refuses {', '.join(refused)}; asking without it")
                    last, attempt = None, attempt - 1  # not a failure of the server: no wait, no try used
                    continue
                if e.code != 429 and e.code < 500:
                    raise JudgeError(f"the judge at {self.endpoint} answered HTTP {e.code}: {detail} (check "
                                     f"--judge_model, the key in the environment variable, and the URL)") from e
                last = (f"HTTP {e.code}: {detail}", self._wait(attempt - 1, e.headers.get("Retry-After")))
            except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
                last = (f"{type(e).__name__}: {getattr(e, 'reason', e)}", self._wait(attempt - 1, None))
        raise TransientError(f"{self.endpoint}: no reply after {self.retries + 1} tries; last: {last[0]}")

    def _wait(self, attempt, retry_after):
        """Seconds before the next try: the server's Retry-After when it gives one, else doubling backoff."""
        try:
            if retry_after is not None:
                return min(float(retry_after), MAX_BACKOFF)
        except ValueError:  # an HTTP date instead of seconds: fall back to our own backoff
            pass
        return min(self.backoff * 2 ** attempt, MAX_BACKOFF)

    def _content(self, reply):
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise JudgeError(f"{self.endpoint} did not answer like an OpenAI chat completion: {str(reply)[:300]}") from e
        return content or ""


class LocalJudge:
    """A Hugging Face causal LM directory, run in this process: its chat template when it has one,
    greedy decoding of a short reply."""

    workers = 1

    def __init__(self, path, device="cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"--judge={path}: not a Hugging Face model directory (no config.json); for a server "
                            f"use --judge_url and --judge_model")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        self.device, self.name = device, f"local:{Path(path).resolve()}"

    def ask(self, prompt):
        import torch
        tok = self.tokenizer
        if tok.chat_template:
            enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_dict=True, return_tensors="pt")
        else:
            enc = tok(prompt, return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=JUDGE_MAX_TOKENS,
                                      do_sample=False, pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, ids.size(1):], skip_special_tokens=True)


# ----------------------------------------------------------------------------- the results file

class ResultsFile:
    """The JSON-lines record of every answer and score, appended as they arrive (thread-safe); the
    last record of an item wins when it is read back."""

    def __init__(self, path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.records = {}
        if self.path.exists():
            text = self.path.read_bytes()
            if text and not text.endswith(b"\n"):  # a killed run's half line: cut it, so appends start clean
                atomic_write(self.path, [text[:text.rfind(b"\n") + 1]])
            for r in read_json_lines(self.path):
                self.records[self._key(r)] = r

    @staticmethod
    def _key(r):
        return r["model"], r["id"], r["max_new_tokens"]

    def get(self, model, item_id, max_new_tokens):
        return self.records.get((model, item_id, max_new_tokens))

    def put(self, record):
        with self.lock:
            self.records[self._key(record)] = record
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()


# ----------------------------------------------------------------------------- a model judged

def load_items(path, template=None, limit=0):
    """Test items from an SFT file: instruction, input, reference answer and the prompt the model sees
    (its own template: the dict recorded in its checkpoint, a template string, or Alpaca's)."""
    records = sft.read_records(path)[:limit or None]
    items = []
    for r in records:
        prompt = sft.format_example(r, template)["prompt"]
        if "instruction" in r:
            item = {"instruction": r["instruction"], "input": r["input"], "reference": r["output"]}
        else:
            item = {"instruction": r["prompt"], "input": "", "reference": r["completion"]}
        item["prompt"] = prompt
        item["id"] = hashlib.sha256(f"{prompt}\0{item['reference']}".encode()).hexdigest()[:16]
        items.append(item)
    return items


def judge_model(spec, model, tokenizer, items, judge, results, device, ctx, max_new_tokens=256, batch_size=16,
                progress=True):
    """Answer every item (reusing answers in `results`), have `judge` score them (reusing its scores),
    and summarise: mean score, counts, the unparseable replies and the failed requests."""
    todo = [it for it in items if results.get(spec, it["id"], max_new_tokens) is None]
    reused = len(items) - len(todo)
    for i in progress_bar(range(0, len(todo), GENERATE_CHUNK), progress and len(todo) > GENERATE_CHUNK,
                          f"{spec} answers"):
        chunk = todo[i:i + GENERATE_CHUNK]
        answers, _ = sft.generate_answers(model, tokenizer, [it["prompt"] for it in chunk], device, ctx,
                                          max_new_tokens, batch_size, progress=progress)
        for it, answer in zip(chunk, answers):
            results.put({"model": spec, **it, "max_new_tokens": max_new_tokens, "answer": answer,
                         "judge": None, "score": None, "judge_reply": None, "error": None})

    def scored(r):
        return r["judge"] == judge.name and r["judge_reply"] is not None

    records = [results.get(spec, it["id"], max_new_tokens) for it in items]
    to_score = [r for r in records if not scored(r)]

    def score(r):
        try:
            reply = judge.ask(judge_prompt(r, r["answer"]))
            out = dict(r, judge=judge.name, judge_reply=reply, score=parse_score(reply), error=None)
        except TransientError as e:
            out = dict(r, judge=judge.name, judge_reply=None, score=None, error=str(e))
        results.put(out)
        return out

    with ThreadPoolExecutor(max_workers=max(1, judge.workers)) as pool:
        futures = [pool.submit(score, r) for r in to_score]
        try:
            for f in progress_bar(as_completed(futures), progress and bool(futures), f"{spec} judged"):
                f.result()  # a JudgeError stops the run here; what was scored is in the file
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    final = [results.get(spec, it["id"], max_new_tokens) for it in items]
    return summarise(final, judge.name, reused, len(to_score), str(results.path))


def summarise(records, judge_name, reused_answers, asked, path):
    """The judge task's numbers: the mean over the parsed scores, the counts, and every item as JSON."""
    scores = [r["score"] for r in records if r["score"] is not None]
    unparseable = [r for r in records if r["judge_reply"] is not None and r["score"] is None]
    failed = [r for r in records if r["error"]]
    keep = ("id", "instruction", "input", "prompt", "answer", "reference", "score", "judge_reply", "error")
    return {"mean_score": sum(scores) / len(scores) if scores else None, "n": len(records),
            "n_scored": len(scores), "n_unparseable": len(unparseable), "n_failed": len(failed),
            "judge": judge_name, "results_file": path, "answers_reused": reused_answers,
            "judge_requests": asked, "max_new_tokens": records[0]["max_new_tokens"] if records else None,
            "items": [{k: r[k] for k in keep} for r in records]}


def format_judge_report(spec, result, show=5):
    """What a person reads: the mean and its counts, then the replies that held no score."""
    r = result
    mean = "-" if r["mean_score"] is None else f"{r['mean_score']:.2f}"
    lines = [f"{spec}: judge score {mean} (mean over {r['n_scored']} scored of {r['n']} items; "
             f"{r['n_unparseable']} unparseable, {r['n_failed']} failed) by {r['judge']}; {r['answers_reused']} "
             f"answers and {r['n'] - r['judge_requests']} scores reused from {r['results_file']}"]
    bad = [it for it in r["items"] if it["judge_reply"] is not None and it["score"] is None]
    for it in bad[:show]:
        lines.append(f"  unparseable reply for {it['instruction'][:50]!r}: {it['judge_reply'][:80]!r}")
    if len(bad) > show:
        lines.append(f"  ... and {len(bad) - show} more (every reply is in {r['results_file']})")
    if r["n_failed"]:
        err = next(it["error"] for it in r["items"] if it["error"])
        lines.append(f"  {r['n_failed']} request(s) failed ({err[:120]}); run again to retry only those")
    return "\n".join(lines)
