"""
Hugging Face GPT-2 interop: import OpenAI's GPT-2 (or any HF GPT-2 or GPT-J directory), export ours to HF format.

    from homegpt.hf import export_hf, from_pretrained
    model = from_pretrained("gpt2")                    # our GPT; or "gpt2-xl", or a save_pretrained directory
    export_hf(model, "hf-gpt2", tokenizer="gpt2")      # transformers.AutoModelForCausalLM loads it
    python export_hf.py --out_dir=out-shakespeare --hf_dir=hf-shakespeare   # the same from a checkpoint
    python export_hf.py --out_dir=out-instruct-lora --hf_dir=hf-base --adapter_dir=hf-adapter  # LoRA for PEFT

Hugging Face stores GPT-2 as OpenAI wrote it: the four matmuls of a block (attn.c_attn, attn.c_proj,
mlp.c_fc, mlp.c_proj) are "Conv1D" modules whose weight is (in, out), the transpose of nn.Linear's
(out, in). The files also carry the causal-mask buffers attn.bias / attn.masked_bias,
which are not weights. Every name is mapped explicitly and every shape checked, so a renamed or
missing tensor is an error here instead of a silently random layer.

A LoRA run can also leave its adapter unmerged, as a PEFT adapter directory (export_peft_adapter):
PEFT stores A (r, in) and B (out, r) as lora.py does, keyed by the adapted module's HF name.

The tokenizer: offline there is nothing to download, so vocab.json and merges.txt are rebuilt from
tiktoken's GPT-2 ranks (the same 50,257 ids); see gpt2_vocab_and_merges.
transformers is imported lazily: the rest of the toolkit runs without it.
Offline (no route to the hub, or HF_HUB_OFFLINE=1) a GPT-2 name loads from the local Hugging Face cache
or fails at once with what to do, instead of after ~30 s of retries; see hub_unreachable_reason, which
evaluation.py and data/fineweb/prepare.py ask too.
"""

import contextlib
import functools
import json
import os
import re
import shutil
from pathlib import Path

import torch

from homegpt.dataloader import gpt2_encoding
from homegpt.errors import UserError
from homegpt.fileio import CKPT_PREFIX, check_writable, checkpoint_above, fsync_dir, run_signs
from homegpt.lora import ADAPTER_NAMES, LORA_LAYERS
from model import EXTRA, GPT, GPTConfig
from homegpt.quant import QUANTIZED_SUFFIXES, bitsandbytes, check_kind, quantized_linear

# the four checkpoints OpenAI released, by the short names everyone uses -> their hub repository
HF_MODELS = {
    "gpt2": "openai-community/gpt2",  # 124M: n_layer=12, n_head=12, n_embd=768
    "gpt2-medium": "openai-community/gpt2-medium",  # 350M: n_layer=24, n_head=16, n_embd=1024
    "gpt2-large": "openai-community/gpt2-large",  # 774M: n_layer=36, n_head=20, n_embd=1280
    "gpt2-xl": "openai-community/gpt2-xl",  # 1558M: n_layer=48, n_head=25, n_embd=1600
}
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
        return _download(name_or_path)
    if path.exists():
        raise UserError(f"{path} is a file: give the directory that save_pretrained wrote "
                         f"(holding config.json and model.safetensors or pytorch_model.bin)")
    if HUB_REPO.fullmatch(name_or_path):
        return _read_local(_snapshot(name_or_path))
    raise UserError(f"{name_or_path!r} is neither a GPT-2 model name ({', '.join(HF_MODELS)}), a hub "
                     f"repository (owner/name, e.g. EleutherAI/gpt-j-6b) nor an existing directory: check "
                     f"the spelling, or give the path of a Hugging Face GPT-2 / GPT-J directory written by "
                     f"save_pretrained")


def _download(name):
    try:
        from transformers import GPT2LMHeadModel
    except ImportError as e:
        raise UserError(f"loading {name!r} needs transformers: pip install transformers") from e
    repo = HF_MODELS[name]
    offline = hub_unreachable_reason()
    try:
        # offline, only the local cache is read: it answers at once, where a download would retry
        # for ~30 s before failing
        hf = GPT2LMHeadModel.from_pretrained(repo, local_files_only=offline is not None)
    except OSError as e:  # transformers reports every failed download (DNS, HTTP, no cache) as OSError
        why = (f"the hub is unreachable ({offline}) and it is not in the local Hugging Face cache" if offline
               else f"the download failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        # no option name here: train.py and sample.py take it as --init_from, eval.py also as --models
        raise UserError(
            f"could not load {name!r} ({repo}) from the Hugging Face hub: {why}.\n"
            f"Instead give a local directory: on a machine with access run "
            f"GPT2LMHeadModel.from_pretrained('{repo}').save_pretrained('{name}-hf'), copy the directory "
            f"over and pass its path in place of {name!r} (e.g. ./{name}-hf)") from e
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    return hf.config.to_dict(), sd, f"{name!r} ({repo})"


HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the hub spells repositories


def _snapshot(repo):
    """A hub repository's config.json and weights in the local Hugging Face cache (downloaded when the
    hub answers); its directory. Safetensors are fetched when the repository has them, else the
    pytorch_model*.bin files: never both (GPT-J-6B's float32 .bin alone is 24 GB)."""
    try:
        import huggingface_hub as hub
    except ImportError as e:
        raise UserError(f"loading {repo!r} from the hub needs huggingface_hub: pip install transformers") from e
    offline = hub_unreachable_reason()
    safetensors = ["config.json", "*.safetensors", "model.safetensors.index.json"]
    pickles = ["config.json", "pytorch_model*.bin", "pytorch_model.bin.index.json"]
    try:
        if offline:  # the cache only: whichever format an earlier download left there
            path = Path(hub.snapshot_download(repo, allow_patterns=safetensors + pickles, local_files_only=True))
        else:
            files = hub.list_repo_files(repo)
            has_safetensors = any(f.endswith(".safetensors") for f in files)
            path = Path(hub.snapshot_download(repo, allow_patterns=safetensors if has_safetensors else pickles))
    except (OSError, ValueError) as e:  # huggingface_hub's errors for no cache, 404, auth and network
        why = (f"the hub is unreachable ({offline}) and it is not in the local Hugging Face cache" if offline
               else f"the download failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        raise UserError(f"could not load {repo!r} from the Hugging Face hub: {why}.\nInstead give a local "
                        f"directory: on a machine with access run huggingface_hub.snapshot_download('{repo}', "
                        f"local_dir='{repo.split('/')[-1]}'), copy it over and pass its path") from e
    return path


# ----------------------------------------------------------------------------- is the hub there?

# huggingface_hub's spelling of "true" for its offline switches (constants._is_true)
_TRUE = ("1", "ON", "YES", "TRUE")
# a round trip to the hub takes well under a second; 3 s leaves room for a slow proxy and still
# fails far faster than the ~30 s of retries it replaces
HUB_PROBE_TIMEOUT = 3.0


def hub_unreachable_reason(timeout=HUB_PROBE_TIMEOUT):
    """None when the Hugging Face hub can be asked now, else why not, in a few words.

    HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set to 1 (or on/yes/true) mean offline without asking.
    Otherwise one HEAD request goes to the hub's endpoint (HF_ENDPOINT), through HTTPS_PROXY and
    friends as urllib reads them, and at most `timeout` seconds are waited, DNS included. Only a
    clear "not there" counts as unreachable (no DNS, connection refused, no route, no answer in
    time); any HTTP answer, even 404 or 503, or a TLS error means something is there, and then the
    real download is tried and reports its own error. Callers fall back to the local cache.
    The answer is kept for the process: eval.py asks once per model and benchmark.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return f"{var}={os.environ[var]} is set"
    try:
        from huggingface_hub import constants
        endpoint = constants.ENDPOINT
    except ImportError:  # the callers report the missing library themselves
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return _probe(endpoint.rstrip("/"), float(timeout))


def load_hub_dataset(repo, config=None, split="train", hint="", what=None):
    """One split of a dataset on the hub (datasets.load_dataset), or a UserError naming `what` (default
    the repository) that ends with `hint`, how to go on without the hub. When the hub is unreachable
    only the local datasets cache is read, with no request (and no ~30 s of retries) first."""
    what = what or repo
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"reading {what} needs the datasets library: pip install -e .[hf]\n{hint}") from e
    offline = hub_unreachable_reason()
    try:
        with _datasets_offline(datasets, offline is not None):
            return datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # the hub raises connection, HTTP and file errors of many kinds
        why = (f"the hub is unreachable ({offline}) and the split is not in the local datasets cache" if offline
               else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        where = f"{repo}, {config}" if config else repo
        raise UserError(f"could not load {what} from the Hugging Face hub ({where}, split {split}): {why}\n{hint}") from e


@contextlib.contextmanager
def _datasets_offline(datasets, offline):
    """datasets' offline mode for the duration: read from its cache only. It is a flag read at call
    time, set from HF_HUB_OFFLINE at import."""
    if not offline:
        yield
        return
    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


@functools.lru_cache(maxsize=None)
def _probe(url, timeout):
    import ssl
    import threading
    import urllib.error
    import urllib.request
    answer = []

    def ask():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            answer.append(None)
        except urllib.error.HTTPError:  # an HTTP status, whatever it is, came from a live server
            answer.append(None)
        except urllib.error.URLError as e:
            answer.append(None if isinstance(e.reason, ssl.SSLError) else f"{url}: {e.reason}")
        except ValueError:  # a malformed HF_ENDPOINT: let the library say what it makes of it
            answer.append(None)
        except OSError as e:  # a timeout while reading, a reset connection, a proxy refusing the tunnel
            answer.append(f"{url}: {e or type(e).__name__}")

    # urlopen's timeout does not cover the DNS lookup, which waits out glibc's resolver timeouts
    # (5 s x 2 attempts per nameserver by default) when no resolver answers: a daemon thread bounds
    # the whole probe, and is left to finish on its own
    t = threading.Thread(target=ask, name="hub-probe", daemon=True)
    t.start()
    t.join(timeout)
    return answer[0] if answer else f"{url}: no answer within {timeout:g} s"


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


# ----------------------------------------------------------------------------- export

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


def export_hf(model, hf_dir, tokenizer="gpt2", overwrite=False, drop_lora=False, dtype="float32"):
    """Write `model` (our GPT) as a Hugging Face GPT2LMHeadModel (or GPTJForCausalLM) directory:
    config.json, model.safetensors (in dtype: 'float32', 'float16' or 'bfloat16') and, with
    tokenizer="gpt2", the GPT-2 tokenizer files.

    The directory appears complete or not at all (written beside it, then renamed into place).
    An existing non-empty hf_dir is refused, unless it is an earlier export and overwrite is set
    (check_export_dir). drop_lora: write the frozen base of a model that still has LoRA adapters
    (see hf_state_dict). Returns the directory as a Path.
    """
    from safetensors.torch import save_file
    if tokenizer not in ("gpt2", None):
        raise UserError(f"tokenizer={tokenizer!r}: expected 'gpt2' (GPT-2 BPE) or None (no tokenizer files)")
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"dtype={dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    cfg = model.config
    if tokenizer == "gpt2" and cfg.vocab_size < GPT2_VOCAB:
        raise UserError(f"tokenizer='gpt2' but the model's vocab_size is {cfg.vocab_size} < {GPT2_VOCAB}: "
                         f"it was not trained on GPT-2 BPE; export with tokenizer=None")

    def write(tmp):
        hf_config(cfg, tokenizer).save_pretrained(tmp)  # writes config.json
        # the "format" metadata tells transformers these are PyTorch tensors
        save_file(hf_state_dict(model, drop_lora, getattr(torch, dtype)), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if tokenizer == "gpt2":
            write_gpt2_tokenizer(tmp, model_max_length=cfg.block_size)

    return _write_dir(hf_dir, write, overwrite, "hf_dir")


EXPORT_DTYPES = ("float32", "float16", "bfloat16")  # of the exported weights (float16 halves a 6B model to 12 GB)


# every file export_hf and export_peft_adapter write (transformers adds added_tokens.json and
# generation_config.json in some versions): a directory holding only these, weights among them, is an
# earlier export, the one thing overwrite=True replaces
EXPORT_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors",
    "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "adapter_config.json", "adapter_model.safetensors"})
EXPORT_WEIGHTS = ("model.safetensors", "adapter_model.safetensors")


def check_export_dir(target, option="hf_dir", overwrite=False):
    """Decide, before any slow work, what an export may do with the directory `target`: write it (it
    is absent or empty: returns []), replace an earlier export (with overwrite: returns the names it
    will delete), or refuse in one line saying what is in the way. A run, a folder of runs, a file or
    anything else an export does not write is never replaced, overwrite or not."""
    target = Path(target)
    above = checkpoint_above(target)
    if above is not None:
        raise UserError(f"{option}={target} lies in the checkpoint directory {above}, which only train.py "
                        f"writes: choose another {option}")
    if target.name.startswith(CKPT_PREFIX) and run_signs(target.parent):
        raise UserError(f"{option}={target}: a {CKPT_PREFIX}* directory in the run {target.parent} would be taken "
                        f"for one of its checkpoints (and pruned by its training); choose another {option}")
    check_writable(target, option)
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return []
    if not target.is_dir():
        raise UserError(f"{option}={target} is a file, not an earlier export: choose another {option}")
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir())
    run = run_signs(target)
    foreign = [n for n in names if n not in EXPORT_FILES]  # a folder of runs: its runs' folders
    if run:
        why = f"holds a run ({', '.join(run[:3])})"
    elif foreign:
        why = f"holds what no export writes ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"
    elif not set(EXPORT_WEIGHTS) & set(names):
        why = f"holds no exported weights ({' or '.join(EXPORT_WEIGHTS)})"
    else:
        if not overwrite:
            raise UserError(f"{target} holds an earlier export: choose another {option} or pass --overwrite=True "
                            f"to replace it")
        return names
    raise UserError(f"{option}={target} {why}: an export replaces only an earlier export (with --overwrite=True), "
                    f"so choose another {option}, or an empty or new directory")


def _write_dir(target, write, overwrite, option):
    """Fill a hidden directory beside `target` with write(tmp), fsync it and rename it into place:
    `target` appears complete or not at all, and a failure leaves nothing behind. An existing target
    is replaced whole only when it is an earlier export and overwrite is set (check_export_dir).
    Returns target as a Path."""
    target = Path(target)
    check_export_dir(target, option, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)  # an earlier export: files only (check_export_dir)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written export behind
        raise
    return target


# ----------------------------------------------------------------------------- LoRA adapters for PEFT

# PeftModelForCausalLM wraps the transformers model as .base_model (the LoraModel) .model: the
# prefix of every key in adapter_model.safetensors (peft/utils/save_and_load.py drops the adapter name)
PEFT_PREFIX = "base_model.model."


def peft_adapter(model):
    """(adapter_config dict, tensors) in PEFT's LoRA format for a GPT whose LoRALinear layers are in
    place (weights.load_model(..., merge_lora=False)). Refuses what one LoraConfig cannot say."""
    if architecture(model.config) != "gpt2":
        raise UserError("a PEFT adapter is exported for GPT-2 models only (GPT-J's q, k and v are three layers in "
                        "transformers, one c_attn here): export the merged model instead (drop --adapter_dir)")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LORA_LAYERS)}
    if not layers:
        raise UserError("the model has no LoRA adapters to export: was it trained with --lora_rank > 0, "
                         "and loaded with weights.load_model(path, merge_lora=False)?")
    # one LoraConfig holds one rank, alpha and dropout; apply_lora always gives every layer the same
    settings = {(m.rank, m.alpha, m.lora_dropout.p) for m in layers.values()}
    if len(settings) > 1:
        raise UserError(f"the adapters differ in (rank, alpha, dropout): {sorted(settings)}; PEFT's "
                         f"adapter_config.json holds one setting for all of them")
    rank, alpha, dropout = settings.pop()
    # PEFT adapts a module when its name ends in ".<target>": 'attn.c_proj' (not 'c_proj', which would
    # also catch mlp.c_proj) names exactly the layers we adapted, in every block
    targets = sorted({n.split(".", 3)[3] for n in layers if n.startswith("transformer.h.")})
    expected = {f"transformer.h.{i}.{t}" for i in range(model.config.n_layer) for t in targets}
    if set(layers) != expected:
        odd = sorted(set(layers) ^ expected)
        raise UserError(f"PEFT adapts {targets} in every block, but this model's adapters differ there: "
                         f"{odd[:4]}{' ...' if len(odd) > 4 else ''}")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "lora_dropout": dropout, "target_modules": targets,
        # HF's GPT-2 layers are Conv1D, weight (in, out): PEFT transposes B @ A when it merges. The
        # adapter matrices themselves are nn.Linear-shaped, A (r, in) and B (out, r), as lora.py's
        "fan_in_fan_out": True,
        "bias": "none", "use_rslora": False, "use_dora": False,  # scale alpha / r, plain LoRA, no bias
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": None,
    }
    tensors = {}
    for n, m in layers.items():
        for part in ("lora_A", "lora_B"):
            w = getattr(m, part).detach().to("cpu", torch.float32).contiguous().clone()
            tensors[f"{PEFT_PREFIX}{n}.{part}.weight"] = w
    return config, tensors


def export_peft_adapter(model, adapter_dir, base_model_name_or_path, overwrite=False):
    """Write the LoRA adapters of `model` as a PEFT adapter directory: adapter_config.json and
    adapter_model.safetensors (float32). On the Hugging Face export of the frozen base
    (export_hf(model, hf_dir, drop_lora=True)) it computes what our adapted model does:

        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)

    base_model_name_or_path: recorded in the config, what AutoPeftModelForCausalLM loads the base from.
    Atomic, and replacing only an earlier export with overwrite, as export_hf. Returns the Path.
    """
    from safetensors.torch import save_file
    config, tensors = peft_adapter(model)
    config["base_model_name_or_path"] = None if base_model_name_or_path is None else str(base_model_name_or_path)

    def write(tmp):
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})

    return _write_dir(adapter_dir, write, overwrite, "adapter_dir")


# ----------------------------------------------------------------------------- the GPT-2 tokenizer files

def bytes_to_unicode():
    """GPT-2's byte -> printable character table (vocab.json and merges.txt spell tokens with it).

    Printable Latin-1 bytes stand for themselves; the other 68 (control bytes, space, ...) are moved
    to code points 256, 257, ... in byte order, so that no token contains whitespace or controls.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _bpe_parts(token, rank, ranks):
    """Run byte-level BPE on `token` using only merges ranked below `rank`: the two parts left are the
    merge that created it. (A token often splits several ways into lower-ranked tokens, e.g. ' the' =
    ' t'+'he' = ' th'+'e'; only BPE's own order says which merge the tokenizer actually applies.)"""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best = None  # (rank, position) of the lowest-ranked adjacent pair allowed
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def gpt2_vocab_and_merges(enc=None):
    """(vocab: token string -> id, merges: [(left, right)] in priority order) of GPT-2's BPE, rebuilt
    from tiktoken's ranks (bytes -> id); merge k creates the token of id 256 + k."""
    if enc is None:
        enc = gpt2_encoding()
    ranks = enc._mergeable_ranks  # bytes -> rank (== token id); tiktoken keeps no merges list
    b2u = bytes_to_unicode()

    def spell(b):
        return "".join(b2u[x] for x in b)

    vocab = {spell(tok): r for tok, r in ranks.items()}
    for name, i in enc._special_tokens.items():
        vocab[name] = i
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = _bpe_parts(tok, rank, ranks)
        assert len(parts) == 2, f"token {tok!r} (rank {rank}) is not one merge of lower-ranked tokens: {parts}"
        merges.append((spell(parts[0]), spell(parts[1])))
    assert len(vocab) == enc.n_vocab, f"vocab has {len(vocab)} entries, tiktoken {enc.n_vocab}"
    return vocab, merges


def write_gpt2_tokenizer(out_dir, model_max_length=1024):
    """vocab.json, merges.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json:
    what transformers.AutoTokenizer.from_pretrained(out_dir) needs, offline."""
    out_dir = Path(out_dir)
    vocab, merges = gpt2_vocab_and_merges()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                        encoding="utf-8")
    from transformers import GPT2Tokenizer
    # transformers writes tokenizer.json (the fast tokenizer) and tokenizer_config.json from these;
    # positional paths: transformers 4 names them vocab_file/merges_file, 5 vocab/merges
    tok = GPT2Tokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"),
                        model_max_length=model_max_length, add_prefix_space=False)
    tok.save_pretrained(str(out_dir))
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
