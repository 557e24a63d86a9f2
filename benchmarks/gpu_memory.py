"""
Two prepared parts of benchmarks/gpu_check.py about what fits in a card's memory:

  gptj      GPT-J-6B's shape (random weights, made on the GPU one tensor at a time, each block
            matmul quantised to int8 as it arrives, as benchmarks/gptj_memory.py does on a CPU;
            bitsandbytes quantises on the GPU only a weight that comes from the host: int8_linear_on),
            LoRA, 8-bit AdamW and activation checkpointing as config/finetune_gptj_lora_all.py
            sets them, at its batch 4 x 128: one warm-up and two timed training steps, the peak
            memory against an 11 GiB card and against memory.py's estimate. Needs bitsandbytes.
  memory24  a 24 GB card's recipes with this process's CUDA allocator capped at cap_gib (24 GiB):
            the 163M Chinchilla model at batch 6 (config/train_gpt2_chinchilla.py, compiled as it
            says) and GPT-2 XL's shape fine-tuned as config/finetune_shakespeare.py says, as it is
            and with each memory knob its header recommends: fits or not, the peak, tokens/s, and
            memory.py's prediction (the planner's verdict) beside each

    python benchmarks/gpu_check.py --parts=gptj,memory24
    python benchmarks/gpu_check.py --device=cpu --dry_run=True --parts=gptj,memory24   # the code, on a CPU

The cap (torch.cuda.set_per_process_memory_fraction) bounds what the allocator reserves; the CUDA
context (~0.5 GiB) is outside it, so a row that fits with less headroom than that is marginal on a
real 24 GB card, and the table says so.
"""

import importlib.util

import gpu_rows  # first: it puts the checkout on sys.path for a plain `python benchmarks/...`
import torch

from homegpt import memory
from gptj_memory import GPTJMemoryConfig, gptj_config
from homegpt.hf import place_weight
from model import GPT
from homegpt.quant import INT8_THRESHOLD, QUANTIZED_SUFFIXES, bitsandbytes
from gpu_rows import GIB, builder, cap_memory, estimate, finish, gib, recipe, shape_of, train_row, uncap_memory

GPTJ_CONFIG = "config/finetune_gptj_lora_all.py"
GPTJ_BUDGET_GIB = 11.0  # a GTX 1080 Ti / RTX 2080 Ti: the card docs/gptj.md aims at
GPTJ_COUNTS = (1, 2)  # warm-up (bitsandbytes' first kernels), timed steps: each is seconds at 6B
DRY_GPTJ = dict(n_layer=2, n_head=4, n_embd=64, rotary_dim=8, vocab_size=512)  # GPT-J's layout, tiny
CONTEXT_BYTES = GIB // 2  # the CUDA context a real card loses outside the allocator

CHINCHILLA_CONFIG = "config/train_gpt2_chinchilla.py"
XL_CONFIG = "config/finetune_shakespeare.py"
# config/finetune_shakespeare.py's run as it is, then each change its header recommends for a 24 GB card
XL_VARIANTS = ((), ("--optimizer=adamw8bit",), ("--optimizer=adamw8bit", "--activation_checkpointing=True"),
               ("--lora_rank=8",), ("--init_from=gpt2-large",))


def int8_linear_on(device, weight, bias):
    """quant.quantized_linear's int8 layer (frozen, LLM.int8), quantised on `device`. bitsandbytes 0.50
    quantises an Int8Params as it moves from the CPU to another device, and leaves one already on CUDA
    in float (Int8Params.to): quantized_linear of a weight drawn on the GPU would keep GPT-J's block
    matmuls in float32 (22.5 GB), and one quantised on the CPU takes seconds per matrix (4.4 s for
    GPT-J's 16384 x 4096 on a 2-core EPYC). So each weight goes through the host once and is
    quantised by the GPU on its way back."""
    bnb = bitsandbytes()
    out_features, in_features = weight.shape
    m = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                            threshold=INT8_THRESHOLD, device="meta")
    m.weight = bnb.nn.Int8Params(weight.detach().cpu(), requires_grad=False, has_fp16_weights=False).to(device)
    return m


def random_quantized(mcfg, device, base_quant, seed):
    """mcfg's GPT with random weights (std 0.02; LayerNorm gains 1, biases 0) drawn on the device one
    tensor at a time, each block matmul quantised to int8 as it arrives, every other tensor placed by
    the loader's hf.place_weight: the float model (24 GB for GPT-J) never exists, on the GPU or off it."""
    assert base_quant == "int8", f"the gptj part builds an int8 base, not {base_quant!r}"
    with torch.device("meta"):
        model = GPT(mcfg)
    g = torch.Generator(device=device).manual_seed(seed)
    for key, p in list(model.named_parameters()):
        if key.endswith(("ln_1.weight", "ln_f.weight")):
            t = torch.ones(p.shape, device=device)
        elif p.dim() == 1:
            t = torch.zeros(p.shape, device=device)
        else:
            t = torch.randn(p.shape, generator=g, device=device).mul_(0.02)
        name, _, attr = key.rpartition(".")
        if attr == "weight" and name.startswith("transformer.h.") and name.endswith(QUANTIZED_SUFFIXES):
            model.set_submodule(name, int8_linear_on(device, t, model.get_submodule(name).bias))
        else:  # (a quantised layer's bias, still on the meta device, is placed here as well)
            place_weight(model, key, t)
        del t
    return model


def run_gptj(cfg, device, dtype):
    """One GPT-J-6B-shaped LoRA step on an int8 base: its peak against 11 GiB and memory.py."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"status": "error", "note": "bitsandbytes is not installed: carry its wheel and install it first "
                                           "(docs/gpu_check.md, 'Prepared, not yet run')"}
    tcfg = recipe(GPTJ_CONFIG, dry_run=cfg.dry_run, scratch=False)  # its batch, block, LoRA, optimizer
    mcfg = gptj_config(GPTJMemoryConfig(**(DRY_GPTJ if cfg.dry_run else {})))
    shape = shape_of(tcfg, mcfg)
    est = estimate(shape, tcfg, dtype, tcfg.batch_size)
    row = train_row("GPT-J-6B shape, int8 base, LoRA all, adamw8bit, checkpointing",
                    lambda: finish(random_quantized(mcfg, device, tcfg.base_quant, cfg.seed), tcfg), tcfg, device,
                    dtype, tcfg.batch_size, GPTJ_COUNTS, estimated_bytes=est["total"], dry_run=cfg.dry_run)
    print(f"gptj: {gpu_rows.row_text(row)}", flush=True)
    budget = int(GPTJ_BUDGET_GIB * GIB)
    peak = row["peak_reserved_bytes"] or row["peak_allocated_bytes"]
    return {"status": "ok" if row["status"] in ("ok", "oom") else "error", "note": row["note"],
            "config_file": GPTJ_CONFIG, "model_args": {k: getattr(mcfg, k) for k in DRY_GPTJ}, "row": row,
            "n_params": shape.get_num_params(), "budget_bytes": budget, "estimate": est,
            "planner_fits": memory.fits(est, budget),
            "fits_budget": None if peak is None or row["status"] != "ok" else peak + CONTEXT_BYTES <= budget,
            "peak_over_estimate": peak / est["total"] if peak and row["status"] == "ok" else None,
            "dry_run": cfg.dry_run}


def gptj_table(res):
    if "row" not in res:
        return [("gptj", "error", res["note"])]
    r = res["row"]
    verdict = {True: "fits", False: "does NOT fit", None: "unknown"}
    return [("gptj", f"batch {r['batch_size']} x {r['block_size']}, {r['dtype']}", gpu_rows.row_text(r)),
            ("gptj", f"an {GPTJ_BUDGET_GIB:g} GiB card",
             f"measured: {verdict[res['fits_budget']]} (peak reserved + 0.5 GiB context); memory.py: "
             f"{verdict[res['planner_fits']]}; peak / estimate "
             + (f"{res['peak_over_estimate']:.2f}" if res["peak_over_estimate"] else "-"))]


# ----------------------------------------------------------------------------- a 24 GB card

def memory24_recipes(cfg):
    """(label, TrainConfig) of each recipe row."""
    yield "163M Chinchilla, batch 6", recipe(CHINCHILLA_CONFIG, ("--batch_size=6",), cfg.dry_run)
    for over in XL_VARIANTS:
        yield f"{XL_CONFIG} {' '.join(over) or 'as it is'}", recipe(XL_CONFIG, over, cfg.dry_run)


def run_memory24(cfg, device, dtype, peak):
    """Each recipe's row under the cap, beside memory.py's verdict for a card of cap_gib."""
    cap = int(cfg.cap_gib * GIB)
    fraction = cap_memory(device, cfg.cap_gib)
    rows = []
    try:
        for label, tcfg in memory24_recipes(cfg):
            est = estimate(shape_of(tcfg), tcfg, dtype, tcfg.batch_size)
            row = train_row(label, builder(tcfg, device, cfg.seed), tcfg, device, dtype, tcfg.batch_size,
                            gpu_rows.step_counts(cfg), compile_mode="default" if tcfg.compile else None,
                            peak_flops=peak, estimated_bytes=est["total"], dry_run=cfg.dry_run)
            row["fits"] = {"ok": True, "oom": False}.get(row["status"])  # an error says nothing about fitting
            row["planner_fits"] = memory.fits(est, cap)
            reserved = row["peak_reserved_bytes"]
            row["marginal"] = bool(row["fits"] and reserved is not None and reserved + CONTEXT_BYTES > cap)
            rows.append(row)
            print(f"memory24: {label}: {gpu_rows.row_text(row)}; memory.py says "
                  f"{'fits' if row['planner_fits'] else 'does NOT fit'}", flush=True)
    finally:
        uncap_memory(device)
    return {"status": "ok", "cap_bytes": cap, "cap_fraction": fraction, "rows": rows, "dry_run": cfg.dry_run,
            "note": "" if fraction else "not capped: no CUDA (dry run)"}


def memory24_table(res):
    out = []
    for r in res["rows"]:
        fits = {True: "fits" + (" (marginal: < 0.5 GiB left for the context)" if r["marginal"] else ""),
                False: "does NOT fit", None: "unknown"}[r["fits"]]
        planner = {True: "fits", False: "does NOT fit", None: "unknown"}[r["planner_fits"]]
        agree = "agree" if r["fits"] == r["planner_fits"] else "DISAGREE"
        out.append(("memory24", f"{r['label']} ({gib(res['cap_bytes'])} cap)",
                    f"{fits}; memory.py {planner} ({agree}); {gpu_rows.row_text(r)}"))
    return out
