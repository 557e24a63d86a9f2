"""
Two prepared parts of benchmarks/gpu_check.py about the training step itself:

  levers  GPT-2 124M (config/train_gpt2.py) toward 50% MFU: ms/step, tokens/s and MFU of today's
          defaults (bf16, torch.compile 'default', fused AdamW, the config's micro-batch of 16) and
          of one change at a time: for-each AdamW, no compile, other micro-batches, other compile
          modes; each row's effect as a multiple of the baseline's tokens/s
  fp16    the baby GPT (config/train_shakespeare_char.py) for fp16_steps steps from one seed, on the
          same batches, in bfloat16 and in float16 + GradScaler (what a card without bf16 runs): the two
          loss curves, compared window by window, and the steps the scaler skipped after calibrating

    python benchmarks/gpu_check.py --parts=levers,fp16
    python benchmarks/gpu_check.py --device=cpu --dry_run=True --parts=levers,fp16      # the code, on a CPU

The next lever, which needs a change to model.py, is a chunked cross-entropy (docs/gpu_check.md):
run_levers prints the logits' share of memory that it would free at the baseline's batch.
"""

import dataclasses

import gpu_rows  # first: it puts the checkout on sys.path for a plain `python benchmarks/...`
import torch

from configurator import parse_list
from homegpt.dataloader import TokenData, make_sampler, resolve_data_dir, to_device
from homegpt.prepare_text import prepare_shipped
from homegpt.weights import saved_config, scratch_model_args
from model import GPT
from homegpt.optimizers import make_optimizer
from homegpt.hardware import free_memory
from homegpt.runtime import Dist, autocast, cuda_has_bf16, make_scaler, seed_everything, step_seed
from train import get_lr, set_lr, train_step
from gpu_rows import GIB, builder, estimate, recipe, shape_of, step_counts, train_row

LEVERS_CONFIG = "config/train_gpt2.py"
FP16_CONFIG = "config/train_shakespeare_char.py"
LOGIT_BYTES = 12  # memory.py: fp32 log-softmax output and two fp32 gradients alive at the start of backward


def lever_specs(cfg, tcfg):
    """(label, micro-batch, compile mode, fused) of each row: the baseline, then one change at a time,
    the likeliest gains first (a time limit skips the last rows), the compile modes last:
    max-autotune's GEMM search is the slowest compilation, and the least sure."""
    b = tcfg.batch_size
    specs = [("baseline: compile 'default', fused AdamW", b, "default", True)]
    specs += [(f"micro-batch {n}", n, "default", True) for n in map(int, parse_list(cfg.lever_batches)) if n != b]
    specs += [("AdamW for-each (fused=False)", b, "default", False), ("no torch.compile (eager)", b, None, True)]
    specs += [(f"compile mode '{m}'", b, m, True) for m in parse_list(cfg.lever_modes)]
    return specs


def run_levers(cfg, device, dtype, peak, deadline=None, save=None):
    """Every lever's row, and its effect against the baseline. A row not started by `deadline`
    (time.monotonic()) is skipped; save(partial result) after each row keeps what was measured if
    the run is cut off."""
    tcfg = recipe(LEVERS_CONFIG, dry_run=cfg.dry_run)
    shape = shape_of(tcfg)
    counts = step_counts(cfg)
    logits = tcfg.batch_size * tcfg.block_size * shape.config.vocab_size * LOGIT_BYTES
    result = {"status": "ok", "config_file": LEVERS_CONFIG, "n_params": shape.get_num_params(),
              "flops_per_token": shape.flops_per_token(tcfg.block_size), "peak_flops": peak, "rows": [],
              "logits_bytes_at_baseline": logits, "dry_run": cfg.dry_run}
    for label, batch, mode, fused in lever_specs(cfg, tcfg):
        if gpu_rows.past(deadline):
            row = gpu_rows.new_row(label, tcfg, dtype, batch, mode, fused) | {"status": "skipped",
                                                                              "note": "time_limit_s reached"}
        else:
            graphs = mode == "reduce-overhead" and not cfg.dry_run
            warmup = max(counts[0], 3) if graphs else counts[0]  # CUDA graphs: warm up, record, then replay
            est = estimate(shape, tcfg, dtype, batch)["total"]
            row = train_row(label, builder(tcfg, device, cfg.seed), tcfg, device, dtype, batch, (warmup, counts[1]),
                            compile_mode=mode, fused=fused, peak_flops=peak, estimated_bytes=est, dry_run=cfg.dry_run)
        result["rows"].append(row)
        print(f"levers: {label}, batch {batch}: {gpu_rows.row_text(row)}", flush=True)
        if save:
            save(result)
    base = result["rows"][0]
    for r in result["rows"]:
        ok = r["status"] == "ok" and base["status"] == "ok"
        r["speedup"] = r["tokens_per_sec"] / base["tokens_per_sec"] if ok else None
        r["mfu_points"] = 100 * (r["mfu"] - base["mfu"]) if ok and r["mfu"] is not None else None
    return result


def levers_table(res):
    out = []
    for r in res["rows"]:
        effect = f"; {r['speedup']:.2f}x the baseline's tok/s" if r.get("speedup") and r is not res["rows"][0] else ""
        what = r["label"] if r["label"].startswith("micro-batch") else f"{r['label']}, batch {r['batch_size']}"
        out.append(("levers", what, gpu_rows.row_text(r) + effect))
    out.append(("levers", "logits at the baseline (chunked CE's target)",
                f"{res['logits_bytes_at_baseline'] / GIB:.1f} GiB at {LOGIT_BYTES} bytes per logit"))
    return out


# ----------------------------------------------------------------------------- fp16 + GradScaler

def loss_curve(tcfg, mcfg, data, device, dtype, steps, seed):
    """(losses, skipped flags, loss scales) of `steps` train.py steps from seed: the same initial
    weights, batches, learning rates and per-step dropout seeds whatever dtype is. A float16 step is skipped
    when the scaler lowered its scale (it found inf/NaN gradients and did not step)."""
    seed_everything(seed)
    model = GPT(mcfg).to(device)  # initialised on the CPU: bit-identical weights in both runs
    model.use_fast_dropout(tcfg.fast_dropout)
    optimizer = make_optimizer(model, tcfg, device)
    scaler, ctx = make_scaler(device, dtype), autocast(device, dtype)
    sampler = make_sampler("random", data, tcfg.batch_size, tcfg.block_size, seed)
    losses, skipped, scales = [], [], []
    for it in range(steps):
        set_lr(optimizer, get_lr(it, tcfg))
        torch.manual_seed(step_seed(seed, 0, it))  # train.py's per-step dropout seed
        before = scaler.get_scale() if scaler.is_enabled() else None
        step = train_step(model, optimizer, scaler, [to_device(sampler.next_batch(), device)], ctx,
                          tcfg.grad_clip, Dist(), device)
        after = scaler.get_scale() if scaler.is_enabled() else None
        losses.append(float(step.loss))
        skipped.append(not step.stepped or (before is not None and after < before))
        scales.append(after)
    del model, optimizer
    free_memory(device)
    return losses, skipped, scales


def window_means(xs, window):
    return [sum(xs[i:i + window]) / len(xs[i:i + window]) for i in range(0, len(xs), window)]


def calibration_skips(skipped):
    """(skips before the first step taken: the scaler halving its initial 65,536 to a scale that
    fits, skips after it: real overflows)."""
    first = next((i for i, s in enumerate(skipped) if not s), len(skipped))
    return first, sum(skipped[first:])


def compare_curves(ref, test, window, tolerance):
    """The two curves' window means; within tolerance when every window after the first (where the
    scaler may still be calibrating) differs by at most `tolerance` nats."""
    a, b = window_means(ref, window), window_means(test, window)
    diffs = [abs(x - y) for x, y in zip(a, b)]
    judged = diffs[1:] or diffs
    return {"window": window, "reference_means": a, "float16_means": b, "window_diffs": diffs,
            "max_diff": max(judged), "final_diff": diffs[-1], "within_tolerance": max(judged) <= tolerance}


def reference_dtype(device):
    """bfloat16 where the device has it natively (the run fp16 stands in for), else float32."""
    if device.type == "cuda" and not cuda_has_bf16(device)[0]:
        return torch.float32
    return torch.bfloat16


def run_fp16(cfg, device):
    """The baby GPT in the reference dtype and in float16 + GradScaler, step for step."""
    tcfg = recipe(FP16_CONFIG, dry_run=cfg.dry_run, scratch=False)  # the characters' vocabulary of the data
    data_dir = resolve_data_dir(tcfg.data_dir, tcfg.dataset)
    prepare_shipped(data_dir)  # Tiny Shakespeare ships: seconds, nothing downloaded
    data = TokenData(data_dir, "train")
    mcfg = saved_config(scratch_model_args(tcfg, data.meta))
    steps = 20 if cfg.dry_run else cfg.fp16_steps
    ref = reference_dtype(device)
    curves = {}
    for dtype in (ref, torch.float16):
        curves[dtype] = loss_curve(tcfg, mcfg, data, device, dtype, steps, cfg.seed)
        print(f"fp16: {str(dtype).replace('torch.', '')}: loss {curves[dtype][0][0]:.4f} -> {curves[dtype][0][-1]:.4f} "
              f"in {steps} steps, {sum(curves[dtype][1])} skipped", flush=True)
    cmp = compare_curves(curves[ref][0], curves[torch.float16][0], max(1, steps // 10), cfg.fp16_tolerance)
    calib, after = calibration_skips(curves[torch.float16][1])
    result = {"status": "ok" if cmp["within_tolerance"] else "failed", "config_file": FP16_CONFIG, "steps": steps,
              "reference_dtype": str(ref).replace("torch.", ""), "tolerance": cfg.fp16_tolerance, **cmp,
              "calibration_skips": calib, "skips_after_calibration": after,
              "reference_skips": sum(curves[ref][1]), "final_scale": curves[torch.float16][2][-1],
              "losses": {str(d).replace("torch.", ""): c[0] for d, c in curves.items()}, "dry_run": cfg.dry_run,
              "model_args": dataclasses.asdict(mcfg)}
    if not cmp["within_tolerance"]:
        result["note"] = (f"float16's {cmp['window']}-step loss means differ from {result['reference_dtype']}'s by up "
                          f"to {cmp['max_diff']:.3f} nats (tolerance {cfg.fp16_tolerance})")
    return result


def fp16_table(res):
    ref = res["reference_dtype"]
    losses = res["losses"]
    return [("fp16", f"{res['steps']} steps, {ref} vs float16 + GradScaler",
             f"final loss {losses[ref][-1]:.4f} vs {losses['float16'][-1]:.4f}; {res['window']}-step means differ "
             f"by <= {res['max_diff']:.3f} nats after the first window (tolerance {res['tolerance']}: "
             f"{'within' if res['within_tolerance'] else 'OUTSIDE'})"),
            ("fp16", "steps the scaler skipped",
             f"{res['calibration_skips']} while calibrating, {res['skips_after_calibration']} after; final scale "
             f"{res['final_scale']:g}")]
