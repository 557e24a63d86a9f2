"""
GPT-2 style decoder-only Transformer, in one file.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65))
    logits, loss = model(idx, targets)

References: "Language Models are Unsupervised Multitask Learners" (GPT-2, 2019) for the architecture
(pre-LayerNorm blocks, learned positions, GELU MLP, tied embeddings); "Attention Is All You Need"
(2017) for attention. GPT-J (Wang & Komatsuzaki 2021) is the same model with a few GPTConfig fields
changed: rotary positions (Su et al. 2021) and a parallel block. Parameter names follow OpenAI's
GPT-2 checkpoint (wte wpe h ln_f c_attn c_proj c_fc lm_head) so that weight import and export are
key-by-key copies (homegpt/hf.py).

The file reads top to bottom: CPU dropout, attention, MLP, block, GPTConfig (every field says why it
is there), GPT; then the small pieces of the previous-position options the CPU recipes use. It imports
torch alone, and nothing of the homegpt package, which builds on it: sampling with a KV cache is
homegpt/generate.py (`generate(model, idx, 100)`), the optimizers homegpt/optimizers.py
(`configure_optimizers(model, ...)`).
"""

import math
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint


# ----------------------------------------------------------------------------- dropout on a CPU
# torch's CPU dropout draws one Bernoulli sample per element; drawing 64-bit integers and cutting each
# into four 16-bit uniforms is several times faster (benchmarks/train_throughput.py measures the whole
# step). With dropout on, torch's scaled_dot_product_attention leaves its fused CPU kernel for a float32
# path; written out, its two matmuls stay bfloat16 under autocast, softmax stays float32. CUDA and MPS
# always use torch's kernels; GPT.use_fast_dropout(False) turns these off.

class _MaskedScale(torch.autograd.Function):
    """x * keep * scale, keeping only the 1-byte mask for backward (not a full-width scaled copy)."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep.to(x.dtype).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        keep, = ctx.saved_tensors
        return grad * keep.to(grad.dtype).mul_(ctx.scale), None, None


def fast_dropout(x, p):
    """Training-mode dropout for CPU tensors, the same in expectation as F.dropout(x, p, True).

    p is quantised to 1/65536. The bits come from torch's generator, so masks follow
    torch.manual_seed and a resumed run draws the same ones.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be between 0 and 1, got {p}")
    if p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    n = x.numel()
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    bits = bits.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
    keep = bits >= round(p * 65536) - 32768
    return _MaskedScale.apply(x, keep, 1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """nn.Dropout that uses fast_dropout on a CPU (unless fast_dropout is off), torch's kernel elsewhere."""

    fast_dropout = True

    def forward(self, x):
        if self.training and self.fast_dropout and x.device.type == "cpu":
            return fast_dropout(x, self.p)
        return super().forward(x)


def causal_attention_with_dropout(q, k, v, p):
    """Causal softmax attention of q, k, v (B, nh, T, hs) with fast_dropout on the attention weights:
    what F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p) computes, with the
    matmuls in the autocast dtype. Materialises the (B, nh, T, T) weights: for training contexts."""
    T, hs = q.size(-2), q.size(-1)
    att = (q * (1.0 / math.sqrt(hs))) @ k.transpose(-2, -1)  # (B, nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
    att = F.softmax(att.masked_fill(future, float("-inf")), dim=-1)
    return fast_dropout(att, p) @ v  # (B, nh, T, hs)


# ----------------------------------------------------------------------------- the model

class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0, f"n_embd {config.n_embd} not divisible by n_head {config.n_head}"
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.fast_dropout = True  # on a CPU, attention dropout through fast_dropout (see forward)
        # q, k, v projections for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.attn_proj_bias)
        self.resid_dropout = Dropout(config.dropout)
        # qkv_shift: each q, k and v channel adds a learned fraction (starting at 0) of its previous position's
        self.qkv_mix = nn.Parameter(torch.zeros(3 * config.n_embd)) if config.qkv_shift else None

    def forward(self, x, kv_cache=None, rotary=None):
        B, T, C = x.size()
        qkv = self.c_attn(x)
        if self.qkv_mix is not None:
            qkv = mix_previous(qkv, self.qkv_mix, kv_cache, ("qkv", self.layer_idx))
        q, k, v = qkv.split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:  # QK-norm: unit-RMS queries and keys bound the attention logits (modded-nanogpt)
            q, k = F.rms_norm(q, (hs,)), F.rms_norm(k, (hs,))
        if rotary is not None:  # positions turn q and k (the cache keeps k turned: its positions are fixed)
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv_cache is not None and kv_cache.pos > 0:
            # decoding: the new query (T == 1) may look at every cached position, so no mask is needed
            assert T == 1, f"the KV cache decodes one token at a time, got {T}"
            k, v = kv_cache.update(self.layer_idx, k, v)
            is_causal = False
        else:
            if kv_cache is not None:  # prefill: fill the cache with the prompt, attend causally
                kv_cache.update(self.layer_idx, k, v)
            is_causal = True
        dropout = self.dropout if self.training else 0.0  # eval and generation are deterministic
        if dropout > 0.0 and self.fast_dropout and x.device.type == "cpu" and kv_cache is None:
            # with dropout SDPA's CPU path is float32 with torch's slow dropout: see fast_dropout above
            y = causal_attention_with_dropout(q, k, v, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh*hs) re-assembled heads
        return self.resid_dropout(self.c_proj(y))


def rotary_angles(start, T, rotary_dim, base, device):
    """cos and sin (T, rotary_dim / 2) of rotary position embeddings for positions start .. start+T-1
    (Su et al. 2021, "RoFormer"): pair i of a head turns by position * base^(-2i / rotary_dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim))
    angles = torch.arange(start, start + T, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Turn the first 2 * cos.size(-1) dims of x (B, nh, T, hs) in GPT-J's interleaved layout: dims
    (0, 1), (2, 3), ... are the pairs (GPT-NeoX and Llama pair dim i with i + d/2 instead)."""
    d = 2 * cos.size(-1)
    x_rot, x_pass = x[..., :d], x[..., d:]
    x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]  # (B, nh, T, d/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    turned = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)  # (B, nh, T, d)
    return torch.cat((turned, x_pass), dim=-1)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)
        # GPT-2 used the tanh approximation of GELU; nanoGPT trains with the exact (erf) one
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.parallel = config.parallel_residual
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        if not self.parallel:  # (GPT-J's parallel block reads one LayerNorm for both branches)
            self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, rotary=None):
        if self.parallel:  # GPT-J: attention and MLP read the same normalised input, side by side
            h = self.ln_1(x)
            return x + self.attn(h, kv_cache, rotary) + self.mlp(h)
        x = x + self.attn(self.ln_1(x), kv_cache, rotary)
        x = x + self.mlp(self.ln_2(x))
        return x


# What a GPTConfig field changes, as GPTConfig.fields_tagged reads it: SHAPE, the shapes of the weights (a checkpoint
# loads only into a model that agrees); COMPUTE, what the same weights compute (a resume may change
# neither); EXTRA, an option transformers' GPT-2 and GPT-J classes do not compute (export_hf.py and
# export_gguf.py refuse it). (activation has no tag: a resume builds the checkpoint's own, which lets a
# run converted from nanoGPT, whose GELU is the exact one, resume with the default config.)
SHAPE, COMPUTE, EXTRA = "shape", "compute", "extra"


def tagged(default, *tags):
    """A GPTConfig field's default with its tags."""
    return field(default=default, metadata={"tags": tags})


@dataclass
class GPTConfig:
    """The model's shape and options. Every field is here for one of two reasons, said beside it: a
    pretrained family needs it to load exactly (GPT-2, GPT-J, nanoGPT's checkpoints), or it wins in a
    recipe homegpt ships (the measurements are in docs/). train.py takes every field as a key, so a
    new option is one field here, tagged with what it changes (below), and its test."""
    # the model (train.py: ignored when starting from pretrained weights; a resume refuses a change)
    block_size: int = tagged(1024, SHAPE)  # maximum context length (learned position embeddings)
    vocab_size: int = tagged(50304, SHAPE)  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = tagged(12, SHAPE)  # number of Transformer blocks
    n_head: int = tagged(12, SHAPE)  # attention heads per block
    n_embd: int = tagged(768, SHAPE)  # residual stream width
    dropout: float = 0.0  # on attention weights, residual branches and embeddings; 0 for pretraining
    bias: bool = tagged(True, SHAPE)  # biases in Linear layers and LayerNorms, as GPT-2; False wins in the CPU recipes
    qkv_bias: Optional[bool] = tagged(None, SHAPE)  # q/k/v projection's bias (GPT-J has none); None = as `bias`
    tie_weights: bool = tagged(True, SHAPE)  # lm_head shares wte's matrix, as GPT-2; False (GPT-J; the CPU recipes)
    activation: str = "gelu_tanh"  # GPT-2's tanh GELU; 'gelu' = the exact erf one (nanoGPT's checkpoints)
    # GPT-J is GPT-2 with these changed; the defaults keep GPT-2 exactly
    rotary_dim: int = tagged(0, SHAPE)  # 0 = learned positions (wpe); > 0 = rotary on this many dims per head
    rotary_base: float = tagged(10000.0, COMPUTE)  # the rotary wavelengths' base
    parallel_residual: bool = tagged(False, SHAPE)  # x + attn(ln_1(x)) + mlp(ln_1(x)): one LayerNorm per block
    attn_proj_bias: Optional[bool] = tagged(None, SHAPE)  # attention output projection's bias; None = as `bias`
    lm_head_bias: bool = tagged(False, SHAPE)  # an untied lm_head with a bias
    # options that win in the CPU recipes (docs/cpu_recipe.md); off, the model is GPT-2 exactly
    qk_norm: bool = tagged(False, COMPUTE, EXTRA)  # RMS-normalise each head's queries and keys (no parameters)
    bigram_embed: int = tagged(0, SHAPE, EXTRA)  # > 0: rows of a (previous token, token) table added to the input
    trigram_embed: int = tagged(0, SHAPE, EXTRA)  # > 0: the same for (two previous, token), hashed into these rows
    smear: bool = tagged(False, SHAPE, EXTRA)  # the input adds a learned fraction of the previous position's
    qkv_shift: bool = tagged(False, SHAPE, EXTRA)  # q, k, v add a learned fraction of the previous position's (Primer)

    @classmethod
    def fields_tagged(cls, tag):
        """The names of the fields carrying tag (SHAPE, COMPUTE or EXTRA), in declaration order: what the resume
        check and the export refusals read, so a new option is declared once, here."""
        return tuple(f.name for f in fields(cls) if tag in f.metadata.get("tags", ()))

    def __post_init__(self):
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.attn_proj_bias is None:
            self.attn_proj_bias = self.bias
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self, shape=True):
        """What is wrong with these settings, one message each ([] = nothing): the model's own check,
        which train.py's config check reads too. shape=False leaves out what a pretrained model fixes
        itself (its heads, its rotary dims)."""
        problems = []
        if self.activation not in ("gelu_tanh", "gelu"):
            problems.append(f"activation must be 'gelu_tanh' (GPT-2) or 'gelu' (exact), got {self.activation!r}")
        for name in ("bigram_embed", "trigram_embed"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (0 = off; else the rows of its table), got {getattr(self, name)}")
        if self.lm_head_bias and self.tie_weights:
            problems.append("lm_head_bias needs an untied lm_head (tie_weights=False)")
        if not shape:
            return problems
        if self.n_head <= 0 or self.n_embd % self.n_head:
            fit = self.n_embd // self.n_head * self.n_head if self.n_head > 0 else 0
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: each head gets n_embd / "
                            f"n_head dimensions; e.g. --n_embd={fit or max(self.n_head, 1)}")
        elif self.rotary_dim < 0 or self.rotary_dim % 2 or self.rotary_dim > self.n_embd // self.n_head:
            problems.append(f"rotary_dim must be 0 (learned positions) or an even number up to the head size "
                            f"n_embd / n_head = {self.n_embd // self.n_head}, got {self.rotary_dim}")
        return problems

    @classmethod
    def model_args(cls, cfg):
        """The GPTConfig fields of any object that has them (train.py's TrainConfig, a saved dict's namespace)."""
        return {f.name: getattr(cfg, f.name) for f in fields(cls)}


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.activation_checkpointing = False  # recompute block activations in backward to save memory
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if not config.rotary_dim:  # learned absolute positions (GPT-2); rotary ones have no weights
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        # (in GPT-2's order: the init draws its random numbers module by module, so a seed gives the
        # same weights whichever options are on)
        self.transformer = nn.ModuleDict(dict(
            modules,
            drop=Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_weights:
            # one matrix for reading tokens in and writing logits out (GPT-2; Press & Wolf 2017)
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 paper: scale the residual projections by 1/sqrt(2 * n_layer) at init
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # what the previous positions were: all zero at the start, so the model starts as the one without
        # them, from the same random draws (made after every other weight's)
        # n-gram input embeddings (Huang et al. 2025, "Over-Tokenized Transformer"): tables added to wte
        self.bigram_wte = nn.Embedding(config.bigram_embed, config.n_embd) if config.bigram_embed else None
        self.trigram_wte = nn.Embedding(config.trigram_embed, config.n_embd) if config.trigram_embed else None
        for table in (self.bigram_wte, self.trigram_wte):
            if table is not None:
                torch.nn.init.zeros_(table.weight)
        # smear (modded-nanogpt; RWKV's token shift): the input adds per-channel fractions of the previous one
        self.smear_mix = nn.Parameter(torch.zeros(config.n_embd)) if config.smear else None

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=False):
        """Number of parameters, each shared tensor counted once. non_embedding drops wpe, the n-gram
        tables (and wte when untied): lookups, not matmuls."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel() if "wpe" in self.transformer else 0
            n -= sum(t.weight.numel() for t in (self.bigram_wte, self.trigram_wte) if t is not None)
            if not self.config.tie_weights:
                n -= self.transformer.wte.weight.numel()
        return n

    def forward(self, idx, targets=None, reduction="mean", kv_cache=None):
        """idx (B, T) token ids -> (logits, loss).

        targets (B, T) with -1 where no loss is wanted (padding, prompt tokens). reduction is 'mean'
        over the counted targets or 'sum' (the caller normalises, e.g. by the targets of a whole
        optimizer step). Without targets only the last position's logits are computed (B, 1, V).
        """
        B, T = idx.size()
        start = kv_cache.pos if kv_cache is not None else 0
        assert start + T <= self.config.block_size, \
            f"sequence of length {start + T} is longer than block_size {self.config.block_size}"
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.bigram_wte is not None or self.trigram_wte is not None:
            ids = earlier_tokens(idx, kv_cache)
            for n, table in ((2, self.bigram_wte), (3, self.trigram_wte)):
                if table is not None:
                    x = x + table(ngram_ids(ids, n, self.config.vocab_size, table.num_embeddings))
        rotary = None
        if self.config.rotary_dim:
            rotary = rotary_angles(start, T, self.config.rotary_dim, self.config.rotary_base, idx.device)
        else:
            x = x + self.transformer.wpe(torch.arange(start, start + T, dtype=torch.long, device=idx.device))
        if self.smear_mix is not None:
            x = mix_previous(x, self.smear_mix, kv_cache, "smear")
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training and kv_cache is None:
                x = activation_checkpoint(block, x, None, rotary, use_reentrant=False)
            else:
                x = block(x, kv_cache, rotary)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V): generation needs the last position only
        logits = self.lm_head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=-1, reduction=reduction)
        return logits, loss

    def set_dropout(self, p):
        """Every dropout of the model at p (fine-tuning pretrained weights with this run's dropout)."""
        self.config.dropout = p
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            elif isinstance(m, CausalSelfAttention):
                m.dropout = p

    def use_fast_dropout(self, enabled):
        """CPU dropout through fast_dropout (default) or, with False, torch's own kernels everywhere."""
        for m in self.modules():
            if isinstance(m, (Dropout, CausalSelfAttention)):
                m.fast_dropout = enabled

    def crop_block_size(self, block_size):
        """Shrink the context, e.g. to fine-tune a 1024-context GPT-2 at 256 on a small GPU."""
        assert block_size <= self.config.block_size, \
            f"can only crop the block size down: {block_size} > {self.config.block_size}"
        self.config.block_size = block_size
        if "wpe" in self.transformer:  # (rotary positions have no table to crop)
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward): 6N + 12*L*T*C (PaLM paper, appendix B).

        N counts the weights used in matmuls: every Linear, including lm_head, but not the wte/wpe
        lookups (a tied lm_head is a matmul too, so it counts once through lm_head). A frozen weight
        (a LoRA base, train_1d_only) costs 4 per token instead of 6: its forward and the gradient of
        its input, but no gradient of its own. LoRA's lora_A / lora_B are trained matmul weights.
        """
        cfg = self.config
        T = seq_len or cfg.block_size
        cost = lambda w: (6 if w.requires_grad else 4) * w.numel()
        n = 0
        for m in self.modules():
            if isinstance(m, nn.Linear):
                n += cost(m.weight) + sum(cost(getattr(m, a)) for a in ("lora_A", "lora_B") if hasattr(m, a))
        return n + 12 * cfg.n_layer * T * cfg.n_embd

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops, seq_len=None):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak for its dtype.

        tokens_per_iter counts every micro-step of one optimizer step on this device.
        """
        return self.flops_per_token(seq_len) * tokens_per_iter / dt / peak_flops


# ----------------------------------------------------------------------------- the previous-position options

class PreviousMix(torch.autograd.Function):
    """x + w * x one position earlier, along dim 1 of x (B, T, C), with w (C,); position 0 adds nothing.
    Written out because autograd's pad, multiply and add pass over x about twice as often, forward and
    backward (about half the time: docs/cpu_recipe.md)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        out = x.clone()
        out[:, 1:].addcmul_(x[:, :-1], w)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad_x = grad.clone()
        grad_x[:, :-1].addcmul_(grad[:, 1:], w)
        return grad_x, (grad[:, 1:] * x[:, :-1]).sum((0, 1), dtype=w.dtype)


def mix_previous(x, w, kv_cache=None, name=None):
    """x (B, T, C) plus w (C,) times the previous position's x: zero before a sequence starts. When
    decoding with a KV cache, the previous position of the first new one is the last the cache saw
    under `name`, and x's last position is kept for the next call."""
    out = PreviousMix.apply(x, w)
    if kv_cache is None:
        return out
    before = kv_cache.last.get(name)
    kv_cache.last[name] = x[:, -1:]
    if before is None:  # the prompt: it starts the sequence
        return out
    return torch.cat((out[:, :1] + w * before, out[:, 1:]), dim=1)


def earlier_tokens(idx, kv_cache=None):
    """idx (B, T) with the two tokens before it prepended: (B, 2 + T), -1 before the sequence starts;
    when decoding with a KV cache, the last two tokens it saw (and it keeps idx's last two)."""
    before = kv_cache.last.get("tokens") if kv_cache is not None else None
    if before is None:
        before = idx.new_full((idx.size(0), 2), -1)
    ids = torch.cat((before, idx), dim=1)
    if kv_cache is not None:
        kv_cache.last["tokens"] = ids[:, -2:]
    return ids


def ngram_ids(ids, n, vocab_size, rows):
    """Rows of an n-gram table for every position of ids (B, 2 + T) from earlier_tokens: the n - 1
    earlier tokens and the token itself as one number (an earlier token is 0 before the start, else
    its id + 1, so no two n-grams share it), modulo `rows` (hashing when the table is smaller)."""
    T = ids.size(1) - 2
    number = torch.zeros_like(ids[:, 2:])
    for back in range(n - 1, 0, -1):
        number = number * (vocab_size + 1) + ids[:, 2 - back:2 - back + T] + 1
    return (number * vocab_size + ids[:, 2:]) % rows
