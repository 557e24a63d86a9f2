"""
Hugging Face GPT-2 and GPT-J in our GPT's terms: the key-by-key weight mapping both ways, the config
mapping, and loading a model (OpenAI's GPT-2, a hub repository or a save_pretrained directory) into
model.py's GPT one tensor at a time.

    from homegpt.hf import from_pretrained, hf_state_dict
    model = from_pretrained("gpt2")        # our GPT; or "gpt2-xl", "EleutherAI/gpt-j-6b", a directory
    sd = hf_state_dict(model)              # the same weights under GPT2LMHeadModel's names
    python sample.py --init_from=gpt2 --start="Hello"   # what a command makes of it

Hugging Face stores GPT-2 as OpenAI wrote it: the four matmuls of a block (attn.c_attn, attn.c_proj,
mlp.c_fc, mlp.c_proj) are "Conv1D" modules whose weight is (in, out), the transpose of nn.Linear's
(out, in). The files also carry the causal-mask buffers attn.bias / attn.masked_bias,
which are not weights. Every name is mapped explicitly and every shape checked, so a renamed or
missing tensor is an error here instead of a silently random layer.

Where the files come from (the hub, its cache, whether it is reachable) is hub.py's; writing an HF
directory, a PEFT adapter or the tokenizer files is export.py's.
transformers is imported lazily: the rest of the toolkit runs without it.
"""

import json
from pathlib import Path

import torch

from homegpt.errors import UserError
from homegpt.hub import HF_MODELS, HUB_REPO, download_gpt2, snapshot
from homegpt.lora import ADAPTER_NAMES
from model import EXTRA, GPT, GPTConfig
from homegpt.quant import QUANTIZED_SUFFIXES, bitsandbytes, check_kind, quantized_linear

GPT2_SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
               "gpt2-xl": (48, 25, 1600)}  # (n_layer, n_head, n_embd); vocab 50257 and context 1024 for all
GPT2_CONTEXT = 1024  # n_positions of all four

# our name inside block i -> HF's name inside block i (both under "h.{i}."); listed, not pattern-matched
LAYER_KEYS = {
    "ln_1.weight": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "attn.c_attn.weight": "attn.c_attn.weight",
    "attn.c_attn.bias": "attn.c_attn.bias",
    "attn.c_proj.weight": "attn.c_proj.weight",
    "attn.c_proj.bias": "attn.c_proj.bias",
    "ln_2.weight": "ln_2.weight",
    "ln_2.bias": "ln_2.bias",
    "mlp.c_fc.weight": "mlp.c_fc.weight",
    "mlp.c_fc.bias": "mlp.c_fc.bias",
    "mlp.c_proj.weight": "mlp.c_proj.weight",
    "mlp.c_proj.bias": "mlp.c_proj.bias",
}
# Conv1D weights, stored (in, out): transposed on the way in and on the way out
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# per-block buffers in HF files (the causal mask and its fill value): not weights, dropped on import
MASK_BUFFERS = ("attn.bias", "attn.masked_bias")
LAYER_NORM_EPS = 1e-5  # model.py's LayerNorm; GPT-2's layer_norm_epsilon
# HF activation_function -> GPTConfig.activation. gelu_new (GPT-2's) and gelu_pytorch_tanh are both
# GELU's tanh approximation; HF's plain "gelu" is the exact erf GELU (nanoGPT's)
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
GPT2_VOCAB = 50257  # 50,000 merges + 256 bytes + <|endoftext|>
EOT_ID = 50256
EOT = "<|endoftext|>"


def hf_key_map(n_layer, tie_weights):
    """Our parameter name -> the HF GPT2LMHeadModel name without its "transformer." prefix.

    A tied lm_head is wte itself, so it only appears (as "lm_head.weight") when untied.
    """
    m = {
        "transformer.wte.weight": "wte.weight",
        "transformer.wpe.weight": "wpe.weight",
    }
    for i in range(n_layer):
        for ours, theirs in LAYER_KEYS.items():
            m[f"transformer.h.{i}.{ours}"] = f"h.{i}.{theirs}"
    m["transformer.ln_f.weight"] = "ln_f.weight"
    m["transformer.ln_f.bias"] = "ln_f.bias"
    if not tie_weights:
        m["lm_head.weight"] = "lm_head.weight"
    return m


def _is_transposed(our_key):
    return our_key.startswith("transformer.h.") and our_key.split(".", 3)[3] in TRANSPOSED


# ----------------------------------------------------------------------------- import

def from_pretrained(name_or_path, override_args=None, base_quant=""):
    """A GPT (model.py) holding OpenAI's GPT-2 weights ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'), or
    those of a Hugging Face GPT-2 or GPT-J directory or hub repository ('EleutherAI/gpt-j-6b').

    override_args may set "dropout" (for fine-tuning) and "block_size" (cropped down only).
    The model is built on the meta device and each weight is read, converted and placed one at a
    time (a float32 copy of GPT-J-6B alone is 24 GB); with base_quant ('int8' / 'nf4', quant.py) each
    block matmul is quantised as it arrives, so loading peaks near the quantised size.
    Raises ValueError naming the model/path and what to do on anything it cannot load exactly.
    """
    override_args = dict(override_args or {})
    unknown = sorted(set(override_args) - {"dropout", "block_size"})
    if unknown:
        raise UserError(f"from_pretrained can only override 'dropout' and 'block_size', not {unknown}: "
                         f"the other shapes are fixed by the pretrained weights")
    if base_quant:
        check_kind(base_quant)
        bitsandbytes()  # before a download, not after
    hf_config, sd, source = read_hf_gpt2(name_or_path)
    config = gpt_config_from_hf(hf_config, source)
    config = GPTConfig(**config, dropout=float(override_args.get("dropout", 0.0)))
    block_size = override_args.get("block_size")
    if block_size is not None and not 0 < block_size <= config.block_size:
        raise UserError(f"block_size={block_size} for {source}: must be between 1 and its "
                         f"{config.block_size} positions (a pretrained model can only be cropped down)")
    with torch.device("meta"):  # shapes only: no memory, no random init (every weight is overwritten)
        model = GPT(config)
    load_hf_state_dict(model, sd, source, base_quant)
    if block_size is not None and block_size < config.block_size:
        model.crop_block_size(block_size)
    return model


def read_hf_gpt2(name_or_path):
    """(HF config dict, HF-named tensors minus "transformer." (a dict, or a ShardReader that reads
    each when asked), source description)."""
    name_or_path = str(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():  # a directory wins over a hub name: ./gpt2 saved earlier loads offline
        return _read_local(path)
    if name_or_path in HF_MODELS:
        return download_gpt2(name_or_path)
    if path.exists():
        raise UserError(f"{path} is a file: give the directory that save_pretrained wrote "
                         f"(holding config.json and model.safetensors or pytorch_model.bin)")
    if HUB_REPO.fullmatch(name_or_path):
        return _read_local(snapshot(name_or_path))
    raise UserError(f"{name_or_path!r} is neither a GPT-2 model name ({', '.join(HF_MODELS)}), a hub "
                     f"repository (owner/name, e.g. EleutherAI/gpt-j-6b) nor an existing directory: check "
                     f"the spelling, or give the path of a Hugging Face GPT-2 / GPT-J directory written by "
                     f"save_pretrained")


def _read_local(path):
    """config.json and the weights save_pretrained writes: model.safetensors, pytorch_model.bin, or
    either one sharded with an index.json. pytorch_model.bin is a pickle (Hugging Face's legacy
    format): it is read with torch.load(weights_only=True), which refuses anything but tensors."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path} has no config.json: not a Hugging Face model directory "
                         f"(write one with model.save_pretrained(dir))")
    try:
        hf_config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_file}: not valid JSON ({e}); write it again with save_pretrained") from e
    if not isinstance(hf_config, dict):
        raise UserError(f"{cfg_file}: expected a JSON object, got {type(hf_config).__name__}")
    files = []
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).is_file():
            files = [path / single]
        elif (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{path / index}: not a valid shard index ({e!r})") from e
            files = [path / f for f in sorted(set(weight_map.values()))]
        if files:
            break
    if not files:
        raise UserError(f"{path} has no weights: expected model.safetensors or pytorch_model.bin "
                         f"(or a sharded *.index.json), as save_pretrained writes")
    return hf_config, ShardReader(files), str(path)


def _damaged(file, e):
    return UserError(f"{file}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                     f"the file is damaged or truncated: save or copy it again")


def _safe_open(file):
    from safetensors import safe_open
    return safe_open(str(file), framework="pt", device="cpu")


class ShardReader:
    """The tensors of a model directory's weight files by HF name (without "transformer."), each read
    from its file only when asked for, so a 6B model never sits in memory twice while it loads.

    A safetensors file is opened (memory-mapped) for each tensor and closed once the tensor is copied
    out: the file's pages then leave the process, so its resident memory never holds the file (a
    handle kept open would count every page read so far). A pytorch_model.bin (a pickle: read with
    weights_only=True, which refuses anything but tensors) is memory-mapped for the whole load, so
    the pages read stay resident until it ends (page cache the kernel may drop, but counted in RSS).
    """

    def __init__(self, files):
        self._files, self._where = {}, {}  # file -> open handle; name -> (file, name in the file)
        for f in files:
            if not f.is_file():
                raise UserError(f"{f} is missing: the shard index lists it; copy the whole directory")
            try:
                if f.suffix == ".safetensors":
                    with _safe_open(f) as opened:
                        names = list(opened.keys())
                    handle = None
                else:
                    handle = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                    if not isinstance(handle, dict) or not all(isinstance(v, torch.Tensor) for v in handle.values()):
                        raise UserError(f"{f}: expected a dict of tensors (a state dict)")
                    names = list(handle)
            except UserError:
                raise
            except Exception as e:  # safetensors, pickle and zip each raise their own types on a damaged file
                raise _damaged(f, e) from e
            self._files[f] = handle
            for n in names:
                # GPT2LMHeadModel saves "transformer.h.0...", GPT2Model (OpenAI's own hub files) saves "h.0..."
                self._where[n.removeprefix("transformer.")] = (f, n)

    def keys(self):
        return self._where.keys()

    def __contains__(self, name):
        return name in self._where

    def __getitem__(self, name):
        f, n = self._where[name]
        handle = self._files[f]
        try:
            if handle is not None:
                return handle[n]
            with _safe_open(f) as opened:
                return opened.get_tensor(n)
        except Exception as e:  # a truncated file fails here, at the tensor past its end
            raise _damaged(f, e) from e

    def pop(self, name, default=None):
        if name not in self._where:
            return default
        t = self[name]
        del self._where[name]
        return t


def gpt_config_from_hf(hf, source):
    """GPTConfig fields from a HF GPT-2 (or GPT-J) config dict; refuses what model.py cannot reproduce exactly."""
    if hf.get("model_type") == "gptj":
        return gptj_config_from_hf(hf, source)
    problems = []
    if hf.get("model_type", "gpt2") != "gpt2":
        problems.append(f"model_type is {hf.get('model_type')!r}, not 'gpt2' or 'gptj'")
    act = hf.get("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS:
        problems.append(f"activation_function {act!r}: model.py computes {' / '.join(map(repr, HF_ACTIVATIONS))} only")
    eps = hf.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if abs(eps - LAYER_NORM_EPS) > 1e-12:
        problems.append(f"layer_norm_epsilon {eps}: model.py's LayerNorm uses {LAYER_NORM_EPS}")
    n_embd = hf.get("n_embd")
    if hf.get("n_inner") not in (None, 4 * (n_embd or 0)):
        problems.append(f"n_inner {hf.get('n_inner')}: model.py's MLP is 4 * n_embd = {4 * (n_embd or 0)} wide")
    if not hf.get("scale_attn_weights", True):
        problems.append("scale_attn_weights is false: model.py always scales attention by 1/sqrt(head size)")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx is true: model.py does not scale by layer index")
    if hf.get("add_cross_attention", False):
        problems.append("add_cross_attention is true: model.py is decoder-only")
    fields = {"n_layer": hf.get("n_layer"), "n_head": hf.get("n_head"), "n_embd": n_embd,
              # n_ctx is the older spelling of the context length
              "block_size": hf.get("n_positions", hf.get("n_ctx")), "vocab_size": hf.get("vocab_size")}
    problems += _shape_problems(fields)
    if problems:
        raise UserError(f"cannot load {source} exactly: " + "; ".join(problems))
    # HF's GPT-2 always has biases (Linear and LayerNorm); the head is tied unless the config says not
    return dict(fields, bias=True, qkv_bias=True, tie_weights=bool(hf.get("tie_word_embeddings", True)),
                activation=HF_ACTIVATIONS[act])


def _shape_problems(fields):
    """The GPTConfig shape fields read from a config.json that are not positive integers, as messages."""
    return [f"{k} ({'n_positions' if k == 'block_size' else k}) is {v!r}: expected a positive integer"
            for k, v in fields.items() if not isinstance(v, int) or isinstance(v, bool) or v <= 0]


@torch.no_grad()
def load_hf_state_dict(model, sd, source, base_quant=""):
    """Put HF-named tensors (no "transformer." prefix; a dict or a ShardReader) into our GPT one at a
    time, every key and shape accounted for. A model built on the meta device gets each weight placed
    as a new float32 parameter (each block matmul quantised instead with base_quant); a model in
    memory gets them copied in."""
    cfg = model.config
    if isinstance(sd, dict):
        sd = dict(sd)  # the mask buffers are popped below: not from the caller's dict
    shapes = {k: p.shape for k, p in model.named_parameters()}
    read = _gptj_tensors if architecture(cfg) == "gptj" else _gpt2_tensors
    for our_key, t in read(cfg, sd, source, shapes):
        place_weight(model, our_key, t, base_quant)
    if cfg.tie_weights:  # the placed wte is a new parameter: lm_head shares it again
        model.lm_head.weight = model.transformer.wte.weight
    left = [n for n, p in model.named_parameters() if p.is_meta]
    assert not left, f"weights never placed (their keys were checked above): {left[:4]}"


def place_weight(model, key, t, base_quant=""):
    """Put tensor t as parameter `key` of a model built on the meta device (a new float32 parameter),
    or quantised (quant.py) when it is a block matmul's weight and base_quant is set; a model in
    memory gets it copied in."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    if base_quant and attr == "weight" and module_name.startswith("transformer.h.") \
            and module_name.endswith(QUANTIZED_SUFFIXES):
        model.set_submodule(module_name, quantized_linear(t, module.bias, base_quant))
    elif old.is_meta:  # a fresh contiguous float32 copy: never a view into a memory-mapped file
        setattr(module, attr, torch.nn.Parameter(t.to(torch.float32, memory_format=torch.contiguous_format,
                                                      copy=True), requires_grad=old.requires_grad))
    else:
        old.copy_(t)


def _check_keys(sd, wanted, source, n_layer, kind):
    missing, unexpected = sorted(set(wanted) - set(sd.keys())), sorted(set(sd.keys()) - set(wanted))
    if missing or unexpected:
        raise UserError(f"{source}: the weights do not match a {kind} of its config.json (n_layer={n_layer}): "
                        f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                        f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")


def _gpt2_tensors(cfg, sd, source, shapes):
    """(our key, tensor) for every weight of a GPT-2, read from HF-named `sd` one at a time."""
    for i in range(cfg.n_layer):
        for buf in MASK_BUFFERS:
            sd.pop(f"h.{i}.{buf}", None)
    if cfg.tie_weights and "lm_head.weight" in sd:
        # some files store the tied head as its own tensor; it must really be wte
        head = sd.pop("lm_head.weight")
        if "wte.weight" in sd and not torch.equal(head, sd["wte.weight"]):
            raise UserError(f"{source}: lm_head.weight differs from wte.weight although the config says "
                             f"tie_word_embeddings=true; set it to false in config.json if the head is separate")
    key_map = hf_key_map(cfg.n_layer, cfg.tie_weights)
    _check_keys(sd, key_map.values(), source, cfg.n_layer, "GPT-2")
    uncovered = set(shapes) - set(key_map) - ({"lm_head.weight"} if cfg.tie_weights else set())
    assert not uncovered, f"model parameters with no GPT-2 counterpart: {sorted(uncovered)}"
    for our_key, hf_key in key_map.items():
        src = sd[hf_key]
        t = src.t() if _is_transposed(our_key) else src
        if t.shape != shapes[our_key]:
            raise UserError(f"{source}: {hf_key} has shape {tuple(src.shape)}, expected "
                             f"{tuple(shapes[our_key])}{' transposed' if _is_transposed(our_key) else ''} "
                             f"for its config.json")
        yield our_key, t


# ----------------------------------------------------------------------------- GPT-J

# GPT-J (EleutherAI's GPT-J-6B, transformers' GPTJForCausalLM) in GPTConfig's terms: rotary positions
# on the first rotary_dim dims of each head, a parallel block with one LayerNorm, no bias on the
# attention projections, an untied lm_head with a bias. Its q/k/v are three nn.Linear (out, in):
# stacked into our c_attn on import and split on export; nothing is transposed.
GPTJ_LAYER_KEYS = {
    "ln_1.weight": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "attn.c_proj.weight": "attn.out_proj.weight",
    "mlp.c_fc.weight": "mlp.fc_in.weight",
    "mlp.c_fc.bias": "mlp.fc_in.bias",
    "mlp.c_proj.weight": "mlp.fc_out.weight",
    "mlp.c_proj.bias": "mlp.fc_out.bias",
}
GPTJ_QKV = ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight")  # -> attn.c_attn.weight


def architecture(config):
    """'gpt2' or 'gptj': the transformers class that computes exactly what a GPTConfig does. Refuses
    the combinations that neither does (e.g. rotary positions in a sequential block)."""
    newer = [f"{k}={getattr(config, k)!r}" for k in GPTConfig.fields_tagged(EXTRA) if getattr(config, k)]
    if newer:
        raise UserError(f"transformers' GPT-2 and GPT-J classes compute none of {', '.join(newer)}: a model trained "
                        f"with them cannot be exported to Hugging Face format (train without them to export)")
    gptj = (config.rotary_dim, config.parallel_residual)
    if not any(gptj) and not config.lm_head_bias:
        return "gpt2"  # (a missing bias exports as zeros: it computes the same)
    if all(gptj) and not config.qkv_bias and not config.attn_proj_bias and config.activation == "gelu_tanh":
        return "gptj"
    raise UserError(f"transformers has no model class for this combination (rotary_dim={config.rotary_dim}, "
                    f"parallel_residual={config.parallel_residual}, qkv_bias={config.qkv_bias}, attn_proj_bias="
                    f"{config.attn_proj_bias}, lm_head_bias={config.lm_head_bias}, activation={config.activation!r}): "
                    f"GPT-2 has learned positions and a sequential block; GPT-J has rotary positions, a parallel "
                    f"block, no attention biases and gelu_new")


def gptj_config_from_hf(hf, source):
    problems = []
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function {hf.get('activation_function')!r}: model.py's GPT-J MLP is gelu_new")
    if abs(hf.get("layer_norm_epsilon", LAYER_NORM_EPS) - LAYER_NORM_EPS) > 1e-12:
        problems.append(f"layer_norm_epsilon {hf.get('layer_norm_epsilon')}: model.py's LayerNorm uses {LAYER_NORM_EPS}")
    n_embd, n_head = hf.get("n_embd"), hf.get("n_head")
    if hf.get("n_inner") not in (None, 4 * (n_embd or 0)):
        problems.append(f"n_inner {hf.get('n_inner')}: model.py's MLP is 4 * n_embd wide")
    if hf.get("tie_word_embeddings", False):
        problems.append("tie_word_embeddings is true: GPT-J's lm_head (with its bias) is its own matrix")
    rotary = hf.get("rotary_dim")
    if not isinstance(rotary, int) or isinstance(rotary, bool) or rotary <= 0 or rotary % 2:
        problems.append(f"rotary_dim is {rotary!r}: expected a positive even integer (GPT-J-6B: 64)")
    fields = {"n_layer": hf.get("n_layer"), "n_head": n_head, "n_embd": n_embd,
              "block_size": hf.get("n_positions"), "vocab_size": hf.get("vocab_size")}
    problems += _shape_problems(fields)
    if problems:
        raise UserError(f"cannot load {source} exactly as GPT-J: " + "; ".join(problems))
    return dict(fields, bias=True, qkv_bias=False, attn_proj_bias=False, tie_weights=False, lm_head_bias=True,
                rotary_dim=rotary, parallel_residual=True, activation="gelu_tanh")


def _gptj_tensors(cfg, sd, source, shapes):
    """(our key, tensor) for every weight of a GPT-J, read from HF-named `sd` one at a time (q, k, v
    of a block read together and stacked into c_attn)."""
    for i in range(cfg.n_layer):
        for buf in MASK_BUFFERS:
            sd.pop(f"h.{i}.{buf}", None)
    wanted = {"wte.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight", "lm_head.bias"}
    for i in range(cfg.n_layer):
        wanted |= {f"h.{i}.{k}" for k in list(GPTJ_LAYER_KEYS.values()) + list(GPTJ_QKV)}
    _check_keys(sd, wanted, source, cfg.n_layer, "GPT-J")
    theirs = {"transformer.wte.weight": "wte.weight", "transformer.ln_f.weight": "ln_f.weight",
              "transformer.ln_f.bias": "ln_f.bias", "lm_head.weight": "lm_head.weight", "lm_head.bias": "lm_head.bias"}
    for i in range(cfg.n_layer):
        theirs |= {f"transformer.h.{i}.{our}": f"h.{i}.{k}" for our, k in GPTJ_LAYER_KEYS.items()}
        theirs[f"transformer.h.{i}.attn.c_attn.weight"] = None  # three tensors, stacked
    assert set(shapes) == set(theirs), f"GPT-J keys out of step with model.py: {sorted(set(shapes) ^ set(theirs))[:6]}"
    for our_key in shapes:  # the model's own order: a Linear's weight before its bias
        hf_key = theirs[our_key]
        if hf_key is None:
            pre = our_key.removesuffix("attn.c_attn.weight").removeprefix("transformer.")
            hf_key = pre + "attn.{q,k,v}_proj.weight"
            t = torch.cat([sd[pre + k] for k in GPTJ_QKV], dim=0)
        else:
            t = sd[hf_key]
        if t.shape != shapes[our_key]:
            raise UserError(f"{source}: {hf_key} has shape {tuple(t.shape)}, expected {tuple(shapes[our_key])} "
                            f"for its config.json")
        yield our_key, t


def gptj_state_dict(ours, cfg, dtype=torch.float32):
    """Our GPT-J-shaped weights under GPTJForCausalLM's names, in dtype (zeros for a bias the model lacks)."""
    f32 = lambda t: t.detach().to("cpu", dtype).contiguous().clone()
    get = lambda k, like: f32(ours[k]) if k in ours else torch.zeros(ours[like].shape[0], dtype=dtype)
    out = {"transformer.wte.weight": f32(ours["transformer.wte.weight"]),
           "transformer.ln_f.weight": f32(ours["transformer.ln_f.weight"]),
           "transformer.ln_f.bias": get("transformer.ln_f.bias", "transformer.ln_f.weight"),
           # a tied head (trained that way) is written out as its own copy: GPT-J's is untied
           "lm_head.weight": f32(ours["lm_head.weight"] if "lm_head.weight" in ours else ours["transformer.wte.weight"]),
           "lm_head.bias": get("lm_head.bias", "transformer.wte.weight")}
    known = set(out) | {"transformer.wte.weight"}
    for i in range(cfg.n_layer):
        pre = f"transformer.h.{i}."
        for our, theirs in GPTJ_LAYER_KEYS.items():
            like = pre + our.removesuffix(".bias") + ".weight"
            out[pre + theirs] = get(pre + our, like)
            known.add(pre + our)
        for k, t in zip(GPTJ_QKV, f32(ours[pre + "attn.c_attn.weight"]).split(cfg.n_embd, dim=0)):
            out[pre + k] = t.contiguous()
        known.add(pre + "attn.c_attn.weight")
    leftover = set(ours) - known
    if leftover:
        raise UserError(f"the model has tensors a GPT-J does not ({sorted(leftover)[:4]} ...): merge LoRA "
                        f"adapters into the weights first (checkpoint.load_model does)")
    return out


# ----------------------------------------------------------------------------- our names -> HF's (export)

def hf_state_dict(model, drop_lora=False, dtype=torch.float32):
    """Our GPT's weights under GPT2LMHeadModel's names, in dtype on the CPU, with zeros for every bias
    HF expects but the model lacks (bias=False, qkv_bias=False): a zero bias computes the same thing.

    drop_lora: leave LoRA adapters out, keeping the frozen weights they sit on (the base that
    export_peft_adapter's adapter applies to); without it, adapters are refused."""
    cfg = model.config
    ours = model.state_dict()
    if drop_lora:
        ours = {k: v for k, v in ours.items() if k.rsplit(".", 1)[-1] not in ADAPTER_NAMES}
    if architecture(cfg) == "gptj":
        return gptj_state_dict(ours, cfg, dtype)
    key_map = hf_key_map(cfg.n_layer, cfg.tie_weights)
    leftover = set(ours) - set(key_map) - ({"lm_head.weight"} if cfg.tie_weights else set())
    if leftover:
        raise UserError(f"the model has tensors a GPT-2 does not ({sorted(leftover)[:4]} ...): merge LoRA "
                         f"adapters into the weights first (checkpoint.load_model does), or pass drop_lora=True "
                         f"to export the frozen base alone (its adapter goes out with export_peft_adapter)")
    out = {}
    for our_key, hf_key in key_map.items():
        if our_key in ours:
            t = ours[our_key].detach().to("cpu", dtype)
            t = t.t() if _is_transposed(our_key) else t
        else:
            # the bias that the model was built without: zeros of the size of its weight's output
            weight = ours[our_key.removesuffix(".bias") + ".weight"]
            assert our_key.endswith(".bias"), f"{our_key} missing from the model"
            t = torch.zeros(weight.shape[0], dtype=dtype)
        out["lm_head.weight" if hf_key == "lm_head.weight" else "transformer." + hf_key] = t.contiguous().clone()
    return out


def hf_config(config, tokenizer):
    """A transformers GPT2Config (or GPTJConfig) equal to our GPTConfig."""
    from transformers import GPT2Config
    eot = EOT_ID if tokenizer == "gpt2" else None
    if architecture(config) == "gptj":
        from transformers import GPTJConfig
        return GPTJConfig(
            vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
            n_layer=config.n_layer, n_head=config.n_head, rotary_dim=config.rotary_dim, n_inner=None,
            activation_function="gelu_new", layer_norm_epsilon=LAYER_NORM_EPS, tie_word_embeddings=False,
            resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
            bos_token_id=eot, eos_token_id=eot, architectures=["GPTJForCausalLM"])
    return GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, n_inner=None,
        # gelu_new is GPT-2's own spelling of the tanh GELU, understood by every GPT-2 loader
        activation_function={"gelu_tanh": "gelu_new", "gelu": "gelu"}[getattr(config, "activation", "gelu_tanh")],
        layer_norm_epsilon=LAYER_NORM_EPS, tie_word_embeddings=config.tie_weights,
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        # a char-level model has no <|endoftext|>; a GPT-2 id there would be out of its vocabulary
        bos_token_id=eot, eos_token_id=eot, architectures=["GPT2LMHeadModel"])
