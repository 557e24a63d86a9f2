"""
LoRA adapters and the other parameter-efficient modes: train a few parameters of a frozen GPT.

    from homegpt.hf import from_pretrained
    from homegpt.lora import apply_lora, count_params, merge_lora
    model = from_pretrained("gpt2")   # hf.py
    names = apply_lora(model, rank=8, alpha=16, dropout=0.05, targets="attn")
    print(count_params(model))   # (442,368 trainable, 124,882,176 total): gpt2, rank 8 on attention
    ...train...
    merge_lora(model)            # a plain GPT again, same parameter names as before apply_lora

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen weight W (out, in)
gets a trainable low-rank update, y = x W^T + b + (alpha / r) * dropout(x) A^T B^T with A (r, in) and
B (out, r). B starts at zero, so the adapted model starts exactly equal to the base; A starts like a
Linear layer (kaiming-uniform, as the paper's reference code). After training, B @ A * alpha/r folds
into W and the adapter disappears: no extra cost at inference, and the exported model is a plain GPT-2.

LoRALinear subclasses nn.Linear and keeps its `weight` and `bias` names, so a LoRA model's state dict
holds GPT-2's keys plus `*.lora_A` / `*.lora_B`: checkpoints and Hugging Face export stay key-by-key.

The third mode, train_only_1d, trains the 1-D parameters only (biases and LayerNorm gains), as BitFit
(Ben Zaken et al. 2021) trains the biases. freeze_base_dtype stores the frozen part in bfloat16 to
halve its memory while the trained parameters stay float32. Quantised bases (quant.py: bitsandbytes
int8 / nf4) take LoRA through QuantLoRALinear, which adds the same adapter to the quantised layer.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from homegpt.errors import UserError
from model import Dropout
from homegpt.quant import float_linear, from_bitsandbytes, is_quantized

LORA_TARGETS = {
    "attn": ("attn.c_attn", "attn.c_proj"),
    "all": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
}
ADAPTER_NAMES = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank adapter: y = linear(x) + scale * B(A(dropout(x))), scale = alpha / rank.

    The adapter is float32 even when the base weight is stored in bfloat16 (freeze_base_dtype).
    Without autocast the base matmul runs in the weight's dtype (input cast to it, output cast back):
    casting the weight up instead would keep a float32 copy of every frozen weight alive until
    backward, which undoes the memory saving. Under autocast, torch casts for both matmuls itself.
    """

    def __init__(self, in_features, out_features, bias=True, rank=8, alpha=16.0, dropout=0.0,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if rank <= 0:
            raise UserError(f"LoRA rank must be a positive integer, got {rank}")
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        # trainable state in float32 (or float64 when the base is float64, e.g. for gradcheck)
        adapter_dtype = self.weight.dtype if self.weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=adapter_dtype))
        self.lora_dropout = Dropout(dropout)  # model's: fast masks on a CPU
        self.reset_adapter()

    def reset_adapter(self):
        _init_adapter(self)

    @classmethod
    def from_linear(cls, linear, rank, alpha, dropout):
        """A LoRALinear holding linear's weight and bias (same tensors' values, device and dtype)."""
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, rank=rank,
                alpha=alpha, dropout=dropout, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(w)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        m.weight.requires_grad_(w.requires_grad)
        if linear.bias is not None:
            m.bias.requires_grad_(linear.bias.requires_grad)
        return m

    def forward(self, x):
        autocasting = torch.is_autocast_enabled(x.device.type)
        w, b, A = self.weight, self.bias, self.lora_A
        if autocasting or x.dtype == w.dtype:
            base = F.linear(x, w, b)
        else:  # e.g. bfloat16 frozen weight, float32 activations: matmul in the weight's dtype
            base = F.linear(x.to(w.dtype), w, b).to(x.dtype)
        return base + _delta(self, x, autocasting).to(base.dtype)

    def merged_weight(self):
        """W + scale * B @ A, computed in float32 and returned in the weight's dtype."""
        return (self.weight.detach().float() + _merged_delta(self)).to(self.weight.dtype)

    def extra_repr(self):
        return super().extra_repr() + f", rank={self.rank}, alpha={self.alpha}"


def _init_adapter(m):
    # A as nn.Linear initialises its weight (kaiming-uniform, a=sqrt(5)); B = 0 so B @ A = 0 at start
    nn.init.kaiming_uniform_(m.lora_A, a=math.sqrt(5))
    nn.init.zeros_(m.lora_B)


def _delta(m, x, autocasting):
    """scale * B(A(dropout(x))): the adapter's output (..., out), in the adapter's dtype."""
    h = m.lora_dropout(x)
    if not autocasting and h.dtype != m.lora_A.dtype:
        h = h.to(m.lora_A.dtype)
    return F.linear(F.linear(h, m.lora_A), m.lora_B) * m.scale  # (..., r) then (..., out)


def _merged_delta(m):
    return (m.lora_B.detach().float() @ m.lora_A.detach().float()) * m.scale  # (out, in), float32


class QuantLoRALinear(nn.Module):
    """A LoRA adapter over a quantised frozen layer (quant.py: bitsandbytes int8 or nf4), which
    computes its own matmul: y = base(x) + scale * B(A(dropout(x))), the adapter in float32.

    The base is kept as a submodule (`base`), so the adapter's names (`*.lora_A`, `*.lora_B`) are those
    of LoRALinear and checkpoints of the trained part are the same either way; merge_lora turns it into
    a float nn.Linear of the dequantised weight plus B @ A.
    """

    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        if rank <= 0:
            raise UserError(f"LoRA rank must be a positive integer, got {rank}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        device = base.bias.device if base.bias is not None else base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        self.lora_dropout = Dropout(dropout)
        _init_adapter(self)

    def forward(self, x):
        base = self.base(x)
        return base + _delta(self, x, torch.is_autocast_enabled(x.device.type)).to(base.dtype)

    def merged_linear(self):
        """A float32 nn.Linear: the dequantised weight plus scale * B @ A, and the base's bias."""
        plain = float_linear(self.base)
        with torch.no_grad():
            plain.weight.add_(_merged_delta(self).to(plain.weight.device))
        return plain

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}"


LORA_LAYERS = (LoRALinear, QuantLoRALinear)


def apply_lora(model, rank, alpha, dropout, targets):
    """Replace the targeted nn.Linear layers of every block by LoRALinear, then freeze all but the adapters.

    targets: 'attn' (attn.c_attn, attn.c_proj) or 'all' (those plus mlp.c_fc, mlp.c_proj). lm_head
    is never adapted: in GPT-2 it is the same matrix as wte, and it stays frozen.
    Returns the names of the adapted modules.
    """
    if targets not in LORA_TARGETS:
        raise UserError(f"lora_targets must be one of {sorted(LORA_TARGETS)}, got {targets!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise UserError(f"lora_rank must be a positive integer (0 disables LoRA), got {rank!r}")
    if any(isinstance(m, LORA_LAYERS) for m in model.modules()):
        raise UserError("the model already has LoRA adapters; merge_lora(model) first to stack another")
    suffixes = LORA_TARGETS[targets]
    quantized = _quantized_layers(model)
    names = [n for n, m in model.named_modules()
             if (type(m) is nn.Linear or n in quantized) and n.endswith(suffixes) and ".h." in f".{n}"]
    assert names, f"no Linear layer matched {suffixes}: is this a GPT from model.py?"
    for n in names:
        m = model.get_submodule(n)
        model.set_submodule(n, QuantLoRALinear(m, rank, alpha, dropout) if n in quantized
                      else LoRALinear.from_linear(m, rank, alpha, dropout))
    for n, p in model.named_parameters():
        p.requires_grad_(n.rsplit(".", 1)[-1] in ADAPTER_NAMES)
    return names


def merge_lora(model):
    """Fold every adapter into its weight and turn each LoRALinear back into a plain nn.Linear, in place
    (a QuantLoRALinear into a float32 one: its dequantised weight plus the adapter).

    Afterwards the model holds exactly GPT's parameter names; its logits equal the adapted model's up
    to float rounding (within 1e-5 in float32). Returns the names of the merged modules.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, LORA_LAYERS)]
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, QuantLoRALinear):  # dequantised: a float layer again
            plain = m.merged_linear()
            plain.train(m.training)
            model.set_submodule(n, plain)
            continue
        w = m.weight
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            plain.weight.copy_(m.merged_weight())
            if m.bias is not None:
                plain.bias.copy_(m.bias)
        plain.weight.requires_grad_(w.requires_grad)
        if m.bias is not None:
            plain.bias.requires_grad_(m.bias.requires_grad)
        plain.train(m.training)
        model.set_submodule(n, plain)
    return names


def _quantized_layers(model):
    """Names of the quantised layers (quant.py), without importing bitsandbytes for a float model."""
    if not any(from_bitsandbytes(m) for m in model.modules()):
        return set()
    return {n for n, m in model.named_modules() if is_quantized(m)}


def train_only_1d(model):
    """Freeze everything except the 1-D parameters (biases, LayerNorm gains); return how many train.

    With bias=False models this leaves only the LayerNorm gains. Embeddings and matrices stay frozen.
    """
    for p in model.parameters():
        p.requires_grad_(p.dim() == 1)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise UserError("train_1d_only: the model has no 1-D parameters to train")
    return n


def freeze_base_dtype(model, dtype):
    """Store the frozen parameters (requires_grad False) in dtype, e.g. torch.bfloat16; trained ones stay.

    Halves the memory of a LoRA base. Footgun: in train_only_1d mode a plain Linear then holds a
    bfloat16 weight next to a float32 trainable bias, which F.linear only accepts under autocast
    (dtype bfloat16/float16, as on GPUs); without autocast, keep the base in float32. LoRALinear
    handles both cases itself.
    """
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"base_dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
        dtype = getattr(torch, dtype)
    for p in model.parameters():  # each shared (tied) tensor is visited once
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)
    return model


def trainable_state_dict(model):
    """{name: tensor} of the parameters that train (the adapters, or the 1-D parameters), names as in
    model.state_dict(): this is all a LoRA or 1-D checkpoint needs beyond the base model."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model, sd):
    """Load the trainable parameters back strictly: missing, unexpected or misshapen names raise ValueError."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(sd))
    unexpected = sorted(set(sd) - set(params))
    shapes = [f"{n}: {tuple(sd[n].shape)} vs model {tuple(params[n].shape)}"
              for n in sorted(set(params) & set(sd)) if tuple(sd[n].shape) != tuple(params[n].shape)]
    if missing or unexpected or shapes:
        raise UserError("trainable state does not match the model (was it saved with other lora_rank / "
                         f"lora_targets / train_1d_only settings?): missing {missing}, unexpected {unexpected}, "
                         f"shape mismatch {shapes}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(sd[n])


def count_params(model):
    """(trainable, total) parameter counts, each shared (tied) tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
