"""
How much device memory a training run will need, estimated before it starts, and what to change when
it will not fit.

    from homegpt import memory
    from model import GPTConfig
    est = memory.estimate_training_memory(GPTConfig(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257),
                                          batch_size=1, block_size=1024, compute_dtype_bytes=2)
    print(memory.memory_report(est, memory.device_memory("cuda")))   # gpt2-xl on your GPU?

    python -c "import memory, model; print(memory.memory_report(memory.estimate_training_memory(model.GPTConfig(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257), 1, 1024, compute_dtype_bytes=2), 24 * 2**30))"

What is counted (bytes, per device, for one micro-batch; gradient accumulation adds nothing):
- weights: every parameter at its stored size (a tied wte/lm_head once).
- gradients and optimizer states: for the trainable parameters only (LoRA trains few). AdamW keeps two
  states per parameter at the parameter's size; bitsandbytes' 8-bit AdamW one byte each, plus one
  fp32 scale per block of 256, and plain fp32 states for tensors under 4,096 elements. Muon
  (optimizer='muon') keeps one momentum buffer per block matrix, AdamW's two for the rest.
- activations: what autograd saves for backward. Per GPT-2 block, following Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models" (section 4.1), whose count for
  16-bit activations is s*b*h*(34 + 5*a*s/h) bytes (s block_size, b batch, h n_embd, a heads).
  Spelled out per tensor for model.py, with c = compute bytes (2 under bf16/fp16 autocast, 4 in
  fp32) and r = bytes of the residual stream (fp32 under autocast: the embeddings and residual adds
  stay in the weights' dtype):
      LayerNorm inputs 2*r*sbh; LayerNorm outputs as matmul inputs 2*c*sbh; q, k, v 3*c*sbh;
      attention output = c_proj's input c*sbh (the fused kernels already return it in (B, T, C)
      layout, so the .contiguous() is free); MLP 2*c*s*b*f (f = 4h, the GELU's input and output)
      -> s*b*h*(2r + 14c) with f = 4h: 32*sbh at c = r = 2, the paper's 34 less its dropout masks.
  The a*s*s attention matrix is not stored: scaled_dot_product_attention's fused kernels (flash /
  memory-efficient, and torch's CPU flash kernel without dropout) recompute it in backward and keep
  a*s*b fp32 log-sum-exps instead. flash_attention=False restores the paper's s^2 terms (softmax
  output, and with dropout its mask and output). Dropout adds two 1-byte masks per block (s*b*h
  each), as on CUDA. On a CPU with dropout, model.py writes attention out (fast_dropout): that is
  the flash_attention=False count, except that the softmax output stays fp32 under autocast (4 bytes,
  not c). With activation checkpointing only each block's input (r*sbh) is kept, and one
  block's activations exist again while it is recomputed in backward.
- weight copies: autocast casts each matmul weight to the compute dtype and keeps the copy for
  backward: c bytes per matmul weight (all blocks, or one block under checkpointing, plus lm_head).
- logits: 12 bytes per logit (b*s*V*12) at the start of backward, whatever the compute dtype: the fp32
  log-softmax output cross-entropy keeps, the fp32 gradient the loss sends back to it and the one it
  returns, alive together. In forward the lm_head output (c), its fp32 copy and the log-softmax
  output (4 + 4) reach c + 8 <= 12 and are gone by then (an H200's measured peak agrees:
  docs/gpu_check.md). With GPT-2's 50,257-token vocabulary this is often the largest activation of all.
- several ranks (world_size > 1): DDP replicates everything above on every GPU; with
  gradient_as_bucket_view (train.py sets it) its communication buckets are the gradients
  themselves, so it adds no copy. FSDP divides weights, gradients and optimizer states by the ranks,
  then gathers what is being computed: the root unit's weights (wte, wpe, ln_f, an untied lm_head;
  fully_shard keeps the root gathered through forward and backward), two blocks' weights (the one
  computing and the one prefetched) and one block's unsharded gradients before its reduce-scatter.
Not counted: the CUDA context and allocator fragmentation (~0.5-1 GB), hence the 10% margin in the
verdict, and evaluation, which needs far less. tests/test_memory.py checks the formula against what
autograd really saves on the CPU.
"""

import os

import torch

from homegpt.errors import UserError
from homegpt.quant import QUANTIZED_SUFFIXES, check_kind, from_bitsandbytes
from homegpt.optimizers import OPTIMIZERS, muon_matrices
from model import GPT
from homegpt.quant import quantized_bytes

GB = 1024 ** 3
BNB_BLOCK = 256  # bitsandbytes' 8-bit optimizers quantise states in blocks of 256, one fp32 scale each
BNB_MIN_SIZE = 4096  # smaller tensors keep 32-bit states (bitsandbytes' min_8bit_size)
FIT_MARGIN = 0.9  # use at most 90% of the device: CUDA context, fragmentation, evaluation buffers
CPU_RECIPE = "config/train_shakespeare_char_cpu.py"  # what a CPU user should run instead of a GPU recipe


def estimate_training_memory(model, batch_size, block_size, trainable_params=None, param_dtype_bytes=None,
                             compute_dtype_bytes=4, optimizer="adamw", activation_checkpointing=False,
                             flash_attention=True, dropout=None, world_size=1, fsdp=False, base_quant=""):
    """Bytes of one training step on one device: a dict with "weights", "gradients", "optimizer",
    "activations", "weight_copies", "logits", "total" (all ints) and "settings" (the inputs, used
    by memory_report to price its advice).

    model: a GPT, or a GPTConfig (nothing is allocated: the model is built on the meta device).
    trainable_params: how many parameters train (default: those with requires_grad).
    param_dtype_bytes: bytes per stored weight (default: each parameter's own dtype).
    compute_dtype_bytes: 2 under bf16/fp16 autocast, 4 in fp32.
    optimizer: "adamw", "adamw8bit" or "muon". dropout: default the model's config.
    world_size, fsdp: the ranks of a torchrun job and whether FSDP shards over them (else DDP).
    base_quant: 'int8' / 'nf4' prices the frozen block matmuls of a float (or meta) model as quant.py
    would store them; a model quantised already is priced as it is (bitsandbytes' own dtypes).
    """
    if optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer={optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    if compute_dtype_bytes not in (2, 4):
        raise UserError(f"compute_dtype_bytes={compute_dtype_bytes}: expected 2 (bf16/fp16) or 4 (fp32)")
    if not isinstance(model, torch.nn.Module):
        with torch.device("meta"):  # shapes and counts only; gpt2-xl costs nothing
            model = GPT(model)
    cfg = model.config
    size = (lambda p: param_dtype_bytes) if param_dtype_bytes else (lambda p: p.element_size())
    quantized = _quantized_weights(model, base_quant)

    def nbytes(p):
        if id(p) in quantized:
            return quantized_bytes(p.numel(), base_quant, quantized[id(p)])
        return p.numel() * size(p)

    settings = dict(
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
        mlp_width=model.transformer.h[0].mlp.c_fc.out_features if cfg.n_layer else 4 * cfg.n_embd,
        batch_size=batch_size, block_size=block_size,
        **_parameter_bytes(model, nbytes, size, trainable_params, param_dtype_bytes),
        **_weight_copies(model, quantized, size, compute_dtype_bytes),
        compute_bytes=compute_dtype_bytes, residual_bytes=max(size(model.transformer.wte.weight), compute_dtype_bytes),
        optimizer=optimizer, activation_checkpointing=activation_checkpointing,
        flash_attention=flash_attention, dropout=cfg.dropout if dropout is None else dropout,
        world_size=world_size, fsdp=bool(fsdp and world_size > 1),
    )
    return estimate_from_settings(settings)


def _parameter_bytes(model, nbytes, size, trainable_params, param_dtype_bytes):
    """The parameter counts and sizes estimate_from_settings prices: all weights, the trainable ones
    (gradients, optimizer states), Muon's matrices, and one block against the FSDP root unit."""
    cfg = model.config
    params = list(model.parameters())  # shared (tied) tensors appear once
    trainable = [p for p in params if p.requires_grad]
    if trainable_params is None:
        n_trainable = sum(p.numel() for p in trainable)
        train_bytes = sum(nbytes(p) for p in trainable)
        small = sum(p.numel() for p in trainable if p.numel() < BNB_MIN_SIZE)
    else:  # a count only: assume fp32-sized parameters of the large kind
        n_trainable, train_bytes, small = trainable_params, trainable_params * (param_dtype_bytes or 4), 0
    block_bytes = sum(nbytes(p) for p in model.transformer.h[0].parameters()) if cfg.n_layer else 0
    return dict(
        weights=sum(nbytes(p) for p in params),
        n_params=sum(p.numel() for p in params), n_trainable=n_trainable, trainable_bytes=train_bytes,
        n_small_trainable=small,
        muon_bytes=sum(nbytes(p) for p in muon_matrices(model)),  # what Muon would take
        block_bytes=block_bytes, root_bytes=sum(p.numel() * size(p) for p in params) - cfg.n_layer * block_bytes,
    )


def _weight_copies(model, quantized, size, compute_dtype_bytes):
    """What autocast copies of the weights cost (elements), and the scratch a quantised layer's
    backward dequantises into (bytes)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    lm_head = model.lm_head.weight
    # (bitsandbytes' layers are nn.Linear too, stored in 1 byte or less: autocast copies none of them)
    block_weights = [m.weight for m in linears if m.weight is not lm_head and id(m.weight) not in quantized]
    # a quantised layer's backward multiplies by its weight dequantised to the compute dtype: one
    # matrix at a time, the largest (bitsandbytes' MatMul8bitLt / MatMul4Bit)
    sizes = [m.in_features * m.out_features for m in model.modules()
             if from_bitsandbytes(m) or id(getattr(m, "weight", None)) in quantized]
    return dict(
        # autocast copies a weight only when it is stored wider than the compute dtype
        copied_block_weights=sum(w.numel() for w in block_weights if size(w) > compute_dtype_bytes),
        copied_lm_head=lm_head.numel() if size(lm_head) > compute_dtype_bytes else 0,
        dequantized_scratch=max(sizes, default=0) * compute_dtype_bytes,
    )


def _quantized_weights(model, base_quant):
    """{id(weight): rows} of the frozen float block matmuls that base_quant would store quantised."""
    if not base_quant:
        return {}
    check_kind(base_quant)
    return {id(m.weight): m.weight.shape[0] for n, m in model.named_modules()
            if n.startswith("transformer.h.") and n.endswith(QUANTIZED_SUFFIXES) and not from_bitsandbytes(m)
            and isinstance(getattr(m, "weight", None), torch.Tensor) and not m.weight.requires_grad}


def block_activation_bytes(s, b, h, a, f, c, r, dropout=0.0, flash_attention=True):
    """Bytes autograd keeps for one GPT-2 block (see the module docstring for each term)."""
    sbh = s * b * h
    n = sbh * (2 * r + 6 * c) + 2 * s * b * f * c  # LayerNorm in/out, q/k/v, attention output, MLP
    n += 2 * 2 * s * b * 4  # each LayerNorm's fp32 mean and rstd per position
    if flash_attention:
        n += a * s * b * 4  # fp32 log-sum-exp per query row
    else:
        n += a * s * s * b * (c + ((1 + c) if dropout > 0 else 0))  # softmax out (+ dropout mask, out)
    if dropout > 0:
        n += 2 * sbh  # residual dropout masks after attention and MLP, one byte per element
    return n


def estimate_from_settings(st):
    """The arithmetic of estimate_training_memory on plain numbers (memory_report re-prices advice with it)."""
    s, b, h, a, L = st["block_size"], st["batch_size"], st["n_embd"], st["n_head"], st["n_layer"]
    c, r, V = st["compute_bytes"], st["residual_bytes"], st["vocab_size"]
    per_block = block_activation_bytes(s, b, h, a, st["mlp_width"], c, r, st["dropout"], st["flash_attention"])
    head = s * b * h * (r + c) + 2 * s * b * 4  # ln_f input and output (lm_head's input), ln_f stats
    head += s * b * 8  # token ids kept by the embedding for its backward (int64)
    if st["dropout"] > 0:
        head += s * b * h  # the embedding dropout's mask
    if st["activation_checkpointing"]:
        # each block's input, plus one block recomputed at a time in backward
        activations = L * s * b * h * r + per_block + head
        copies = (st["copied_block_weights"] // max(L, 1) + st["copied_lm_head"]) * c
    else:
        activations = L * per_block + head
        copies = (st["copied_block_weights"] + st["copied_lm_head"]) * c
    copies += st.get("dequantized_scratch", 0)
    n = st["n_trainable"]
    if st["optimizer"] == "adamw":
        optimizer = 2 * st["trainable_bytes"]
    elif st["optimizer"] == "muon":
        optimizer = 2 * st["trainable_bytes"] - st["muon_bytes"]
    else:
        big = n - st["n_small_trainable"]
        optimizer = 2 * big + 2 * 4 * -(-big // BNB_BLOCK) + 2 * 4 * st["n_small_trainable"]
    weights, gradients, gathered = st["weights"], st["trainable_bytes"], 0
    if st.get("fsdp"):
        W = st["world_size"]
        weights, gradients, optimizer = -(-weights // W), -(-gradients // W), -(-optimizer // W)
        # gathered root + the computing and the prefetched block's weights, one block's unsharded gradients
        gathered = st["root_bytes"] + 2 * st["block_bytes"] + st["block_bytes"] * (st["n_trainable"] > 0)
    est = dict(
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        fsdp_gathered=gathered,
        activations=activations,
        weight_copies=copies,
        logits=b * s * V * 12,  # fp32 log-probs kept + the fp32 gradients into and out of log-softmax
    )
    est["total"] = sum(est.values())
    est["settings"] = dict(st)
    return est


def budget_report(model, max_iters, tokens_per_iter, iters_left, device, peak_flops, peak_source, world_size=1):
    """Parameters, the run's FLOPs budget and the least time its iterations left can take at the
    device's peak. On a CPU, a run that needs over half an hour even at the peak was written for a
    GPU: the report says so and names the CPU recipe."""
    n_params = model.get_num_params()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens = max_iters * tokens_per_iter
    floor_s = model.flops_per_token(model.config.block_size) * iters_left * tokens_per_iter / world_size / peak_flops
    lines = [f"model: {n_params:,} parameters ({model.get_num_params(non_embedding=True):,} without embeddings), "
             f"{n_train:,} trained",
             f"budget: {tokens:,} tokens, 6ND = {6 * n_params * tokens:.3g} FLOPs, {tokens / n_params:.1f} tokens per "
             f"parameter (Chinchilla-optimal ~20); at this device's peak ({peak_flops / 1e12:.2f} TFLOP/s, "
             f"{peak_source}) the {iters_left:,} iterations left take at least {floor_s / 60:,.1f} min"]
    if device.type == "cpu" and floor_s > 1800:
        lines.append(f"note: this config needs at least {floor_s / 3600:,.1f} h on this CPU even at its peak matmul "
                     f"rate (real runs reach a fraction of it): it was written for a GPU. On a CPU, {CPU_RECIPE} "
                     f"trains a character-level Shakespeare model in a few minutes")
    return "\n".join(lines)


def check_training_memory(model, cfg, dtype, device, world_size=1, fsdp=False, log=print):
    """train.py's one memory check: the estimate of training model as cfg says (its micro-batch,
    optimizer, activation checkpointing) on device, logged as a table, and a UserError when it does NOT
    fit, unless cfg.ignore_memory_estimate."""
    est = estimate_training_memory(model, cfg.batch_size, cfg.block_size,
                                   compute_dtype_bytes=4 if dtype == torch.float32 else 2, optimizer=cfg.optimizer,
                                   activation_checkpointing=cfg.activation_checkpointing, world_size=world_size,
                                   fsdp=fsdp)
    available = device_memory(device)
    log(memory_report(est, available))
    if fits(est, available) is False and not cfg.ignore_memory_estimate:
        raise UserError("the memory estimate above does NOT fit this device: take one of the changes it lists, or "
                        "pass --ignore_memory_estimate=True to try anyway")


def device_memory(device):
    """Bytes the device offers: total CUDA memory, Apple's recommended MPS budget, or for the CPU the
    available RAM (MemAvailable from /proc/meminfo, else sysconf). None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    if device.type == "mps":
        budget = getattr(torch.mps, "recommended_max_memory", None)
        if budget is not None and torch.backends.mps.is_available():
            return budget()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except OSError:
        pass
    try:  # macOS and other Unixes without /proc
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def fits(est, available):
    """True / False with the margin for the CUDA context and fragmentation; None when unknown."""
    return None if available is None else est["total"] <= FIT_MARGIN * available


def _gb(n):
    return f"{n / GB:8.2f} GB"


def memory_report(est, available):
    """A short table of the estimate; when it will not fit, what each knob would bring the total to."""
    st = est["settings"]
    sharded = f" /{st['world_size']} (FSDP)" if st.get("fsdp") else ""
    rows = [("weights" + sharded, est["weights"]), ("gradients" + sharded, est["gradients"]),
            (f"optimizer ({st['optimizer']})" + sharded, est["optimizer"]),
            ("FSDP gathered (root, 2 blocks)", est.get("fsdp_gathered", 0)),
            ("activations" + (" (checkpointed)" if st["activation_checkpointing"] else ""), est["activations"]),
            ("weight copies (autocast, dequantised)" if st.get("dequantized_scratch") else "autocast weight copies",
             est["weight_copies"]), ("logits + grad", est["logits"])]
    per_rank = ""
    if st.get("world_size", 1) > 1:
        how = "FSDP" if st["fsdp"] else "DDP: a full replica each, whose buckets are the gradients themselves"
        per_rank = f", per GPU of {st['world_size']} ({how})"
    lines = [f"memory estimate for training: {st['n_params'] / 1e6:,.1f}M parameters "
             f"({st['n_trainable'] / 1e6:,.2f}M trained), micro-batch {st['batch_size']} x {st['block_size']} tokens"
             f"{per_rank}"]
    lines += [f"  {name:<34}{_gb(n)}" for name, n in rows if n or name.startswith(("weights", "activations"))]
    lines.append(f"  {'total':<34}{_gb(est['total'])}")
    verdict = fits(est, available)
    if verdict is None:
        lines.append("  available: unknown")
        return "\n".join(lines)
    lines.append(f"  {'available':<34}{_gb(available)}  -> "
                 + ("fits" if verdict else f"does NOT fit (keep under {FIT_MARGIN:.0%} of the device)"))
    if not verdict:
        lines.append("  to fit, try (estimated total after each change alone):")
        for knob, total in advice(est):
            lines.append(f"    {knob:<58}{_gb(total)}")
    return "\n".join(lines)


def advice(est):
    """[(knob to set, estimated total with it)] for the knobs that reduce memory and are not yet set."""
    st, out = est["settings"], []

    def priced(**change):
        return estimate_from_settings({**st, **change})["total"]

    if st["n_trainable"] == st["n_params"]:
        # LoRA rank 8 on the attention matmuls: (h + 3h) * 8 + (h + h) * 8 parameters per block,
        # the frozen base keeps no gradients or optimizer states (weights stay at their stored size)
        lora = 6 * st["n_embd"] * 8 * st["n_layer"]
        lora_bytes = lora * 4
        out.append(("lora_rank=8 (LoRA: trains ~%.1fM parameters)" % (lora / 1e6),
                    priced(n_trainable=lora, trainable_bytes=lora_bytes, n_small_trainable=0,
                           weights=st["weights"] + lora_bytes)))
    frozen = st["weights"] - st["trainable_bytes"]
    if st["n_trainable"] < st["n_params"] and st["copied_block_weights"]:
        # the frozen base stored in bf16: half the bytes, and autocast has nothing left to copy
        out.append(("base_dtype='bfloat16' (store the frozen base in bf16)",
                    priced(weights=frozen // 2 + st["trainable_bytes"], copied_block_weights=0, copied_lm_head=0)))
    if st["n_trainable"] < st["n_params"] and st["copied_block_weights"] and not st.get("dequantized_scratch"):
        # the frozen block matmuls in int8 (quant.py): 1 byte each instead of their stored size
        per = max(st["weights"] - st["trainable_bytes"], 0) / max(st["n_params"] - st["n_trainable"], 1)
        saved = int(st["copied_block_weights"] * (per - 1))
        out.append(("base_quant='int8' (bitsandbytes int8 frozen matmuls)",
                    priced(weights=st["weights"] - saved, copied_block_weights=0,
                           dequantized_scratch=st["mlp_width"] * st["n_embd"] * st["compute_bytes"])))
    if st["optimizer"] == "adamw":
        out.append(("optimizer='adamw8bit' (bitsandbytes)", priced(optimizer="adamw8bit")))
    if not st["activation_checkpointing"]:
        out.append(("activation_checkpointing=True (one more forward per step)", priced(activation_checkpointing=True)))
    if st["block_size"] > 128:
        out.append((f"block_size={st['block_size'] // 2}", priced(block_size=st["block_size"] // 2)))
    if st["batch_size"] > 1:
        out.append((f"batch_size={max(1, st['batch_size'] // 2)} (raise gradient_accumulation_steps to keep "
                    f"tokens per step)", priced(batch_size=max(1, st["batch_size"] // 2))))
    return out

