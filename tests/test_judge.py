"""The judge task (judge.py through eval.py) against a real OpenAI-compatible server: transformers' own
`transformers serve`, started here as a subprocess on the CPU, serving tiny local models. A forwarding
proxy in front of it injects the server errors that retries must survive and records what was sent.

    python -m pytest -q tests/test_judge.py
"""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import pytest
import torch

import eval as eval_script
from homegpt import judge
import train
from homegpt.errors import UserError
from helpers import tiny_train_config

pytest.importorskip("fastapi", reason="transformers serve needs transformers[serving] (in the dev extra)")
pytest.importorskip("uvicorn", reason="transformers serve needs transformers[serving] (in the dev extra)")
transformers = pytest.importorskip("transformers")

ITEMS = [{"instruction": "Name a fruit.", "input": "", "output": "apple"},
         {"instruction": "Name a colour.", "input": "", "output": "green"},
         {"instruction": "Translate to French.", "input": "the cat", "output": "le chat"},
         {"instruction": "Name an animal.", "input": "", "output": "tiger"},
         {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hf_judge_dir(path, reply=None, seed=0):
    """A tiny random GPT-2 Hugging Face directory with a plain chat template. With `reply` (one GPT-2
    token, e.g. ' 85'), the model always answers exactly that: the final LayerNorm outputs a multiple of
    the token's embedding (so its logit is the largest for any input) and the token is its end-of-sequence."""
    from homegpt.export import write_gpt2_tokenizer
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50257, n_positions=512))
    path.mkdir(parents=True)
    write_gpt2_tokenizer(path, 512)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    if reply is not None:
        (tid,) = tok.encode(reply)
        with torch.no_grad():
            w = m.transformer.wte.weight
            w[tid] *= 3
            m.transformer.ln_f.weight.zero_()
            m.transformer.ln_f.bias.copy_(100 * w[tid])
        m.config.eos_token_id = m.generation_config.eos_token_id = tid
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    d = tmp_path_factory.mktemp("judges")
    return {"85": hf_judge_dir(d / "says-85", " 85"), "word": hf_judge_dir(d / "says-excellent", " Excellent"),
            "random": hf_judge_dir(d / "random")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`transformers serve` on a free port, offline, CPU; the request's "model" names a local directory.
    An empty HF_HOME keeps the user's cache out; the log goes to a file (a full pipe would block it)."""
    port, d = free_port(), tmp_path_factory.mktemp("serve")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_UPDATE_CHECK="1",
               HF_HOME=str(d / "hf-home"), OMP_NUM_THREADS="1")
    log = open(d / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", "--device", "cpu",
                             "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"transformers serve did not start: {(d / 'serve.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url + "/v1"
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


class Proxy:
    """Forwards POSTs to the server; the first len(fail) requests get those HTTP codes instead. Records
    every request's headers and JSON body."""

    def __init__(self, target):
        self.target, self.fail, self.seen, self.forwarded = target, [], [], 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                proxy.seen.append((dict(self.headers), json.loads(body)))
                if proxy.fail:
                    code, message = proxy.fail.pop(0), "injected"
                    if isinstance(code, tuple):
                        code, message = code
                    self.send_response(code)
                    if code in (429, 503):
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(json.dumps({"error": {"message": message}}).encode())
                    return
                req = urllib.request.Request(proxy.target + self.path.removeprefix("/v1"), data=body,
                                             headers={"Content-Type": "application/json"}, method="POST")
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        code, data = r.status, r.read()
                except urllib.error.HTTPError as e:
                    code, data = e.code, e.read()
                proxy.forwarded += 1
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def proxy(server):
    p = Proxy(server)
    yield p
    p.httpd.shutdown()


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """One of our runs, tuned on instruction records (so its checkpoint records Alpaca's template)."""
    d = tmp_path_factory.mktemp("judged")
    data = d / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ITEMS * 4))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    train.main(tiny_train_config(d, d / "out-instruct", sft_train_file=str(data), block_size=64, max_iters=2,
                                 eval_interval=2))
    return d


def evaluate(model_run, tmp_path, **kw):
    cfg = dict(models=str(model_run / "out-instruct"), tasks="judge", data_file=str(model_run / "test.jsonl"),
               max_new_tokens=6, device="cpu", dtype="float32", progress=False, out_file=str(tmp_path / "r.json"))
    cfg.update(kw)
    res = eval_script.main(eval_script.EvalConfig(**cfg))
    return res[cfg["models"]]["judge"]


# ----------------------------------------------------------------------------- against the server

def test_scores_come_from_the_server_in_the_openai_format(model_run, judges, proxy, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test-123")
    r = evaluate(model_run, tmp_path, judge_url=proxy.url, judge_model=str(judges["85"]), judge_key_env="JUDGE_KEY")
    assert (r["mean_score"], r["n"], r["n_scored"], r["n_unparseable"], r["n_failed"]) == (85, 5, 5, 0, 0)
    headers, body = proxy.seen[0]
    assert headers["Authorization"] == "Bearer sk-test-123"
    assert body["model"] == str(judges["85"]) and body["temperature"] == 0
    assert body["max_tokens"] == judge.JUDGE_MAX_TOKENS and body["stream"] is False
    (msg,) = body["messages"]
    assert msg["role"] == "user"
    prompts = [b["messages"][0]["content"] for _, b in proxy.seen]
    # each prompt holds its item's instruction, input, reference and the model's answer
    french = next(p for p in prompts if "Translate to French." in p)
    assert "the cat" in french and "le chat" in french
    by_instruction = {it["instruction"]: it for it in r["items"]}
    for it in by_instruction.values():
        assert it["judge_reply"] == " 85" and it["score"] == 85
        assert it["prompt"].startswith("Below is an instruction")  # the run's own (Alpaca) template
        assert judge.judge_prompt(it, it["answer"]) in prompts
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["results"][str(model_run / "out-instruct")]["judge"]["mean_score"] == 85


def test_unparseable_replies_are_counted_and_shown_never_zero(model_run, judges, proxy, tmp_path, capsys):
    r = evaluate(model_run, tmp_path, judge_url=proxy.url, judge_model=str(judges["word"]))
    assert (r["mean_score"], r["n_scored"], r["n_unparseable"]) == (None, 0, 5)
    assert all(it["judge_reply"] == " Excellent" and it["score"] is None for it in r["items"])
    out = capsys.readouterr().out
    assert "5 unparseable" in out and "' Excellent'" in out


def test_server_errors_are_retried(model_run, judges, proxy, tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(judge, "time", types.SimpleNamespace(sleep=waits.append))
    proxy.fail = [503, 429, 502, 500]
    r = evaluate(model_run, tmp_path, judge_url=proxy.url, judge_model=str(judges["85"]), judge_workers=1)
    assert (r["n_scored"], r["n_failed"], r["mean_score"]) == (5, 0, 85)
    assert len(proxy.seen) == 9 and proxy.forwarded == 5  # 4 refused tries, then each item once
    assert waits == [0, 0, 4.0, 8.0]  # the server's Retry-After: 0, then doubling backoff from 1 s


def test_a_parameter_the_server_refuses_by_name_is_sent_another_way(model_run, judges, proxy, tmp_path):
    # what OpenAI's reasoning models answer to max_tokens
    proxy.fail = [(400, "Unsupported parameter: 'max_tokens' is not supported with this model. "
                        "Use 'max_completion_tokens' instead.")]
    r = evaluate(model_run, tmp_path, judge_url=proxy.url, judge_model=str(judges["85"]), judge_workers=1)
    assert (r["n_scored"], r["n_failed"]) == (5, 0)
    bodies = [b for _, b in proxy.seen]
    assert "max_tokens" in bodies[0] and all("max_tokens" not in b for b in bodies[1:])
    assert all(b["max_completion_tokens"] == judge.JUDGE_MAX_TOKENS for b in bodies[1:])


def test_requests_that_keep_failing_are_counted_then_retried_alone_by_a_rerun(model_run, judges, proxy, tmp_path):
    proxy.fail = [503] * 4  # item 1 and 2: two tries each (judge_retries=1), both refused
    r = evaluate(model_run, tmp_path, judge_url=proxy.url, judge_model=str(judges["85"]), judge_workers=1,
                 judge_retries=1)
    assert (r["n_scored"], r["n_failed"]) == (3, 2)
    assert sum(1 for it in r["items"] if it["error"] and "HTTP 503" in it["error"]) == 2
    proxy.seen.clear()
    again = evaluate(model_run, tmp_path, judge_url=proxy.url, judge_model=str(judges["85"]))
    assert (again["n_scored"], again["n_failed"], again["answers_reused"], again["judge_requests"]) == (5, 0, 5, 2)
    assert len(proxy.seen) == 2


def test_a_rerun_reuses_a_partial_results_file(model_run, judges, proxy, tmp_path, monkeypatch):
    first = evaluate(model_run, tmp_path, judge_url=proxy.url, judge_model=str(judges["85"]))
    path = tmp_path / "r.judge.jsonl"
    assert first["results_file"] == str(path)
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 10  # an answer record and a scored record per item
    # as if killed while scoring item 3: five answers, two scores, and half a line
    path.write_text("".join(lines[:7]) + lines[7][:20])
    from homegpt import sft
    calls = []
    monkeypatch.setattr(sft, "generate_answers", lambda *a, **k: calls.append(a) or ([], 0))
    proxy.seen.clear()
    again = evaluate(model_run, tmp_path, judge_url=proxy.url, judge_model=str(judges["85"]))
    assert not calls, "every answer was in the file: nothing is generated again"
    assert (again["answers_reused"], again["judge_requests"], len(proxy.seen)) == (5, 3, 3)
    assert [it["answer"] for it in again["items"]] == [it["answer"] for it in first["items"]]
    assert again["mean_score"] == 85 and again["n_scored"] == 5
    # another judge scores afresh, on the same answers
    other = evaluate(model_run, tmp_path, judge_url=proxy.url, judge_model=str(judges["word"]))
    assert (other["judge_requests"], other["n_unparseable"]) == (5, 5)


def test_a_refusal_stops_the_run_with_the_servers_words(model_run, judges, proxy, tmp_path):
    proxy.fail = [401]
    with pytest.raises(judge.JudgeError, match="HTTP 401.*injected"):
        evaluate(model_run, tmp_path, judge_url=proxy.url, judge_model=str(judges["85"]), judge_workers=1)
    kept = [json.loads(line) for line in (tmp_path / "r.judge.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in kept if r["answer"] is not None}) == 5, "the answers stay for the rerun"
    assert all(r["score"] == 85 for r in kept if r["judge_reply"] is not None)  # (one in flight may finish)


def test_two_models_side_by_side_on_the_same_items(model_run, judges, proxy, tmp_path, capsys):
    run = str(model_run / "out-instruct")
    cfg = eval_script.EvalConfig(models=f"{run},{judges['random']}", tasks="judge", judge_url=proxy.url,
                                 judge_model=str(judges["85"]), data_file=str(model_run / "test.jsonl"),
                                 max_new_tokens=4, device="cpu", dtype="float32", progress=False,
                                 out_file=str(tmp_path / "r.json"))
    res = eval_script.main(cfg)
    assert [res[m]["judge"]["n_scored"] for m in (run, str(judges["random"]))] == [5, 5]
    table = capsys.readouterr().out
    assert "mean_score" in table and "85.0000" in table


# ----------------------------------------------------------------------------- in process, and the knobs

def test_a_local_hugging_face_model_judges_in_process(model_run, judges, tmp_path):
    r = evaluate(model_run, tmp_path, judge=str(judges["85"]))
    assert (r["mean_score"], r["n_scored"]) == (85, 5)
    rnd = evaluate(model_run, tmp_path, judge=str(judges["random"]), out_file=str(tmp_path / "rnd.json"))
    assert rnd["n"] == 5 and all(it["judge_reply"] is not None for it in rnd["items"])
    assert rnd["n_scored"] + rnd["n_unparseable"] == 5


def test_parse_score_takes_the_first_number_from_0_to_100():
    assert judge.parse_score(" 85") == 85
    assert judge.parse_score("Score: 72/100") == 72
    assert judge.parse_score("I would give it 90.6") == 91
    assert judge.parse_score("100") == 100 and judge.parse_score("0") == 0
    for reply in ("", "Excellent", "250", None):
        assert judge.parse_score(reply) is None


def test_judge_knobs_are_checked_before_any_work(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    for kw, msg in (({}, "needs one judge"),
                    ({"judge_url": "http://x/v1", "judge": "d"}, "needs one judge"),
                    ({"judge_url": "http://x/v1"}, "needs --judge_model"),
                    ({"judge_url": "https://api.openai.com/v1", "judge_model": "gpt-4o"}, "export OPENAI_API_KEY"),
                    ({"judge": "d", "judge_workers": 0}, "judge_workers=0 must be positive")):
        with pytest.raises(UserError, match=msg):
            eval_script.main(eval_script.EvalConfig(tasks="judge", **kw))
