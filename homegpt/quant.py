"""
Quantised frozen bases: the matmuls of a frozen GPT's blocks stored in 8 or 4 bits by bitsandbytes,
with LoRA adapters (lora.py) or the 1-D parameters training on top in float.

    python train.py config/finetune_gptj_lora_all.py     # base_quant='int8': GPT-J-6B in ~6 GB
    from homegpt.quant import quantize_model, dequantize_model
    quantize_model(model, "int8")      # every block's c_attn, c_proj, c_fc, mlp.c_proj -> bitsandbytes
    dequantize_model(model)            # back to float nn.Linear layers, e.g. to export

'int8' is LLM.int8 (Dettmers et al. 2022, bitsandbytes.nn.Linear8bitLt): each weight row is scaled to
int8 by its absolute maximum; inputs are quantised per row too, except the feature columns holding an
outlier above `INT8_THRESHOLD`, which stay in 16 bits (the 6.0 of the paper and of transformers'
BitsAndBytesConfig). 'nf4' is QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, Linear4bit): blocks of
64 weights share one absolute maximum, which is itself quantised ("double quantisation").
bitsandbytes 0.50 runs both (and its 8-bit optimizers) on a CPU as well as on CUDA.

What stays in float: the embeddings, lm_head (as transformers' load_in_8bit keeps it, for the
logits' precision), the LayerNorms and every bias. A quantised layer is frozen: only LoRA adapters
above it, or its bias under train_1d_only, can train. The weights are quantised as they are placed
(quantized_linear), so loading a base never holds a float copy of every matmul (hf.py streams them).
"""

import logging

import torch
import torch.nn as nn

from homegpt.errors import UserError

BASE_QUANTS = ("int8", "nf4")
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (paper, Sec. 3.2; transformers' llm_int8_threshold)
# the Linear layers of each block that are quantised; lm_head and the embeddings stay in float
QUANTIZED_SUFFIXES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def bitsandbytes():
    """The bitsandbytes module, or a UserError saying how to install it."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise UserError("base_quant needs bitsandbytes (0.50+ for a CPU): pip install 'bitsandbytes>=0.50'") from e
    return bnb


class _Once(logging.Filter):
    """Lets each distinct message through once. bitsandbytes logs "MatMul8bitLt: inputs will be cast
    from torch.float32 to float16" at every forward of every int8 layer on float32 inputs (what
    LLM.int8 does by design, a CPU's case): said once, it informs; at every step it buries the log."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record):
        message = record.getMessage()
        first = message not in self.seen
        self.seen.add(message)
        return first


def _log_once(name="bitsandbytes.autograd._functions"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _Once) for f in logger.filters):
        logger.addFilter(_Once())


def check_kind(kind):
    if kind not in BASE_QUANTS:
        raise UserError(f"base_quant must be '' (float base) or one of {BASE_QUANTS}, got {kind!r}")


def from_bitsandbytes(module):
    """True for any bitsandbytes module, found without importing bitsandbytes (a float model never needs it)."""
    return type(module).__module__.startswith("bitsandbytes")


def is_quantized(module):
    """True for the bitsandbytes layers quantized_linear makes."""
    bnb = bitsandbytes()
    return isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def quantized_linear(weight, bias, kind):
    """A frozen bitsandbytes Linear of `weight` (out, in) quantised on the weight's device (a CPU, or
    CUDA), with `bias` (or None) kept in float. Only the quantised copy stays: the caller's float
    weight can be freed at once, which is what lets a 6B base load in its int8 size."""
    check_kind(kind)
    bnb = bitsandbytes()
    _log_once()
    out_features, in_features = weight.shape
    device = weight.device
    if kind == "int8":
        m = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                threshold=INT8_THRESHOLD, device="meta")
        # Int8Params.to() quantises a float tensor (via float16) as it moves from the host to a device: a
        # weight already on the GPU goes through the host, or it would stay float there
        m.weight = bnb.nn.Int8Params(weight.detach().cpu(), requires_grad=False, has_fp16_weights=False).to(device)
    else:
        m = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=None,
                              compress_statistics=True, quant_type="nf4", device="meta")
        m.weight = bnb.nn.Params4bit(weight.detach(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4").to(device)
        # On a CPU with AVX512-BF16 (Zen 4, Sapphire Rapids), bitsandbytes repacks the weight for its
        # inference kernel at the first forward in eval mode, and keeps it packed: every later training
        # forward then runs that kernel, which has no backward (no gradient reaches the layers below,
        # and adding the bias raises an autograd error). LoRA trains through these layers, and
        # evaluates between steps, so the packing stays off.
        m.support_avx512bf16_for_cpu = False
    if bias is not None and not bias.is_meta:  # (a loader building on the meta device places it later)
        m.bias = nn.Parameter(bias.detach().to(device, torch.float32), requires_grad=False)
    return m


def dequantized_weight(module):
    """The float32 (out, in) weight a quantised layer computes with (its rounding included)."""
    bnb = bitsandbytes()
    w = module.weight
    if isinstance(module, bnb.nn.Linear8bitLt):
        # the row scales move from the weight into the layer's state at its first forward
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        assert scb is not None, "an int8 layer without its row scales: was it quantised?"
        return bnb.functional.int8_vectorwise_dequant(w.data, scb).float()
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()


def float_linear(module, dtype=torch.float32):
    """A plain nn.Linear computing what a quantised layer's weights hold (for merge and export)."""
    w = dequantized_weight(module)
    plain = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        plain.weight.copy_(w)
        if module.bias is not None:
            plain.bias.copy_(module.bias)
    plain.weight.requires_grad_(False)
    if module.bias is not None:
        plain.bias.requires_grad_(module.bias.requires_grad)
    return plain


def _targets(model):
    return [n for n, m in model.named_modules()
            if type(m) is nn.Linear and n.endswith(QUANTIZED_SUFFIXES) and n.startswith("transformer.h.")]


def quantize_model(model, kind):
    """Replace each block's float Linear layers by quantised, frozen ones, in place; returns their
    names. For a model already in memory (one of our runs as a base, a test's small GPT); a
    pretrained base from a file is quantised tensor by tensor while loading instead (hf.py)."""
    names = _targets(model)
    assert names, "no block Linear layers to quantise: is this a GPT from model.py?"
    for n in names:
        lin = model.get_submodule(n)
        model.set_submodule(n, quantized_linear(lin.weight, lin.bias, kind))
    return names


def dequantize_model(model, dtype=torch.float32):
    """Turn every quantised layer back into a float nn.Linear, in place; returns their names."""
    names = [n for n, m in model.named_modules() if is_quantized(m)]
    for n in names:
        model.set_submodule(n, float_linear(model.get_submodule(n), dtype))
    return names


def quantized_bytes(n_params, kind, rows=0):
    """Bytes of n_params weights stored as `kind`: int8 plus a float32 scale per row; nf4 half a byte
    plus one 8-bit absmax per 64 weights and a float32 per 256 of those (double quantisation)."""
    if kind == "int8":
        return n_params + 4 * rows
    assert kind == "nf4", kind
    return n_params / 2 + n_params / 64 + 4 * n_params / (64 * 256)
