"""
The first run on a CUDA GPU: does homegpt work on this card, and how fast is it? One command, offline.

    python benchmarks/gpu_check.py                                       # everything -> gpu_check.json
    python benchmarks/gpu_check.py --out_file=rtx4090.json
    python benchmarks/gpu_check.py --parts=gpt2,sampling --compile=False  # a quicker look
    python benchmarks/gpu_check.py --parts=fp16,gptj,memory24,nanogpt,levers --nanogpt_dir=/path/to/nanoGPT
    python benchmarks/gpu_check.py --device=cpu --dry_run=True --nanogpt_dir=/path/to/nanoGPT  # no GPU: the
                                                  # prepared parts' code at tiny shapes, a minute on a CPU

Parts, in this order (--parts picks some):
  tests       `python -m pytest -q -m cuda tests/` in a subprocess, with its passed / failed counts
              (tests/test_cuda.py: bf16 and fp16 + GradScaler steps, fused AdamW, the dtype for this
              card, cached vs uncached generation, exact resume, DDP and FSDP over NCCL on one rank)
  gpt2        GPT-2 124M as config/train_gpt2.py shapes it (12 x 12 x 768, vocab 50304, block 1024):
              training steps at the config's micro-batch in runtime's dtype for the card (bf16 on
              Ampere and newer, else fp16), eager and torch.compile: ms/step, tokens/s, MFU; the
              largest micro-batch that fits (eager); measured peak memory next to memory.py's
              estimate; what the config's whole run would take on this one GPU
  chinchilla  the same for the 163M untied model of config/train_gpt2_chinchilla.py, so its
              "~45 h on a 24 GB card" can be replaced by a measured figure
  sampling    model.generate tokens/s with the KV cache, GPT-2 124M shape, random weights, batch 1,
              greedy, in the card's autocast dtype and in float32 (TF32 matmuls)
  plan        `bench.py --plan` for the GPU baby GPT (config/train_shakespeare_char.py, plan_iters
              iterations, eager), then train.py with the overrides it printed: its ETA against the
              run's wall time from process start (Tiny Shakespeare ships with the checkout)
  fp16        the baby GPT, 200 steps from one seed in bf16 and in fp16 + GradScaler (a card without
              bf16): the loss curves within fp16_tolerance, steps skipped after calibration (gpu_levers.py)
  gptj        GPT-J-6B's shape, int8 base + LoRA + adamw8bit + checkpointing, built on the GPU: one
              step's peak memory against 11 GiB and memory.py (gpu_memory.py; needs bitsandbytes)
  memory24    the allocator capped at cap_gib (24): the Chinchilla model at batch 6 and GPT-2 XL's
              fine-tune with each memory knob of its config: fits, peak, tok/s, memory.py's verdict
  nanogpt     nanoGPT's own scripts beside ours on this GPU: the baby GPT's time to val <= 1.47 and
              its val at the same wall time; GPT-2 124M tokens/s and MFU at the best micro-batch
              (gpu_sidebyside.py; needs --nanogpt_dir, skipped with a note without it)
  levers      GPT-2 124M toward 50% MFU: the baseline against for-each AdamW, eager, other
              micro-batches and compile modes, each row's effect on tokens/s (gpu_levers.py)

Every training row of gpt2 and chinchilla is bench.run_row, the function behind bench.py: a fresh
model and fused AdamW, train.train_step on random tokens already on the GPU, warm-up steps untimed
(compilation happens there), the device synchronised before every clock read, peak memory from
torch.cuda.max_memory_allocated. The largest batch is bench.find_max_batch (doubling, then
bisection), capped by max_batch and search_seconds. Nothing is downloaded and nothing installed:
random tokens, and torch, numpy, safetensors, tiktoken, tqdm, plus pytest for the tests part. The
prepared parts time the same way through gpu_rows.train_row, which also varies what bench.run_row
fixes (compile mode, fused AdamW, LoRA, an int8 base, a memory cap); gptj and memory24's 8-bit rows
need bitsandbytes, which a machine without network gets as a carried wheel (docs/gpu_check.md).

The first five parts take ~5 minutes on an H200, the last five ~9 more (estimated: docs/gpu_check.md,
which has the command a lent GPU runs). Each part prints its seconds, and --compile=False saves the
first two parts' compilations. --dry_run=True runs the last five at tiny shapes with a handful of
steps, on a CPU too (--device=cpu), so their code is tested where no GPU is (tests/test_gpu_check_prep.py).

One table at the end, every number in out_file (JSON, rewritten after each part). Exit status 1 when
a test fails, a part breaks or there is no CUDA; otherwise 0.
"""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project's modules sit at the root: run from a plain clone too
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import bench  # noqa: E402
import configurator  # noqa: E402
from homegpt.errors import UserError
from homegpt.fileio import write_json  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from homegpt.hardware import peak_flops, synchronize  # noqa: E402
from homegpt.runtime import autocast, compile_reason, cpu_model, pick_device, pick_dtype, setup_backends  # noqa: E402
from train import TrainConfig  # noqa: E402
from homegpt import memory  # noqa: E402
from gpu_levers import fp16_table, levers_table, run_fp16, run_levers  # noqa: E402
from gpu_memory import gptj_table, memory24_table, run_gptj, run_memory24  # noqa: E402
from gpu_sidebyside import nanogpt_table, run_nanogpt  # noqa: E402
from gpu_rows import past  # noqa: E402
from homegpt.generate import generate


@dataclass
class GpuCheckConfig:
    parts: str = "tests,gpt2,chinchilla,sampling,plan,fp16,gptj,memory24,nanogpt,levers"  # run in this order
    compile: bool = True  # also time torch.compile'd training (one compilation per model, ~1 min each)
    warmup: int = 2  # untimed training steps per row (compilation happens in the first)
    steps: int = 10  # timed training steps per row
    max_batch: int = 256  # the largest-batch search doubles up to this
    search_seconds: float = 60.0  # and tries no new size after this long, keeping the largest that fitted
    sample_tokens: int = 256  # new tokens per sampling measurement (1-token prompt; <= 1023 stays in the cache)
    tests_timeout: int = 300  # seconds before the test subprocess is stopped and counted as failed
    plan_iters: int = 2000  # the planned and run baby GPT's max_iters (~1 min on an A100-class card, estimated)
    plan_calibration_s: float = 30.0  # the plan's micro-batch search time
    # the prepared parts (fp16, gptj, memory24, nanogpt, levers)
    dry_run: bool = False  # tiny shapes, a handful of steps, 'eager' compile backend: their code on a CPU in a minute
    fp16_steps: int = 200  # steps of the baby GPT in each precision
    fp16_tolerance: float = 0.05  # nats: the most a window's mean loss may differ between bf16 and fp16
    cap_gib: float = 24.0  # memory24: the card size the allocator is capped at
    nanogpt_dir: str = ""  # a nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT); '' skips nanogpt
    nanogpt_wall_s: float = 90.0  # each baby GPT run (nanoGPT's and ours) is stopped after this long
    nanogpt_target: float = 1.47  # the val loss whose time from process start is compared
    nanogpt_batches: str = "16,32"  # GPT-2 124M micro-batches timed on both sides (one nanoGPT process each)
    nanogpt_bench_timeout_s: float = 300.0  # one nanoGPT bench.py run (its compilation included)
    lever_batches: str = "32,64"  # micro-batches besides the config's 16 (memory.py: 30.8 and 59.5 GiB, eager)
    lever_modes: str = "reduce-overhead,max-autotune-no-cudagraphs"  # torch.compile modes besides 'default'
    # > 0: a part, or a levers row or nanogpt micro-batch, not started this many seconds after the first
    # part is skipped, so the table comes out before a lent machine's time is up (0 = no limit)
    time_limit_s: float = 0.0
    device: str = "cuda"  # which GPU, e.g. cuda:1; cpu only with dry_run
    seed: int = 1337
    out_file: str = "gpu_check.json"


PARTS = ("tests", "gpt2", "chinchilla", "sampling", "plan", "fp16", "gptj", "memory24", "nanogpt", "levers")
DRY_PARTS = ("fp16", "gptj", "memory24", "nanogpt", "levers")  # the parts with a dry run
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MODELS = {"gpt2": ("config/train_gpt2.py", "GPT-2 124M"),
          "chinchilla": ("config/train_gpt2_chinchilla.py", "GPT-2 163M untied")}
# TrainConfig keys that shape the timed step; bench.BenchConfig uses the same names
STEP_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout", "fast_dropout", "bias",
             "qkv_bias", "tie_weights", "activation", "activation_checkpointing", "optimizer", "grad_clip")
PLAN_CONFIG = "config/train_shakespeare_char.py"  # the run the plan part plans, then runs
NO_CUDA = ("gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False); run it on a machine with an "
           "NVIDIA GPU and a CUDA build of PyTorch (this is torch {})")


def check_config(cfg):
    """The parts to run; all problems with the knobs at once as a ValueError. A dry run's default
    parts are the prepared ones, the only ones it has."""
    default = cfg.parts == GpuCheckConfig.parts
    parts = list(DRY_PARTS) if cfg.dry_run and default else [p.strip() for p in cfg.parts.split(",") if p.strip()]
    errors = []
    if not parts or any(p not in PARTS for p in parts):
        errors.append(f"parts={cfg.parts!r}: expected a comma-separated list of {', '.join(PARTS)}")
    for key in ("steps", "max_batch", "sample_tokens", "tests_timeout", "plan_iters"):
        if getattr(cfg, key) <= 0:
            errors.append(f"{key} must be positive, got {getattr(cfg, key)}")
    if cfg.warmup < (1 if cfg.compile else 0):
        errors.append(f"warmup={cfg.warmup}: compile=True needs 1 or more, or the compilation itself is timed")
    if cfg.search_seconds < 0:
        errors.append(f"search_seconds must be >= 0, got {cfg.search_seconds}")
    if cfg.sample_tokens >= 1024:
        errors.append(f"sample_tokens={cfg.sample_tokens}: keep it under the block of 1024, where the cache is used")
    if not (cfg.device.startswith("cuda") or (cfg.dry_run and cfg.device == "cpu")):
        errors.append(f"device={cfg.device!r}: this checks a CUDA GPU (cuda or cuda:N); cpu only with --dry_run=True")
    if cfg.dry_run and not set(parts) <= set(DRY_PARTS):
        errors.append(f"dry_run=True runs only {', '.join(DRY_PARTS)}; drop "
                      f"{', '.join(p for p in parts if p not in DRY_PARTS)} from parts")
    errors += prepared_problems(cfg)
    if errors:
        raise UserError("invalid configuration:\n  " + "\n  ".join(errors))
    return sorted(dict.fromkeys(parts), key=PARTS.index)


def prepared_problems(cfg):
    """What is wrong with the prepared parts' knobs, as messages."""
    errors = []
    for key in ("fp16_steps", "fp16_tolerance", "cap_gib", "nanogpt_wall_s", "nanogpt_target",
                "nanogpt_bench_timeout_s"):
        if getattr(cfg, key) <= 0:
            errors.append(f"{key} must be positive, got {getattr(cfg, key)}")
    if cfg.time_limit_s < 0:
        errors.append(f"time_limit_s must be >= 0 (0 = no limit), got {cfg.time_limit_s}")
    if cfg.fp16_steps < 20:
        errors.append(f"fp16_steps={cfg.fp16_steps}: the curves are compared over 10 windows, give 20 or more")
    for key in ("nanogpt_batches", "lever_batches"):
        sizes = configurator.parse_list(getattr(cfg, key))
        if not all(b.isdigit() and int(b) > 0 for b in sizes) or (key == "nanogpt_batches" and not sizes):
            errors.append(f"{key}={getattr(cfg, key)!r}: expected positive integers like '16,32'")
    bad = [m for m in configurator.parse_list(cfg.lever_modes) if m not in COMPILE_MODES]
    if bad:
        errors.append(f"lever_modes={cfg.lever_modes!r}: {', '.join(bad)} is not one of {', '.join(COMPILE_MODES)}")
    if cfg.nanogpt_dir and not Path(cfg.nanogpt_dir).is_dir():
        errors.append(f"nanogpt_dir={cfg.nanogpt_dir!r} is not a directory (a nanoGPT checkout)")
    return errors


# ----------------------------------------------------------------------------- pure helpers

COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?)\b")


def parse_pytest_summary(text):
    """Counts from pytest's summary, the last line that has any ('2 failed, 7 passed, 600 deselected in 61.2s')."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "deselected": 0}
    lines = [line for line in text.strip().splitlines() if COUNT.search(line)]
    for n, word in COUNT.findall(lines[-1]) if lines else []:
        counts["errors" if word.startswith("error") else word] += int(n)
    return counts


def run_eta(tcfg, tokens_per_sec, eval_tokens_per_sec=None):
    """How long a training config would take at the measured speeds, in seconds.

    Training: max_iters x tokens per iteration / tokens_per_sec. Gradient accumulation repeats the
    micro-step measured here, so tokens/s carries over (the optimizer step, timed with every
    micro-step here, is shared by all of them in the real run: the figure errs long). Evaluation:
    train.py evaluates at iteration 0, every eval_interval-th and the last, eval_iters batches each."""
    tokens_per_iter = tcfg.gradient_accumulation_steps * tcfg.batch_size * tcfg.block_size
    n_evals = tcfg.max_iters // tcfg.eval_interval + 1 + (tcfg.max_iters % tcfg.eval_interval != 0)
    eval_s = None
    if eval_tokens_per_sec and tcfg.eval_iters > 0:  # eval_iters 0 = the whole split, of unknown size here
        eval_s = n_evals * tcfg.eval_iters * tcfg.batch_size * tcfg.block_size / eval_tokens_per_sec
    return {"max_iters": tcfg.max_iters, "tokens_per_iter": tokens_per_iter, "tokens_per_sec": tokens_per_sec,
            "train_s": tcfg.max_iters * tokens_per_iter / tokens_per_sec, "n_evals": n_evals, "eval_s": eval_s}


def gib(n):
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def row_result(r):
    """One training row in words."""
    if r["status"] != "ok":
        return f"{r['status']}: {r['note']}" if r["note"] else r["status"]
    compiled = f", {r['warmup_s']:.0f} s to compile and warm up" if r["compile"] else ""
    return (f"{r['ms_per_step']:.1f} ms/step, {r['tokens_per_sec']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, "
            f"peak {gib(r['peak_memory_bytes'])} (memory.py: {gib(r['estimated_memory_bytes'])}){compiled}")


def table_rows(report):
    """(part, what, result) for every measured thing in the report."""
    rows = []
    g = report["gpu"]
    rows.append(("device", g["name"], f"compute capability {g['capability']}, {gib(g['memory_bytes'])}, "
                                      f"dtype {report['dtype']}"))
    for dname, p in report["peak_flops"].items():
        rows.append(("device", f"peak {dname}", f"{p['flops'] / 1e12:,.1f} TFLOP/s ({p['source']})"))
    parts = report["parts"]
    if "tests" in parts:
        t = parts["tests"]
        c = t.get("counts") or {}
        counts = ", ".join(f"{c[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if c.get(k)) or "none ran"
        rows.append(("tests", "pytest -q -m cuda tests/", counts if t["status"] == "ok" else
                     f"{t['status']}: {t.get('note') or counts}"))
    for key in MODELS:
        if key not in parts:
            continue
        m = parts[key]
        if m.get("status") == "error":
            rows.append((key, "error", m["note"]))
            continue
        for r in m["rows"]:
            mode = "compiled" if r["compile"] else "eager"
            rows.append((key, f"{m['label']} {r['dtype']} {mode}, batch {r['batch_size']}", row_result(r)))
        best = m["max_batch_row"]
        rows.append((key, "largest micro-batch (eager)", f"{m['max_batch']}{m['max_batch_note']}" + (
            f", peak {gib(best['peak_memory_bytes'])} (memory.py: {gib(best['estimated_memory_bytes'])})"
            if best else "")))
        e = m["eta"]
        if e:
            evals = f" + {e['eval_s'] / 3600:.1f} h for {e['n_evals']} evaluations" if e["eval_s"] else ""
            rows.append((key, f"{m['config_file']} on this GPU",
                         f"{e['max_iters']:,} iters x {e['tokens_per_iter']:,} tokens at {e['tokens_per_sec']:,.0f} "
                         f"tok/s ({e['measured']}): {e['train_s'] / 3600:.1f} h{evals}"))
    if "sampling" in parts:
        s = parts["sampling"]
        if s.get("status") == "error":
            rows.append(("sampling", "error", s["note"]))
        for r in s.get("rows", []):
            rows.append(("sampling", f"KV cache, batch 1, {r['dtype']}", f"{r['tokens_per_sec']:,.0f} tok/s "
                                                                         f"({r['new_tokens']} new tokens)"))
    if "plan" in parts:
        p = parts["plan"]
        if p.get("eta_s") is not None and p.get("wall_s") is not None:
            rows.append(("plan", f"{p['config_file']}, {p['max_iters']} iters, {p['overrides']}",
                         f"ETA {p['eta_s']:.0f} s vs {p['wall_s']:.0f} s run: {p['eta_s'] / p['wall_s']:.2f}x "
                         f"(micro-batch {p['batch_size']}, largest {p['largest']})"))
        if p.get("status") != "ok":
            rows.append(("plan", p.get("status", "error"), p.get("note", "")))
    rows += prepared_rows(parts)
    for part, seconds in report["elapsed_s"].items():
        rows.append(("time", part, f"{seconds:.0f} s"))
    return rows


PREPARED_TABLES = (("fp16", fp16_table), ("gptj", gptj_table), ("memory24", memory24_table),
                   ("nanogpt", nanogpt_table), ("levers", levers_table))


def prepared_rows(parts):
    """The table rows of the prepared parts; a part that broke before measuring anything, or was
    skipped, in one row with its note."""
    rows = []
    for part, table in PREPARED_TABLES:
        if part not in parts:
            continue
        res = parts[part]
        if set(res) <= {"status", "note"}:
            rows.append((part, res["status"], res["note"]))
        else:
            rows += table(res)
    return rows


def format_table(rows, header=("part", "what", "result")):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(2)]
    line = lambda r: f"{str(r[0]).ljust(widths[0])}  {str(r[1]).ljust(widths[1])}  {r[2]}"
    return "\n".join([line(header), line(["-" * widths[0], "-" * widths[1], "-" * len(header[2])])]
                     + [line(r) for r in rows])


def problems(report):
    """What makes the check fail: tests not passing, a part or a row that broke (out of memory is a
    finding about the card, not a failure)."""
    out = []
    for part, res in report["parts"].items():
        if res.get("status") not in (None, "ok", "skipped"):  # a part skipped for want of an input says so
            out.append(f"{part}: {res['status']}" + (f" ({res['note']})" if res.get("note") else ""))
        out += [f"{part}: " + (r["label"] if "label" in r else f"{r['dtype']} batch {r['batch_size']} "
                                                             f"compile={r['compile']}") + f": {r['note']}"
                for r in res.get("rows", []) + res.get("search", []) if r.get("status") == "error"]
    return out


# ----------------------------------------------------------------------------- the parts

def run_tests(cfg, device):
    """The suite's CUDA-marked tests in a subprocess, on this GPU."""
    if importlib.util.find_spec("pytest") is None:
        return {"status": "not run", "note": "pytest is not installed (pip install pytest)", "counts": None}
    env = dict(os.environ)
    visible = [v for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if device.index:  # the tests use the default GPU: make it this one
        env["CUDA_VISIBLE_DEVICES"] = visible[device.index] if visible else str(device.index)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/"]
    print(f"tests: {' '.join(cmd[2:])} (up to {cfg.tests_timeout} s)", flush=True)
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=cfg.tests_timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(out[-3000:])
        return {"status": "timed out", "note": f"after {cfg.tests_timeout} s", "counts": parse_pytest_summary(out)}
    counts = parse_pytest_summary(r.stdout)
    ok = r.returncode == 0 and counts["passed"] > 0
    if not ok:
        print((r.stdout + r.stderr)[-6000:])  # the failures, as pytest reported them
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    note = "" if ok else f"pytest exit status {r.returncode}: {summary or 'no output'}"  # 0 with none passed: all skipped
    return {"status": "ok" if ok else "failed", "note": note, "counts": counts, "returncode": r.returncode,
            "summary": summary}


def run_model(cfg, key, device, dtype, peak):
    """Training rows of one config's model: eager and compiled at its micro-batch, the largest batch, the ETA."""
    config_file, label = MODELS[key]
    tcfg = configurator.parse_config(TrainConfig, [str(ROOT / config_file)])
    bcfg = bench.BenchConfig(**{k: getattr(tcfg, k) for k in STEP_KEYS}, warmup=cfg.warmup, steps=cfg.steps,
                             device=str(device), seed=cfg.seed, eval=True)
    mcfg = bench.model_config(bcfg)
    with torch.device("meta"):  # shapes for memory.py's estimate, without allocating
        shape_model = GPT(mcfg)
    dname = str(dtype).replace("torch.", "")
    print(f"{key}: {label}, {shape_model.get_num_params():,} parameters, {config_file}'s micro-batch "
          f"{tcfg.batch_size} x {tcfg.block_size}, {dname}", flush=True)

    def show(row, what):
        print(f"{key}: {what}: {row_result(row)}", flush=True)
        return row

    b = tcfg.batch_size
    eager = show(bench.run_row(bcfg, shape_model, device, dtype, False, b, peak, 0), f"eager, batch {b}")
    rows = [eager]
    if cfg.compile:
        reason = compile_reason(device)
        if reason:
            rows.append(bench.new_row(dname, True, b, mcfg.block_size) | {"status": "skipped", "note": reason})
        else:  # forward-only rows would compile a second (eval-mode) graph: left to the eager row
            rows.append(show(bench.run_row(dataclasses.replace(bcfg, eval=False), shape_model, device, dtype, True,
                                           b, peak, 0), f"compiled, batch {b}"))

    # --- the largest micro-batch that fits: two steps per size are enough to reach the peak memory
    search_cfg = dataclasses.replace(bcfg, warmup=1, steps=1, eval=False)
    deadline = time.monotonic() + cfg.search_seconds

    def try_batch(n):
        if time.monotonic() > deadline:
            return bench.new_row(dname, False, n, mcfg.block_size) | {"status": "skipped", "note": "time cap"}
        return show(bench.run_row(search_cfg, shape_model, device, dtype, False, n, peak, 0), f"search, batch {n}")

    best, tried = bench.find_max_batch(try_batch, cfg.max_batch)
    last = tried[-1]["status"]
    note = (f" or more (search stopped after {cfg.search_seconds:g} s)" if last == "skipped" else
            f" or more (max_batch={cfg.max_batch})" if last == "ok" else
            f" (search ended on an error at batch {tried[-1]['batch_size']})" if last == "error" else "")
    best_row = next((r for r in tried if r["batch_size"] == best and r["status"] == "ok"), None)

    # --- the config's whole run at the fastest speed measured
    fastest = max((r for r in rows if r["status"] == "ok"), key=lambda r: r["tokens_per_sec"], default=None)
    eta = run_eta(tcfg, fastest["tokens_per_sec"], eager["eval_tokens_per_sec"]) if fastest else None
    if eta:
        eta["measured"] = "compiled" if fastest["compile"] else "eager"
    return {"status": "ok", "label": label, "config_file": config_file, "n_params": shape_model.get_num_params(),
            "model_args": dataclasses.asdict(mcfg), "rows": rows, "search": tried, "max_batch": best,
            "max_batch_note": note, "max_batch_row": best_row, "eta": eta}


def run_sampling(cfg, device, dtype):
    """KV-cache decoding speed of the GPT-2 124M shape, in the card's autocast dtype and in float32."""
    tcfg = configurator.parse_config(TrainConfig, [str(ROOT / MODELS["gpt2"][0])])
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(n_layer=tcfg.n_layer, n_head=tcfg.n_head, n_embd=tcfg.n_embd, block_size=tcfg.block_size,
                          vocab_size=tcfg.vocab_size, dropout=0.0)).to(device).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    rows = []
    for d in dict.fromkeys([dtype, torch.float32]):
        name = str(d).replace("torch.", "") + (" autocast" if d != torch.float32 else " (TF32 matmuls)")
        with torch.inference_mode(), autocast(device, d):
            generate(model, prompt, 8, temperature=0)  # warm-up: kernel selection, cuBLAS workspaces
            synchronize(device)
            t0 = time.perf_counter()
            generate(model, prompt, cfg.sample_tokens, temperature=0)
            synchronize(device)
            dt = time.perf_counter() - t0
        rows.append({"dtype": name, "batch_size": 1, "new_tokens": cfg.sample_tokens, "seconds": dt,
                     "tokens_per_sec": cfg.sample_tokens / dt})
        print(f"sampling: {name}: {cfg.sample_tokens / dt:,.0f} tok/s", flush=True)
    del model
    bench.free_memory(device)
    return {"status": "ok", "rows": rows}


# ----------------------------------------------------------------------------- main

def run_plan(cfg, device):
    """bench.py --plan for the baby GPT on this GPU, then train.py with the plan's overrides, both in
    subprocesses: the plan's ETA against the wall time of the run it planned."""
    import json
    import tempfile
    config_file = PLAN_CONFIG
    with tempfile.TemporaryDirectory() as tmp:
        common = [str(ROOT / config_file), f"--max_iters={cfg.plan_iters}", f"--lr_decay_iters={cfg.plan_iters}",
                  "--compile=False", f"--device={device}", f"--out_dir={tmp}/out"]
        plan_file = Path(tmp) / "plan.json"
        print(f"plan: bench.py {config_file} --plan, then train.py with its overrides", flush=True)
        p = subprocess.run([sys.executable, str(ROOT / "bench.py"), *common, "--plan", f"--calibration_s={cfg.plan_calibration_s}",
                            f"--plan_file={plan_file}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        print(p.stdout[-3000:] + p.stderr[-3000:])
        if p.returncode:
            return {"status": "failed", "note": f"bench.py --plan exit {p.returncode}: "
                                                f"{(p.stderr.strip().splitlines() or [''])[-1]}"}
        planned = json.loads(plan_file.read_text())
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, *planned["overrides"].split()], cwd=ROOT,
                           capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        print("\n".join(r.stdout.strip().splitlines()[-5:]) + r.stderr[-3000:])
    result = {"status": "ok" if r.returncode == 0 else "failed", "config_file": config_file,
              "max_iters": cfg.plan_iters, "overrides": planned["overrides"], "batch_size": planned["batch_size"],
              "largest": planned["largest_micro_batch"], "eta_s": planned["eta_seconds"], "wall_s": wall,
              "calibration_s": planned["calibration_seconds"], "trials": planned["trials"]}
    if r.returncode:
        result["note"] = f"train.py exit {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1]}"
    return result


def open_device(cfg, parts):
    """The device, set up as train.py sets it (TF32 matmuls), and the report's description of it. A
    dry run on a CPU describes the CPU."""
    device = pick_device(cfg.device)
    if device.type != "cuda":
        # one thread: a dry run's speed means nothing, and on a busy machine torch's pool of several
        # stalls whenever another process holds a core (a tenth of the speed on a shared 2-core VM)
        torch.set_num_threads(1)
        print(f"gpu_check: dry run on {cpu_model()}, torch {torch.__version__}, 1 thread; parts: {', '.join(parts)}",
              flush=True)
        return device, {"name": f"{cpu_model()} (dry run)", "capability": "-",
                        "memory_bytes": memory.device_memory(device)}
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    setup_backends(device)  # TF32 for float32 matmuls, as train.py runs them
    props = torch.cuda.get_device_properties(device)
    major, minor = torch.cuda.get_device_capability(device)
    print(f"gpu_check: {props.name} (compute capability {major}.{minor}, {gib(props.total_memory)}), torch "
          f"{torch.__version__}, CUDA {torch.version.cuda}; parts: {', '.join(parts)}"
          + (" (dry run)" if cfg.dry_run else ""), flush=True)
    return device, {"name": props.name, "capability": f"{major}.{minor}", "memory_bytes": props.total_memory}


def run_part(cfg, part, device, dtype, peak, deadline=None, save=None):
    """One part's result; an exception in it is its result ('error'), so the other parts still run.
    The long parts (nanogpt, levers) stop starting rows at deadline and save() what they have so far."""
    try:
        if part == "tests":
            return run_tests(cfg, device)
        if part in MODELS:
            return run_model(cfg, part, device, dtype, peak)
        if part == "plan":
            return run_plan(cfg, device)
        if part == "sampling":
            return run_sampling(cfg, device, dtype)
        if part == "fp16":
            return run_fp16(cfg, device)
        if part == "gptj":
            return run_gptj(cfg, device, dtype)
        if part == "memory24":
            return run_memory24(cfg, device, dtype, peak)
        if part == "nanogpt":
            return run_nanogpt(cfg, device, dtype, peak, deadline, save)
        assert part == "levers", part
        return run_levers(cfg, device, dtype, peak, deadline, save)
    except Exception as e:  # noqa: BLE001 -- one broken part must not hide the others' numbers;
        traceback.print_exc()  # it is printed here, in the table and the JSON, and fails the run
        bench.free_memory(device)
        return {"status": "error", "note": f"{type(e).__name__}: {e}"}


def main(cfg):
    if not (cfg.dry_run and cfg.device == "cpu") and not torch.cuda.is_available():
        raise SystemExit(NO_CUDA.format(torch.__version__))
    parts = check_config(cfg)
    device, gpu = open_device(cfg, parts)
    dtype = pick_dtype("auto", device)  # prints its reason
    report = {"config": dataclasses.asdict(cfg), "versions": bench.versions(), "machine": bench.machine_info(device),
              "gpu": gpu, "dtype": str(dtype).replace("torch.", ""), "peak_flops": {}, "parts": {}, "elapsed_s": {}}
    for d in dict.fromkeys([dtype, torch.float32]):
        flops, source = peak_flops(device, d)
        report["peak_flops"][str(d).replace("torch.", "")] = {"flops": flops, "source": source}
        print(f"peak {str(d).replace('torch.', '')}: {flops / 1e12:,.1f} TFLOP/s ({source})", flush=True)
    peak = report["peak_flops"][report["dtype"]]["flops"]
    bench.free_memory(device)  # a measured peak leaves ~1 GB of matmul operands in the allocator's cache

    start = time.perf_counter()
    deadline = time.monotonic() + cfg.time_limit_s if cfg.time_limit_s > 0 else None
    for part in parts:
        t0 = time.perf_counter()

        def save(partial, part=part):  # a part cut off by the machine's limit keeps the rows it measured
            report["parts"][part] = partial | {"status": "incomplete"}
            write_json(cfg.out_file, report)
        if past(deadline):
            result = {"status": "skipped", "note": f"time_limit_s={cfg.time_limit_s:g} reached before it started"}
        else:
            result = run_part(cfg, part, device, dtype, peak, deadline, save)
        report["parts"][part] = result
        report["elapsed_s"][part] = time.perf_counter() - t0
        print(f"{part}: {report['elapsed_s'][part]:.0f} s", flush=True)
        write_json(cfg.out_file, report)  # after every part: an interrupted check keeps what it measured
    report["elapsed_s"]["total"] = time.perf_counter() - start
    report["problems"] = problems(report)
    write_json(cfg.out_file, report)
    print()
    print(format_table(table_rows(report)))
    print(f"wrote {cfg.out_file}")
    if report["problems"]:
        raise SystemExit("gpu_check: " + "; ".join(report["problems"]))
    return report


def cli(argv):
    if any(a in ("-h", "--help") for a in argv):
        configurator.configure(GpuCheckConfig, argv)  # lists the keys and exits
    try:
        return main(configurator.parse_config(GpuCheckConfig, argv))
    except ValueError as e:
        raise SystemExit(f"gpu_check: error: {e}") from None


if __name__ == "__main__":
    cli(sys.argv[1:])
