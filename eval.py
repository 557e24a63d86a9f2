"""
Evaluate one or several models side by side: validation loss, HellaSwag, PIQA, Winogrande, LAMBADA,
generation accuracy of a fine-tune, and answers scored by a judge model (judge.py).

    python eval.py --out_dir=out-shakespeare-char --tasks=val
    python eval.py --models=gpt2,out-gpt2-ft --tasks=val,hellaswag,lambada --dataset=openwebtext --limit=1000
    python eval.py --init_from=gpt2 --tasks=piqa --data_file=piqa_validation.jsonl
    python eval.py --out_dir=out-instruct --tasks=judge --judge_url=http://localhost:8000/v1 --judge_model=NAME

A model is an out_dir of ours (its latest checkpoint), an OpenAI GPT-2 name or a local Hugging Face
GPT-2 directory. Benchmarks download from the Hugging Face hub, or read a local JSONL file in the
dataset's own schema (--data_file). Prints a table (rows = task metrics, columns = models) and
writes every number to out_file. Accuracies carry a 95% Wilson score interval.
"""

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from homegpt import judge, sft, weights
from configurator import parse_list, run
from homegpt.dataloader import TokenData, Tokenizer, count_eval_batches, eval_batches
from homegpt.errors import UserError
from homegpt.evaluation import evaluate_loss, load_task, progress_bar, run_benchmark, run_lambada
from homegpt.fileio import JSON_OBJECT, check_file_target, write_json
from homegpt.runs import holds_checkpoint
from homegpt.runtime import autocast, pick_device, pick_dtype, seed_everything, setup_backends

BENCHMARK_TASKS = ("hellaswag", "piqa", "winogrande", "lambada")
TASKS = ("val",) + BENCHMARK_TASKS + ("generate", "judge")
JUDGE_DATA = "data/instruct/test.jsonl"  # what data/instruct/prepare.py writes
MAX_NEW_TOKENS = {"generate": 16, "judge": 256}  # a label or short answer; a whole response


@dataclass
class EvalConfig:
    init_from: str = "resume"  # 'resume' = out_dir's latest checkpoint; or gpt2[-medium|-large|-xl] or a HF dir
    out_dir: str = "out"  # the run evaluated when init_from='resume'
    which: str = "best"  # a run's 'best' checkpoint (lowest validation loss; its latest if it never evaluated) or 'latest'
    base_dir: str = ""  # a LoRA / 1-D run whose base run moved: where it is now (it must hold the checkpoint trained on)
    models: str = ""  # comma-separated out_dirs / gpt2 names / HF dirs, side by side; '' = init_from
    tasks: str = "val"  # comma-separated: val, hellaswag, piqa, winogrande, lambada, generate
    dataset: str = ""  # prepared dataset for 'val' (data/<dataset>); '' = the checkpoint's own
    data_dir: str = ""  # '' = data/<dataset>; else any prepared directory
    batch_size: int = 8  # sequences per forward pass for 'val' and LAMBADA
    block_size: int = 0  # 0 = the model's context; smaller crops it (faster, usually a higher loss)
    eval_iters: int = 0  # batches of the fixed validation set; 0 = the whole split
    data_file: str = ""  # local JSONL for the (single) benchmark or 'generate' task; '' = download
    limit: int = 0  # at most this many items per benchmark (the first ones); 0 = all
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "auto"  # auto = bfloat16 where native, float16 on older GPUs, else float32
    base_quant: str = ""  # a pretrained model's matmuls loaded as 'int8' or 'nf4' (quant.py); our runs load as trained
    seed: int = 1337  # the evaluations are deterministic; 'generate' draws its k shots with it
    k_shot: int = 0  # 'generate': 0 = the fine-tuned model zero-shot; >0 = a k-shot prompt baseline
    shots_file: str = ""  # 'generate': JSONL the k examples are drawn from
    max_new_tokens: int = 0  # 'generate' / 'judge': tokens per answer; 0 = 16 for generate, 256 for judge
    # 'judge': a judge model scores each answer 0-100 against the reference (judge.py)
    judge_url: str = ""  # an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 or https://api.openai.com/v1
    judge_model: str = ""  # the model name the endpoint serves (with judge_url)
    judge_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the endpoint's key (unset: no key sent)
    judge: str = ""  # or a local Hugging Face model directory, run in this process
    judge_workers: int = 4  # requests in flight at once
    judge_timeout: float = 60.0  # seconds per request
    judge_retries: int = 5  # tries after the first on 429, 5xx or a dropped connection
    judge_file: str = ""  # answers and scores, appended as they come and reused by a rerun; '' = out_file's name + .judge.jsonl
    out_file: str = "eval_results.json"  # every number, per model and task
    progress: bool = True  # progress bars on stderr when it is a terminal (never in a log); False = none


def check_config(cfg):
    """All the problems with the knobs at once, before any model is loaded."""
    tasks, errors = parse_list(cfg.tasks), []
    if not tasks:
        errors.append("tasks is empty; e.g. --tasks=val,hellaswag")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        errors.append(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    uses_file = [t for t in tasks if t in BENCHMARK_TASKS + ("generate",)]
    if cfg.data_file and len(uses_file) > 1:
        errors.append(f"data_file is one file but tasks {', '.join(uses_file)} each need their own; "
                      f"evaluate them one per call")
    if "generate" in tasks and not cfg.data_file:
        errors.append("the 'generate' task needs --data_file=examples.jsonl")
    if "judge" in tasks:
        if bool(cfg.judge_url) == bool(cfg.judge):
            errors.append("the 'judge' task needs one judge: --judge_url=http://host:port/v1 with --judge_model=NAME, "
                          "or --judge=path/to/hf/model")
        if cfg.judge_url and not cfg.judge_model:
            errors.append("--judge_url needs --judge_model, the name of a model the endpoint serves")
        if cfg.judge_url and "api.openai.com" in cfg.judge_url and not os.environ.get(cfg.judge_key_env):
            errors.append(f"{cfg.judge_url} needs a key: export {cfg.judge_key_env}=sk-... (or name another "
                          f"variable with --judge_key_env)")
        for key in ("judge_workers", "judge_timeout"):
            if getattr(cfg, key) <= 0:
                errors.append(f"{key}={getattr(cfg, key)} must be positive")
        if cfg.judge_retries < 0:
            errors.append(f"judge_retries={cfg.judge_retries} must be >= 0")
    if "generate" in tasks and cfg.k_shot > 0 and not cfg.shots_file:
        errors.append(f"k_shot={cfg.k_shot} needs --shots_file=train.jsonl to draw the examples from")
    for key in ("batch_size", "block_size", "eval_iters", "limit", "k_shot", "max_new_tokens"):
        if getattr(cfg, key) < 0 or (key == "batch_size" and getattr(cfg, key) == 0):
            errors.append(f"{key}={getattr(cfg, key)} must be {'positive' if key == 'batch_size' else '>= 0'}")
    if cfg.base_quant not in ("", "int8", "nf4"):
        errors.append(f"base_quant must be '', 'int8' or 'nf4', got {cfg.base_quant!r}")
    if errors:
        raise UserError("invalid configuration:\n  " + "\n  ".join(errors))
    return tasks


def model_specs(cfg):
    """[(model, the option that named it)]: an error about a model names the option the user typed."""
    if cfg.models:
        return [(spec, "--models") for spec in parse_list(cfg.models)]
    if cfg.init_from == "resume":
        return [(cfg.out_dir, "--out_dir")]
    return [(cfg.init_from, "--init_from")]


def load_any(spec, device, option="--models", which="best", base_quant="", base_dir=""):
    """(model, tokenizer, info) for an out_dir of ours, a GPT-2 name or a Hugging Face directory
    (weights.load_any). Errors start with `option`, so that a hint says where to pass a path."""
    if option == "--out_dir" and not holds_checkpoint(spec):
        raise UserError(f"--out_dir={spec!r} holds no checkpoint (latest.json): train there first, or "
                        f"name the model with --init_from=<gpt2 name or HF directory> or --models=...")
    try:
        model, data_meta, info = weights.load_any(spec, device, which, base_quant, base_dir)
    except ValueError as e:  # checkpoint.py and hf.py name the model, not the option that named it
        raise UserError(f"{option}: {e}") from e
    return model, Tokenizer(data_meta), info


def val_data_dir(cfg, info, spec):
    if cfg.data_dir:
        return cfg.data_dir
    if cfg.dataset:
        return os.path.join("data", cfg.dataset)
    run = info.get("config") or {}
    if run.get("data_dir"):
        return run["data_dir"]
    if run.get("dataset"):
        return os.path.join("data", run["dataset"])
    raise UserError(f"'val' for {spec}: which data? pass --dataset=<name> or --data_dir=<prepared dir>")


def eval_val(cfg, model, tokenizer, info, spec, device, ctx):
    data_dir = val_data_dir(cfg, info, spec)
    data = TokenData(data_dir, "val")
    kind = data.meta.get("tokenizer")
    if kind and kind != tokenizer.kind:
        raise UserError(f"{data_dir} was prepared with the {kind!r} tokenizer but {spec} uses {tokenizer.kind!r}; "
                         f"pass --dataset/--data_dir of data in the model's tokenizer")
    if kind == "char" and data.meta.get("itos") != (info.get("data_meta") or {}).get("itos"):
        raise UserError(f"{data_dir}: its characters differ from the ones {spec} was trained on")
    data.check_vocab(model.config.vocab_size)
    T = model.config.block_size
    batches = eval_batches(data, cfg.batch_size, T, cfg.eval_iters, model.config.vocab_size)
    n_batches = count_eval_batches(data, cfg.batch_size, T, cfg.eval_iters)
    r = evaluate_loss(model, progress_bar(batches, cfg.progress, f"{spec} val", n_batches), device, ctx)
    return dict(r, data_dir=str(data_dir))


def eval_generate(cfg, model, tokenizer, device, ctx, train_config=None):
    template = (train_config or {}).get("sft_template") or None  # the prompt format the model was tuned on
    examples = sft.load_examples(cfg.data_file, template)
    if cfg.limit > 0:
        examples = examples[:cfg.limit]
    shots = sft.load_examples(cfg.shots_file, template) if cfg.k_shot > 0 else None
    result = sft.evaluate_generation(model, tokenizer, examples, device, ctx,
                                     max_new_tokens=cfg.max_new_tokens or MAX_NEW_TOKENS["generate"],
                                     k_shot=cfg.k_shot, shots=shots, seed=cfg.seed, progress=cfg.progress)
    print(sft.format_generation_report(result))
    return result


def make_judge(cfg, device):
    if cfg.judge:
        return judge.LocalJudge(cfg.judge, device)
    return judge.HTTPJudge(cfg.judge_url, cfg.judge_model, os.environ.get(cfg.judge_key_env) or None,
                           cfg.judge_timeout, cfg.judge_retries, cfg.judge_workers)


def judge_file(cfg):
    return cfg.judge_file or str(Path(cfg.out_file).with_suffix("")) + ".judge.jsonl"


def eval_judge(cfg, spec, model, tokenizer, info, device, ctx, judge_, results):
    # the prompt format the model was tuned with (its checkpoint's), else Alpaca's
    template = (info.get("data_meta") or {}).get("prompt_template") or (info.get("config") or {}).get("sft_template")
    items = judge.load_items(cfg.data_file or JUDGE_DATA, template or None, cfg.limit)
    result = judge.judge_model(spec, model, tokenizer, items, judge_, results, device, ctx,
                               cfg.max_new_tokens or MAX_NEW_TOKENS["judge"], progress=cfg.progress)
    print(judge.format_judge_report(spec, result))
    return result


# ----------------------------------------------------------------------------- the report

# rows of the table per task: (metric, is a fraction shown as a percentage with its interval)
TABLE_ROWS = {
    "val": [("loss", False), ("perplexity", False), ("tokens", False)],
    "hellaswag": [("acc_norm", True), ("acc", True), ("n", False)],
    "piqa": [("acc_norm", True), ("acc", True), ("n", False)],
    "winogrande": [("acc", True), ("acc_norm", True), ("n", False)],
    "lambada": [("acc", True), ("perplexity", False), ("word_perplexity", False), ("n", False)],
    "judge": [("mean_score", False), ("n_scored", False), ("n_unparseable", False), ("n_failed", False)],
}


def _cell(result, metric, pct):
    v = result.get(metric)
    if v is None:
        return "-"
    if pct:
        lo, hi = result[f"{metric}_ci95"]
        return f"{100 * v:.2f}% ({100 * lo:.1f}-{100 * hi:.1f})"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else str(v)


def format_table(results, tasks):
    """rows = task metrics, columns = models; accuracies in % with their 95% Wilson interval."""
    names = list(results)
    rows = []
    for task in tasks:
        metrics = TABLE_ROWS.get(task)
        if metrics is None:  # 'generate': whatever numbers the report holds
            keys = {k for r in results.values() for k, v in r.get(task, {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)}
            metrics = [(k, False) for k in sorted(keys)]
        for metric, pct in metrics:
            rows.append([task, metric] + [_cell(results[n].get(task, {}), metric, pct) for n in names])
    header = ["task", "metric"] + names
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    table = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    if any(pct for t in tasks for _, pct in TABLE_ROWS.get(t, [])):
        table.append("accuracy in % (95% Wilson score interval)")
    return "\n".join(table)


# ----------------------------------------------------------------------------- main

def main(cfg):
    import torch
    tasks = check_config(cfg)
    check_file_target(cfg.out_file, "--out_file", JSON_OBJECT, "JSON report")  # a report replaces a report only
    if "judge" in tasks:  # appended to and reused: a file of judged answers, one JSON object a line
        check_file_target(judge_file(cfg), "--judge_file", JSON_OBJECT, "file of judged answers")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    setup_backends(device)  # as train.py: TF32 float32 matmuls on CUDA
    dtype = pick_dtype(cfg.dtype, device)
    ctx = autocast(device, dtype)
    print(f"device={device}, dtype={str(dtype).replace('torch.', '')}")
    # benchmark items are text, loaded once and encoded by each model's own tokenizer
    items = {t: load_task(t, cfg.data_file, cfg.limit) for t in tasks if t in BENCHMARK_TASKS}
    judge_, judge_results = None, None
    if "judge" in tasks:  # one judge for every model, and one results file to resume from
        judge_, judge_results = make_judge(cfg, device), judge.ResultsFile(judge_file(cfg))
        print(f"judge: {judge_.name}; answers and scores in {judge_results.path} "
              f"({len(judge_results.records)} reusable records)")
    results = {}
    for spec, option in model_specs(cfg):
        model, tokenizer, info = load_any(spec, device, option, cfg.which, cfg.base_quant, cfg.base_dir)
        if cfg.block_size > model.config.block_size:
            raise UserError(f"block_size={cfg.block_size} exceeds {spec}'s context of {model.config.block_size}")
        if cfg.block_size:
            model.crop_block_size(cfg.block_size)
        print(f"{spec}: {model.get_num_params() / 1e6:.2f}M parameters, block_size {model.config.block_size}, "
              f"tokenizer {tokenizer.kind}")
        res = {}
        for task in tasks:
            torch.manual_seed(cfg.seed)  # each task sees the same RNG whatever ran before it
            if task == "val":
                res[task] = eval_val(cfg, model, tokenizer, info, spec, device, ctx)
            elif task == "lambada":
                res[task] = run_lambada(model, tokenizer, items[task], device, ctx, batch_size=cfg.batch_size,
                                        progress=cfg.progress, desc=f"{spec} {task}")
            elif task in BENCHMARK_TASKS:
                res[task] = run_benchmark(model, tokenizer, items[task], device, ctx, progress=cfg.progress,
                                          desc=f"{spec} {task}")
            elif task == "judge":
                res[task] = eval_judge(cfg, spec, model, tokenizer, info, device, ctx, judge_, judge_results)
            else:
                res[task] = eval_generate(cfg, model, tokenizer, device, ctx, info.get("config"))
        results[spec] = res
        del model
    print(format_table(results, tasks))
    write_json(cfg.out_file, {"config": dataclasses.asdict(cfg), "device": str(device),
                              "dtype": str(dtype).replace("torch.", ""),
                              "interval": "95% Wilson score interval (acc*_ci95)", "results": results})
    print(f"wrote {cfg.out_file}")
    return results


if __name__ == "__main__":
    run(main, EvalConfig)
