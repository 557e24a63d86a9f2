"""
Train or fine-tune a GPT: one process, or many under torchrun (DDP, or FSDP with --fsdp=True).

    python train.py config/train_shakespeare_char_cpu.py
    python train.py config/train_shakespeare_char.py --device=cpu --n_layer=4 --max_iters=100
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
    torchrun --standalone --nproc_per_node=2 train.py config/train_shakespeare_char_cpu.py  # gloo, on a CPU

The loop, in labelled phases: learning rate -> evaluate / checkpoint -> stop? -> micro-steps ->
clip and step -> log. Checkpoints resume exactly (init_from='resume'); SIGTERM or Ctrl-C finishes
the current step, saves and exits.
"""

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import checkpoint as ckpt_lib
from configurator import run
from dataloader import (RandomSampler, atomic_write, SequentialSampler, TokenData, Tokenizer, eval_batches, make_sampler,
                        to_device)
from model import GPT, GPTConfig
from runtime import (NoInferenceMode, all_reduce_sum, autocast, barrier, close_distributed, gather_objects,
                     init_distributed, make_scaler, peak_flops, pick_dtype, print0, rng_state, seed_everything,
                     set_rng_state, setup_backends, shard_model, step_seed)


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # checkpoints and metrics.jsonl go here
    eval_interval: int = 2000  # evaluate (and maybe checkpoint) every this many iterations
    log_interval: int = 1  # print and append to metrics.jsonl every this many iterations
    eval_iters: int = 200  # batches of the fixed validation set per evaluation; 0 = the whole split
    eval_only: bool = False  # evaluate once and exit
    always_save_checkpoint: bool = True  # save at each evaluation; False = only when val improved
    save_interval: int = 0  # also save every this many iterations, independent of evaluation; 0 = off
    keep_last_n: int = 3  # checkpoints kept besides latest and best
    init_from: str = "scratch"  # 'scratch' | 'resume' | 'gpt2[-medium|-large|-xl]' | HF dir | one of our out_dirs
    seed: int = 1337
    max_bad_steps: int = 10  # stop (with a checkpoint) after this many non-finite steps in a row
    # wandb (optional, imported only when on)
    wandb_log: bool = False
    wandb_project: str = "homegpt"
    wandb_run_name: str = "run"
    # data
    dataset: str = "shakespeare_char"  # a folder under data/
    data_dir: str = ""  # '' = data/<dataset>; else any prepared directory (e.g. FineWeb shards)
    sampling: str = "random"  # 'random' windows (nanoGPT) or 'sequential' (every window once per epoch)
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step, summed over all ranks
    batch_size: int = 12  # sequences per micro-step per rank
    block_size: int = 1024  # context length
    # supervised fine-tuning on JSONL (instead of token files)
    sft_train_file: str = ""  # Alpaca or prompt/completion JSONL; '' = pretraining on token files
    sft_val_file: str = ""  # JSONL for validation loss (on completions only)
    sft_template: str = ""  # prompt template with {instruction} and {input}; '' = Alpaca's
    sft_packing: bool = False  # pack several examples per row instead of padding
    # model (ignored when starting from pretrained weights; resume refuses a change of shape)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 for pretraining; 0.1+ for fine-tuning or small data
    fast_dropout: bool = True  # on a CPU, model.fast_dropout's masks and attention (1.9x faster bf16 step); False = torch's
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    qkv_bias: Optional[bool] = None  # None = same as bias
    tie_weights: bool = True  # lm_head shares wte, as GPT-2
    vocab_size: int = 0  # 0 = the dataset's (meta.json), else 50304 (GPT-2's padded to a multiple of 64)
    activation: str = "gelu_tanh"
    activation_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    # fine-tuning a part of the model
    lora_rank: int = 0  # 0 disables LoRA
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "attn"  # 'attn' (c_attn, attention c_proj) or 'all' linear layers of the blocks
    train_1d_only: bool = False  # train only biases and LayerNorm gains
    base_dtype: str = "float32"  # storage of the frozen base under LoRA: 'float32' or 'bfloat16'
    # optimizer
    # 'adamw', 'adamw8bit' (bitsandbytes, CUDA) or 'muon': torch.optim.Muon for the blocks' matrices at
    # muon_lr, AdamW at learning_rate for embeddings, lm_head, biases and gains (both on the schedule)
    optimizer: str = "adamw"
    learning_rate: float = 6e-4
    muon_lr: float = 0.02  # optimizer='muon' only: the peak learning rate of the matrices
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0  # decoupled, per step: lr * muon_weight_decay
    max_iters: int = 600000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    # learning rate schedule: linear warmup, then cosine decay to min_lr
    decay_lr: bool = True  # False = constant learning_rate (after warmup)
    warmup_iters: int = 2000
    lr_decay_iters: int = 600000  # ~ max_iters (Chinchilla)
    min_lr: float = 6e-5  # ~ learning_rate / 10 (Chinchilla)
    # system
    backend: str = "auto"  # torchrun process group: auto = nccl on CUDA, gloo on CPU; or 'nccl' / 'gloo'
    fsdp: bool = False  # under torchrun, shard weights, gradients and optimizer states across ranks (FSDP) instead of DDP
    device: str = "auto"  # auto = cuda, then mps, then cpu
    dtype: str = "auto"  # auto = bfloat16 where native, float16 (+GradScaler) on older GPUs, else float32
    compile: bool = False  # torch.compile the model (turned off, with the reason printed, where it cannot work)


def get_lr(it, cfg):
    """Linear warmup (non-zero at step 0), then cosine decay from learning_rate to min_lr.
    decay_lr=False is a constant learning_rate with no warmup, as in nanoGPT."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def compile_reason(device):
    """None when torch.compile can run here, else why not."""
    if device.type == "mps":
        return "torch.compile does not support MPS"
    if sys.platform == "win32":
        return "torch.compile's default backend needs Triton/a C++ toolchain that Windows installs lack"
    if device.type == "cpu":
        import shutil
        if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            return "no C++ compiler found for torch.compile's CPU backend"
    return None


def train_step(model, optimizer, scaler, batches, ctx, grad_clip, dist_info, device):
    """One optimizer step over micro-batches [(x, y), ...] of this rank.

    The loss is the sum of token losses over every micro-batch of every rank divided by the global
    number of target tokens, so uneven masks (SFT) weigh every token alike however the batch is
    split (PITFALLS 1-2). Returns (mean loss tensor, grad norm tensor, stepped: bool).
    """
    # target counts stay on the device: the step's one host sync is the finite check at the end
    n_targets = torch.stack([(y != -1).sum() for _, y in batches]).sum()  # int64: exact at any size
    if dist_info.enabled:
        import torch.distributed as dist
        dist.all_reduce(n_targets)
    scale = dist_info.world_size / n_targets.to(torch.float32)
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    loss_sum = torch.zeros((), device=device)
    for micro, (x, y) in enumerate(batches):
        if ddp:  # sync gradients on the last micro-step only; set before the forward (PITFALLS 3)
            model.require_backward_grad_sync = micro == len(batches) - 1
        # (FSDP reduce-scatters after every micro-step: skipping it would keep whole unsharded
        # gradients between micro-steps, the memory FSDP is there to save)
        with ctx:
            _, loss = model(x, y, reduction="sum")
        # DDP and FSDP average gradients over ranks: scale by world_size so the result is the global sum / n
        loss = loss * scale
        scaler.scale(loss).backward()
        loss_sum += loss.detach() / dist_info.world_size  # this rank's share of the global mean
    if dist_info.enabled:
        # the global mean loss on every rank; a NaN/inf on any rank makes it non-finite on all of
        # them, so every rank takes the same decision to skip below
        dist.all_reduce(loss_sum)
    scaler.unscale_(optimizer)  # clip real gradients, not scaled ones (PITFALLS 4); no-op without fp16
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP: a replicated DTensor, the same global norm on every rank
        norm = norm.full_tensor()
    no_targets, finite_loss, finite_norm = torch.stack(
        [n_targets == 0, torch.isfinite(loss_sum), torch.isfinite(norm.to(loss_sum.device))]).tolist()
    if no_targets:
        optimizer.zero_grad(set_to_none=True)
        raise ValueError("an optimizer step has no target tokens: every example is masked out")
    stepped = finite_loss and (scaler.is_enabled() or finite_norm)
    if stepped:
        scaler.step(optimizer)  # with fp16 the scaler itself skips a step whose gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, norm, stepped


# ----------------------------------------------------------------------------- setup helpers

def load_data(cfg, dist_info, meta_hint=None):
    """(train sampler, function yielding val batches, dataset meta) for token files or SFT JSONL."""
    if cfg.sft_train_file:
        import sft
        tokenizer = Tokenizer(meta_hint or {"tokenizer": "gpt2"})
        template = cfg.sft_template or None
        train_tok, n_cut = sft.tokenize_examples(sft.load_examples(cfg.sft_train_file, template), tokenizer, cfg.block_size)
        print0(f"sft: {len(train_tok):,} training examples from {cfg.sft_train_file}, {n_cut} truncated to block_size")
        sampler = sft.SFTSampler(train_tok, cfg.batch_size, cfg.block_size, cfg.seed, dist_info.rank,
                                 dist_info.world_size, packing=cfg.sft_packing)
        val_tok = None
        if cfg.sft_val_file:
            val_tok, _ = sft.tokenize_examples(sft.load_examples(cfg.sft_val_file, template), tokenizer, cfg.block_size)
        val = (lambda: sft.sft_eval_batches(val_tok, cfg.batch_size, cfg.block_size, cfg.eval_iters)) if val_tok else None
        return sampler, val, meta_hint or {"tokenizer": "gpt2", "vocab_size": tokenizer.vocab_size}
    data_dir = Path(cfg.data_dir or Path("data") / cfg.dataset)
    train = TokenData(data_dir, "train")
    valdata = TokenData(data_dir, "val")
    meta = train.meta
    vocab = meta.get("vocab_size") or 50304
    sampler = make_sampler(cfg.sampling, train, cfg.batch_size, cfg.block_size, cfg.seed,
                           dist_info.rank, dist_info.world_size, vocab)
    val = lambda: eval_batches(valdata, cfg.batch_size, cfg.block_size, cfg.eval_iters, vocab)
    print0(f"data: {data_dir}: {train.n_tokens:,} train tokens in {len(train.files)} file(s), "
           f"{valdata.n_tokens:,} val tokens; sampling={cfg.sampling}")
    return sampler, val, meta


def build_model(cfg, origin, model_args, base=None):
    """The GPT for this run: from scratch, or a pretrained base (cropped, with LoRA / 1-D training)."""
    if origin == "scratch":
        model = GPT(GPTConfig(**model_args))
        partial = False
    else:
        model = ckpt_lib.build_base(base or origin)
        model.config.dropout = cfg.dropout
        for m in model.modules():  # pretrained weights with this run's dropout
            if isinstance(m, torch.nn.Dropout):
                m.p = cfg.dropout
            if hasattr(m, "dropout") and isinstance(m.dropout, float):
                m.dropout = cfg.dropout
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)
        partial = ckpt_lib.apply_finetune(model, dataclasses.asdict(cfg))
        if partial and cfg.base_dtype != "float32":
            import lora
            lora.freeze_base_dtype(model, {"bfloat16": torch.bfloat16}[cfg.base_dtype])
    model.activation_checkpointing = cfg.activation_checkpointing
    model.use_fast_dropout(cfg.fast_dropout)
    return model, partial


def set_lr(optimizer, lr):
    """Every group at lr times its lr_scale (Muon's matrices: muon_lr on the same schedule)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # checkpoints from before lr_scale: 1


def make_optimizer(model, cfg, device, fused=None):
    """The run's optimizer over the model's trainable parameters (GPT.configure_optimizers)."""
    return model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type,
                                      fused=fused, eight_bit=cfg.optimizer == "adamw8bit",
                                      muon_lr=cfg.muon_lr if cfg.optimizer == "muon" else 0.0,
                                      muon_momentum=cfg.muon_momentum, muon_weight_decay=cfg.muon_weight_decay)


def check_config(cfg, dist_info):
    """All problems of a config at once, as a ValueError."""
    errors = []
    if cfg.gradient_accumulation_steps % dist_info.world_size:
        errors.append(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible by the "
                      f"{dist_info.world_size} ranks; use a multiple of {dist_info.world_size}")
    for k in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "log_interval"):
        if getattr(cfg, k) <= 0:
            errors.append(f"{k} must be positive, got {getattr(cfg, k)}")
    if cfg.sampling not in ("random", "sequential"):
        errors.append(f"sampling must be 'random' or 'sequential', got {cfg.sampling!r}")
    if cfg.lora_targets not in ("attn", "all"):
        errors.append(f"lora_targets must be 'attn' or 'all', got {cfg.lora_targets!r}")
    if cfg.base_dtype not in ("float32", "bfloat16"):
        errors.append(f"base_dtype must be 'float32' or 'bfloat16', got {cfg.base_dtype!r}")
    if cfg.train_1d_only and cfg.base_dtype != "float32":
        errors.append("train_1d_only trains the biases inside the base's layers, which must then stay float32: "
                      "use base_dtype='float32'")
    if cfg.optimizer not in ("adamw", "adamw8bit", "muon"):
        errors.append(f"optimizer must be 'adamw', 'adamw8bit' or 'muon', got {cfg.optimizer!r}")
    if cfg.optimizer == "muon" and cfg.muon_lr <= 0:
        errors.append(f"muon_lr must be positive with optimizer='muon', got {cfg.muon_lr}")
    if cfg.optimizer == "muon" and cfg.train_1d_only:
        errors.append("optimizer='muon' trains weight matrices, and train_1d_only has none: use optimizer='adamw'")
    if (cfg.lora_rank > 0 or cfg.train_1d_only) and cfg.init_from == "scratch":
        errors.append("LoRA / train_1d_only fine-tune a pretrained model: set init_from")
    if cfg.backend not in ("auto", "nccl", "gloo"):
        errors.append(f"backend must be 'auto', 'nccl' or 'gloo', got {cfg.backend!r}")
    if cfg.fsdp and dist_info.enabled:
        if cfg.optimizer != "adamw":
            errors.append("fsdp=True works with optimizer='adamw' only (bitsandbytes' 8-bit AdamW does not take sharded "
                          "parameters, and Muon orthogonalises whole matrices)")
        if cfg.base_dtype != "float32":
            errors.append("fsdp=True needs base_dtype='float32': FSDP shards a block's parameters together and "
                          "wants one dtype (sharding already divides the base's memory by the ranks)")
    if errors:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(errors))


class StopFlag:
    """SIGTERM / Ctrl-C ask the loop to finish its step, save and exit; a second Ctrl-C aborts."""

    def __init__(self):
        self.signum = None
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print0(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
               f"(Ctrl-C again aborts without saving)")


def trim_metrics(path, last_iter):
    """On resume, drop metric lines past the checkpoint (a crash may have logged beyond it)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["iter"] <= last_iter:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            pass  # a half-written last line of a killed run
    atomic_write(path, ["".join(l + "\n" for l in keep).encode()])


# ----------------------------------------------------------------------------- main

def main(cfg):
    check_config(cfg, _dist_probe())  # before any process group starts
    dist_info, device = init_distributed(cfg.device, cfg.backend)
    setup_backends(device)
    dtype = pick_dtype(cfg.dtype, device)
    fsdp = cfg.fsdp and dist_info.enabled
    if cfg.fsdp and not fsdp:
        print0("fsdp: off (one process: nothing to shard across; launch with torchrun --nproc_per_node=N)")
    if fsdp and dtype == torch.float16:
        raise ValueError("fsdp=True with float16 is not supported (the GradScaler would check only this rank's "
                         "shard for overflow): use --dtype=bfloat16 (Ampere or newer) or float32, or fsdp=False")
    ctx = autocast(device, dtype)
    master = dist_info.is_master
    out_dir = Path(cfg.out_dir)
    accum = cfg.gradient_accumulation_steps // dist_info.world_size  # micro-steps per rank
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    parallel = ""
    if dist_info.enabled:
        import torch.distributed as dist
        parallel = f" ({'FSDP' if fsdp else 'DDP'} over {dist.get_backend()})"
    print0(f"runtime: device={device}, dtype={str(dtype).replace('torch.', '')}, world_size={dist_info.world_size}"
           f"{parallel}, torch {torch.__version__}, numpy {np.__version__}")
    print0(f"tokens per iteration: {cfg.gradient_accumulation_steps} accum x {cfg.batch_size} batch x "
           f"{cfg.block_size} block = {tokens_per_iter:,} ({accum} micro-steps on each of {dist_info.world_size} rank(s))")
    if device.type == "cpu" and accum > 1:
        print0("note: gradient accumulation gives no speed-up on a CPU; a larger batch_size does the same math")

    # --- state to resume from
    state, ckpt_dir = None, None
    if cfg.init_from == "resume":
        ckpt_dir, state = ckpt_lib.read_checkpoint(out_dir)
        saved = state["config"]
        changed = {k: (saved.get(k), v) for k, v in dataclasses.asdict(cfg).items()
                   if k != "init_from" and saved.get(k) != v}
        shape = {k: c for k, c in changed.items() if k in GPTConfig.SHAPE_FIELDS or k in
                 ("lora_rank", "lora_targets", "train_1d_only", "sft_train_file", "dataset", "data_dir", "optimizer")}
        if shape:
            raise ValueError(f"cannot resume {ckpt_dir} with a different model, data or optimizer: " + ", ".join(
                f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in shape.items()) + "; keep them as they were")
        for k, (a, b) in changed.items():
            print0(f"resume: {k} changed from {a!r} to {b!r}")
        print0(f"resuming from {ckpt_dir} at iteration {state['iter_num']}")

    # --- data and model
    seed_everything(cfg.seed)  # the same initial weights on every rank and every run
    origin = (state["config"]["init_from"] if state else cfg.init_from)
    meta_hint = state.get("data_meta") if state else None
    if origin not in ("scratch", "resume") and not meta_hint:
        p = Path(origin)
        meta_hint = ({"tokenizer": "gpt2", "vocab_size": 50257} if not (p / "latest.json").exists()
                     else ckpt_lib.read_checkpoint(p, verify=False)[1].get("data_meta"))  # build_base loads it
    sampler, val_batches, data_meta = load_data(cfg, dist_info, meta_hint)
    build_from, model_args = origin, None
    if state and not state.get("trainable_only"):  # the checkpoint holds every weight: no base to fetch
        build_from, model_args = "scratch", dict(state["model_args"], dropout=cfg.dropout)
    elif origin == "scratch":
        vocab = cfg.vocab_size or data_meta.get("vocab_size") or 50304
        model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                          vocab_size=vocab, dropout=cfg.dropout, bias=cfg.bias, qkv_bias=cfg.qkv_bias,
                          tie_weights=cfg.tie_weights, activation=cfg.activation)
    model, partial = build_model(cfg, build_from, model_args, base=state.get("base") if state else None)
    if isinstance(sampler, (RandomSampler, SequentialSampler)):  # token files: their ids must fit the model
        sampler.data.check_vocab(model.config.vocab_size)
        sampler.vocab_size = model.config.vocab_size
    model.to(device)
    n_params = model.get_num_params()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens_planned = cfg.max_iters * tokens_per_iter
    print0(f"model: {n_params:,} parameters ({model.get_num_params(non_embedding=True):,} without embeddings), "
           f"{n_train:,} trained")
    print0(f"budget: {tokens_planned:,} tokens, 6ND = {6 * n_params * tokens_planned:.3g} FLOPs, "
           f"{tokens_planned / n_params:.1f} tokens per parameter (Chinchilla-optimal ~20)")
    _print_memory(model, cfg, device, dtype)

    if state:  # whole weights on every rank, before FSDP splits them
        ckpt_lib.restore_model(model, ckpt_dir, state)
    if fsdp:  # in place, before the optimizer, which must see the sharded parameters
        shard_model(model)
        print0(f"fsdp: {model.config.n_layer} blocks + root sharded "
               f"over {dist_info.world_size} ranks (the memory estimate above is before sharding: weights, "
               f"gradients and optimizer states divide by {dist_info.world_size})")
    optimizer = make_optimizer(model, cfg, device)
    scaler = make_scaler(device, dtype)
    iter_num, tokens_seen, best_val = 0, 0, float("inf")
    wandb_id = None
    if state:
        if fsdp:
            ckpt_lib.restore_optimizer_sharded(model, optimizer, ckpt_dir, state)
        else:
            ckpt_lib.restore_optimizer(model, optimizer, ckpt_dir, state)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if state.get("sampler") and state.get("rng"):
            sampler_state = rank_sampler_state(state, dist_info.rank)
            if sampler_state is not None:
                sampler.load_state_dict(sampler_state)
            else:
                print(f"resume: rank {dist_info.rank} has no saved data position (the run had fewer ranks); "
                      f"it starts its own random stream afresh", flush=True)
            set_rng_state(state["rng"])
        else:  # e.g. converted from nanoGPT, which does not record them
            print0("resume: the checkpoint has no data position or RNG state; sampling starts afresh")
        iter_num, tokens_seen = state["iter_num"], state["tokens_seen"]
        best_val = state["best_val_loss"] if state["best_val_loss"] is not None else float("inf")
        wandb_id = state.get("wandb_run_id")
        if master:
            trim_metrics(out_dir / "metrics.jsonl", iter_num)
    resumed_at = iter_num if state else None

    runner = model
    if cfg.compile:
        reason = compile_reason(device)
        if reason:
            print0(f"compile: off ({reason})")
        else:
            print0("compile: compiling the model (the first iterations are slow)")
            runner = torch.compile(model)
    if dist_info.enabled and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        runner = DDP(runner, device_ids=[dist_info.local_rank] if device.type == "cuda" else None)

    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        pf, pf_source = peak_flops(device, dtype)
        print0(f"mfu: peak {pf / 1e12:.2f} TFLOP/s ({pf_source})")
        if cfg.wandb_log:
            import wandb
            run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=dataclasses.asdict(cfg),
                             id=wandb_id, resume="allow")
            wandb_id = run.id
    metrics = open(out_dir / "metrics.jsonl", "a") if master else None

    def save(is_best=False):
        """Every rank calls this (gathering data positions and FSDP shards are collectives); rank 0 writes."""
        gathered = ckpt_lib.gather_sharded(model, optimizer) if fsdp else None
        sampler_ranks = gather_objects(sampler.state_dict(), dist_info)
        if not master:
            return
        st = {"iter_num": iter_num, "tokens_seen": tokens_seen,
              "best_val_loss": best_val if math.isfinite(best_val) else None,
              "config": dataclasses.asdict(cfg) | {"init_from": origin}, "model_args": dataclasses.asdict(model.config),
              "sampler": sampler_ranks[0], "sampler_ranks": sampler_ranks, "rng": rng_state(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
              "wandb_run_id": wandb_id, "data_meta": data_meta,
              "base": (state.get("base") if state else None) or (str(Path(origin).resolve()) if Path(origin).exists() else origin)}
        path = ckpt_lib.save_checkpoint(out_dir, st, model, optimizer, trainable_only=partial,
                                        is_best=is_best, keep_last_n=cfg.keep_last_n, gathered=gathered)
        print0(f"saved checkpoint to {path}")

    def log(record):
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if cfg.wandb_log:
            wandb.log(record, step=record["iter"])

    stop = StopFlag()
    bad_steps, skipped = 0, 0
    log_loss, log_steps = torch.zeros((), device=device), 0
    t_log = time.perf_counter()
    while True:
        # --- learning rate
        lr = get_lr(iter_num, cfg)
        set_lr(optimizer, lr)
        last_step = iter_num >= cfg.max_iters

        # --- evaluate and checkpoint (skipped at the iteration a resume starts from: done before).
        # DDP: rank 0 evaluates while the others wait for its number. FSDP: every rank evaluates, since
        # each forward gathers the shards. Every rank then takes the same save decision and calls
        # save(), a collective; rank 0 alone logs and writes.
        saved_now = False
        eval_now = (iter_num % cfg.eval_interval == 0 or last_step or cfg.eval_only) and iter_num != resumed_at
        if eval_now:
            if val_batches is not None:
                import evaluate
                val = 0.0
                if master or fsdp:
                    val = evaluate.evaluate_loss(NoInferenceMode(model) if fsdp else model,
                                                 (to_device(b, device) for b in val_batches()), device, ctx)["loss"]
                if not fsdp:
                    val = all_reduce_sum(val if master else 0.0, device, dist_info)  # rank 0's number, everywhere
                improved = val < best_val
                best_val = min(best_val, val)
                print0(f"iter {iter_num}: val loss {val:.4f}{' (best)' if improved else ''}")
                if master:
                    log({"iter": iter_num, "tokens": tokens_seen, "val_loss": val, "lr": lr})
            else:
                improved = False
            if iter_num > 0 and not cfg.eval_only and (improved or cfg.always_save_checkpoint):
                save(is_best=improved)
                saved_now = True
        if cfg.save_interval and iter_num % cfg.save_interval == 0 and iter_num > 0 \
                and not saved_now and iter_num != resumed_at:
            save()
            saved_now = True
        if eval_now or saved_now:
            barrier(dist_info, device)

        # --- stop: end of schedule, eval_only, or a signal (all ranks agree)
        signalled = all_reduce_sum(float(stop.signum is not None), device, dist_info) > 0
        if last_step or cfg.eval_only or signalled:
            if signalled and not saved_now and iter_num != resumed_at:
                save()
            break

        # --- micro-steps, clip, step
        torch.manual_seed(step_seed(cfg.seed, dist_info.rank, iter_num))  # dropout masks resume exactly
        batches = [to_device(sampler.next_batch(), device) for _ in range(accum)]
        loss, norm, stepped = train_step(runner, optimizer, scaler, batches, ctx, cfg.grad_clip, dist_info, device)
        iter_num += 1  # a skipped step still consumed its batches: the schedule and data move on
        tokens_seen += tokens_per_iter
        if not stepped and not (scaler.is_enabled() and torch.isfinite(loss)):
            bad_steps += 1
            skipped += 1
            print0(f"iter {iter_num - 1}: non-finite loss or gradient ({loss.item():.4g}, norm {norm.item():.4g}), "
                   f"step skipped ({bad_steps} in a row, {skipped} in all)")
            if bad_steps >= cfg.max_bad_steps:
                save()
                barrier(dist_info, device)
                raise SystemExit(f"stopping: {bad_steps} non-finite steps in a row at iteration {iter_num}. The last "
                                 f"good weights are saved in {out_dir}; lower learning_rate, use bfloat16 or "
                                 f"float32, or check the data")
        else:
            bad_steps = 0
            log_loss += loss
            log_steps += 1

        # --- log: mean loss over the interval (one host sync per interval; train_step's loss is already global)
        if iter_num % cfg.log_interval == 0 and log_steps > 0:
            mean_loss = log_loss.item() / log_steps
            dt = (time.perf_counter() - t_log) / cfg.log_interval
            t_log = time.perf_counter()
            if master:
                mfu = model.estimate_mfu(tokens_per_iter // dist_info.world_size, dt, pf, cfg.block_size)
                tps = tokens_per_iter / dt
                eta = (cfg.max_iters - iter_num) * dt
                print0(f"iter {iter_num}: loss {mean_loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, "
                       f"{tps:,.0f} tok/s, mfu {mfu * 100:.1f}%, eta {eta / 60:.1f} min")
                log({"iter": iter_num, "tokens": tokens_seen, "train_loss": mean_loss, "lr": lr,
                     "ms_per_iter": dt * 1000, "tokens_per_sec": tps, "mfu": mfu, "skipped_steps": skipped})
            log_loss.zero_()
            log_steps = 0

    if metrics:
        metrics.close()
    barrier(dist_info, device)  # no rank leaves while rank 0 still writes the final checkpoint
    if dist_info.enabled:
        # FSDP and DDP keep gloo work objects (holding tensors) alive in their hooks; freed after the
        # process group is gone they abort the interpreter at exit ("terminate called without an
        # active exception"), so they go first
        del runner, model, optimizer, sampler
        import gc
        gc.collect()
    close_distributed(dist_info)
    if stop.signum == signal.SIGINT:
        raise SystemExit(130)
    return {"iter_num": iter_num, "best_val_loss": best_val}


def rank_sampler_state(state, rank):
    """The data position this rank resumes from: its own when the checkpoint has one. Otherwise
    (a run saved with fewer ranks, or from before positions were kept per rank) the sequential
    sampler's global cursor, which every rank shares, or None for a random stream: a rank that
    copied rank 0's stream would read exactly rank 0's windows."""
    ranks = state.get("sampler_ranks") or [state["sampler"]]
    if rank < len(ranks):
        return ranks[rank]
    return None if state["sampler"].get("kind") == "random" else state["sampler"]


def _dist_probe():
    """World size from torchrun's environment, for config checks made before the process group starts."""
    from runtime import Dist
    return Dist(world_size=int(os.environ.get("WORLD_SIZE", "1")))


def _print_memory(model, cfg, device, dtype):
    try:
        import memory
    except ImportError:
        return
    est = memory.estimate_training_memory(
        model, cfg.batch_size, cfg.block_size,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        compute_dtype_bytes=4 if dtype == torch.float32 else 2,
        optimizer=cfg.optimizer, activation_checkpointing=cfg.activation_checkpointing)
    print0(memory.memory_report(est, memory.device_memory(device)))


if __name__ == "__main__":
    run(main, TrainConfig)
