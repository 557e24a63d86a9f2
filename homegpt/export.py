"""
Writing our GPT for Hugging Face: a transformers directory (export_hf), a PEFT LoRA adapter
(export_peft_adapter) and the GPT-2 tokenizer files, each appearing complete or not at all.

    from homegpt.export import export_hf
    from homegpt.hf import from_pretrained
    export_hf(from_pretrained("gpt2"), "hf-gpt2", tokenizer="gpt2")   # transformers.AutoModelForCausalLM loads it
    python export_hf.py --out_dir=out-shakespeare --hf_dir=hf-shakespeare   # the same from a checkpoint
    python export_hf.py --out_dir=out-instruct-lora --hf_dir=hf-base --adapter_dir=hf-adapter  # LoRA for PEFT

The weights go out under HF's names through hf.py's mapping (hf_state_dict, hf_config). An export
never replaces a run: check_export_dir decides, before any slow work, whether the target is new,
empty, or an earlier export that --overwrite may replace.

A LoRA run can also leave its adapter unmerged, as a PEFT adapter directory (export_peft_adapter):
PEFT stores A (r, in) and B (out, r) as lora.py does, keyed by the adapted module's HF name.

The tokenizer: offline there is nothing to download, so vocab.json and merges.txt are rebuilt from
tiktoken's GPT-2 ranks (the same 50,257 ids); see gpt2_vocab_and_merges. export_gguf.py spells its
vocabulary with the same table. transformers and safetensors are imported lazily.
"""

import json
import os
import shutil
from pathlib import Path

import torch

from homegpt.dataloader import gpt2_encoding
from homegpt.errors import UserError
from homegpt.fileio import CKPT_PREFIX, check_writable, checkpoint_above, fsync_dir, run_signs
from homegpt.hf import EOT, GPT2_VOCAB, architecture, hf_config, hf_state_dict
from homegpt.lora import LORA_LAYERS


# ----------------------------------------------------------------------------- a transformers directory

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
