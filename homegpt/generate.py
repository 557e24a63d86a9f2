"""
Generation for model.GPT: a KV cache, sampling (temperature, top-k, top-p) and streaming, token by token.

    from homegpt.generate import generate, stream, sample_next
    out = generate(model, idx, max_new_tokens=100, temperature=0.8, top_k=200)   # = generate(model, ...)
    for column in stream(model, idx, 100):                                       # (B, 1) as it is chosen
        ...

The model's forward takes the cache (kv_cache=...) and fills it as it goes: attention appends each
layer's keys and values, and the previous-position options keep what they last saw in cache.last.
"""

import contextlib

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Attention kernels for generation on CUDA: cuDNN's is left out. It builds a plan the first time it
# meets a sequence length, and KV-cache decoding meets a new length at every token, which made
# decoding an order of magnitude slower than through flash attention (docs/gpu_check.md).
GENERATION_ATTENTION = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def generation_attention(device):
    """The context one generation step's forward runs in: GENERATION_ATTENTION on CUDA, else nothing."""
    return sdpa_kernel(list(GENERATION_ATTENTION)) if device.type == "cuda" else contextlib.nullcontext()


class KVCache:
    """Keys and values of one generation, preallocated to the block size: (n_layer, B, nh, T_max, hs)."""

    def __init__(self, n_layer, batch_size, n_head, max_len, head_size, device, dtype):
        shape = (n_layer, batch_size, n_head, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # number of positions already filled
        self.last = {}  # what the previous-position options saw last, by name (see mix_previous, earlier_tokens)

    def update(self, layer, k, v):
        """Store k, v (B, nh, T, hs) for `layer` at the current position; return all keys/values so far."""
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        end = self.pos + T
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, use_cache=True,
             stop_id=None):
    """Continue idx (B, T) by up to max_new_tokens tokens. temperature 0 is greedy decoding.

    With use_cache the prompt is prefilled once and each new token costs one position; without
    it every step recomputes the (cropped) context. Both give identical tokens. Once the
    sequence outgrows block_size the positions shift every step, so it recomputes the window.
    stop_id (e.g. <|endoftext|>): a row that has produced it is filled with it from then on, and
    generation ends early once every row has (the result may then be shorter).
    """
    new = list(stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache, stop_id))
    return torch.cat([idx] + new, dim=1)


def next_logits(model, idx, cache, use_cache):
    """(logits, cache) for the next position of idx (B, T): the prompt prefills a new cache, then each
    step feeds the last token alone; without a cache (or past block_size) the whole window again."""
    cfg = model.config
    if not use_cache or idx.size(1) > cfg.block_size:
        return model(idx[:, -cfg.block_size:])[0], None
    if cache is not None:
        return model(idx[:, -1:], kv_cache=cache)[0], cache  # one new position
    # the cache holds k and v as they arrive: in autocast's compute dtype when autocast is on
    # (c_attn's output is bf16/fp16 there, and a float32 cache would cost twice the memory and a
    # cast per token and layer), else in the weights' dtype
    dev = idx.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else next(model.parameters()).dtype
    cache = KVCache(cfg.n_layer, idx.size(0), cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head,
                    idx.device, dtype)
    return model(idx, kv_cache=cache)[0], cache  # prefill with the whole prompt


@torch.no_grad()
def stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
           use_cache=True, stop_id=None):
    """generate() one token at a time: yields each new column (B, 1) as soon as it is chosen,
    for chat that prints as it goes. The model is in eval mode while the generator runs."""
    was_training = model.training
    model.eval()
    cfg = model.config
    cache = None
    done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device) if stop_id is not None else None
    try:
        for _ in range(max_new_tokens):
            with generation_attention(idx.device):
                logits, cache = next_logits(model, idx, cache, use_cache)
            next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            if done is not None:
                next_id = next_id.masked_fill(done, stop_id)
                done = done | (next_id == stop_id)
            idx = torch.cat((idx, next_id), dim=1)
            if cache is not None and idx.size(1) > cfg.block_size:
                cache = None  # the cropped window no longer starts at position 0
            yield next_id
            if done is not None and bool(done.all()):  # one host sync per token, only with stop_id
                break
    finally:
        model.train(was_training)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row from logits (B, V): greedy at temperature 0, else sample.

    top_k keeps exactly k tokens even when logits tie (masking `< kth value` would keep more);
    top_p keeps the smallest set whose probability reaches p (always at least the top token).
    """
    if temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the tokens ranked before it already reach top_p
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, sorted_idx, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator)
