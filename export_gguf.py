"""
Export a run (or OpenAI's GPT-2, or a Hugging Face GPT-2 directory) as one GGUF file, for llama.cpp,
Ollama and LM Studio.

    python export_gguf.py --out_dir=out-shakespeare --gguf=shakespeare.gguf --dtype=f16
    python export_gguf.py --init_from=gpt2 --gguf=gpt2-124m.gguf --dtype=q8_0
    ollama create shakespeare -f Modelfile     # Modelfile: FROM ./shakespeare.gguf

The file is written with `gguf`, the writer llama.cpp publishes, for llama.cpp's `gpt2` architecture:
the hyperparameters, the weights under llama.cpp's tensor names (our nn.Linear layout, out x in, is
the one its loader expects), and the tokenizer. GPT-2 BPE goes in as GPT-2's own vocabulary and merges
(rebuilt from tiktoken's ranks), <|endoftext|> as BOS and EOS, and the rows a vocabulary was padded
with (50,257 -> 50,304) as unused tokens, so the logits are the model's own. A character-level
vocabulary goes in as a BPE vocabulary of single characters with no merges, plus an end-of-text token
whose logit is -100 whatever the input (llama.cpp needs one; see end_of_text_row). An instruction-tuned run
carries its prompt template as tokenizer.chat_template, so chat in those tools wraps a message
exactly as training did (and as `sample.py --chat` does).

--dtype: f32, f16 (the matrices; LayerNorms and biases stay f32, as llama.cpp's converter keeps
them) or q8_0 (8-bit blocks of 32 with a scale each, quantised by `gguf` itself). LoRA is merged and
a quantised base dequantised first. What llama.cpp's gpt2 architecture does not compute is refused
in one line, before anything is written: the options export_hf.py refuses, rotary positions and
GPT-J's parallel block, the exact GELU (llama.cpp's gpt2 computes the tanh form), a character vocabulary with characters outside ASCII, and a character model
without biases (its end-of-text token needs the final LayerNorm's). The file appears
whole or not at all, and an existing one is replaced only with --overwrite=True, and only when it is a
GGUF file; the target is checked (writable, not inside a run's checkpoint) before the model loads.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from homegpt import weights
from configurator import run
from homegpt.errors import UserError
from homegpt.fileio import check_file_target, fsync_dir
from homegpt.export import bytes_to_unicode, gpt2_vocab_and_merges
from homegpt.hf import EOT, EOT_ID, architecture

DTYPES = ("f32", "f16", "q8_0")
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file: what --overwrite may replace


@dataclass
class GGUFConfig:
    out_dir: str = ""  # one of our runs (or one ckpt-NNNNNNN directory) to export
    init_from: str = ""  # instead of out_dir: a GPT-2 name ('gpt2' ... 'gpt2-xl') or a Hugging Face GPT-2 directory
    which: str = "best"  # the run's 'best' checkpoint (its latest when it never evaluated) or 'latest'
    base_dir: str = ""  # a LoRA / 1-D run whose base run moved: where it is now (it must hold the checkpoint trained on)
    gguf: str = ""  # the file to write; '' = <out_dir or model name>.gguf
    dtype: str = "f16"  # the matrices' type: 'f32', 'f16' or 'q8_0'
    overwrite: bool = False  # replace an existing GGUF file (never another kind of file)


def target_path(cfg):
    """The file to write, checked before anything loads: a mistake costs nothing."""
    if bool(cfg.out_dir) == bool(cfg.init_from):
        raise UserError("name the model to export with one of --out_dir=<one of our runs> or --init_from=<gpt2 name or "
                        "Hugging Face directory>")
    if cfg.dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.which not in ("best", "latest"):
        raise UserError(f"which must be 'best' or 'latest', got {cfg.which!r}")
    path = Path(cfg.gguf or f"{Path(cfg.out_dir or cfg.init_from).name}.gguf")
    if path.suffix != ".gguf":
        raise UserError(f"gguf={str(path)!r}: llama.cpp, Ollama and LM Studio look for a .gguf file; end the name in .gguf")
    # a directory, a run's files, a place it cannot write, and an existing file unless --overwrite and GGUF
    check_file_target(path, "--gguf", GGUF_MAGIC, "GGUF file", cfg.overwrite)
    return path


def exportable(config, data_meta):
    """Refuse, in one line, what llama.cpp's gpt2 architecture would not compute as our model does."""
    if config.rotary_dim or config.parallel_residual or config.lm_head_bias:
        raise UserError("rotary positions, a parallel block or an lm_head bias (GPT-J's layout) are llama.cpp's gptj "
                        "architecture, which this exporter does not write: export GPT-2-shaped models (learned "
                        "positions, sequential blocks), or use export_hf.py for transformers")
    architecture(config)  # the options no transformers class computes, refused as export_hf.py refuses them
    if config.activation != "gelu_tanh":
        raise UserError(f"activation={config.activation!r}: llama.cpp's gpt2 computes GPT-2's tanh GELU, not the exact "
                        f"one this model trained with (nanoGPT's), so it would not compute this model: export it to "
                        f"Hugging Face instead (python export_hf.py), whose GPT-2 has the exact GELU")
    kind = (data_meta or {}).get("tokenizer", "gpt2")
    if kind == "char":
        odd = [c for c in data_meta["itos"] if len(c.encode("utf-8")) != 1]
        if odd:
            raise UserError(f"llama.cpp's BPE tokenizer reads text as bytes, and this character vocabulary has "
                            f"characters of several bytes ({''.join(odd[:10])!r}), which would need merges it "
                            f"does not have: export a model whose characters are ASCII")
    elif kind != "gpt2":
        raise UserError(f"tokenizer {kind!r}: GGUF export knows GPT-2 BPE and character vocabularies")


def vocabulary(data_meta, vocab_size):
    """(tokens, token types, merges, end-of-text id) in llama.cpp's `gpt2` tokenizer format, padded with
    unused tokens up to the model's vocab_size (its embedding's rows). A character vocabulary gets an
    end-of-text token of its own after those rows (end_of_text_row): without one, llama.cpp takes token
    11 for it, a character, and would end every generation at that character."""
    import gguf  # (lazy, like transformers in hf.py: the rest of homegpt runs without it)
    normal, control, unused = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, gguf.TokenType.UNUSED
    char = (data_meta or {}).get("tokenizer", "gpt2") == "char"
    if char:
        b2u = bytes_to_unicode()
        tokens = ["".join(b2u[b] for b in c.encode("utf-8")) for c in data_meta["itos"]]
        types = [normal] * len(tokens)
        # llama.cpp's gpt2 tokenizer will not load without merges: one that can never apply (two NUL bytes,
        # which no character vocabulary of ASCII text meets) keeps every character its own token
        merges = [f"{b2u[0]} {b2u[0]}"]
    else:
        vocab, pairs = gpt2_vocab_and_merges()
        tokens = sorted(vocab, key=vocab.get)
        types = [control if t == EOT else normal for t in tokens]
        merges = [f"{a} {b}" for a, b in pairs]
    if len(tokens) > vocab_size:
        raise UserError(f"the tokenizer has {len(tokens)} tokens, more than the model's {vocab_size} rows")
    pad = range(len(tokens), vocab_size)
    tokens, types = tokens + [f"[PAD{i}]" for i in pad], types + [unused] * len(pad)
    if char:
        return tokens + [EOT], types + [control], merges, vocab_size
    return tokens, types, merges, EOT_ID


def chat_template(data_meta):
    """The run's prompt template as a Jinja chat template (None for a run not tuned on instructions):
    each user message wrapped as sample.py --chat wraps one, each answer followed by <|endoftext|>, as
    training's completions were."""
    recorded = (data_meta or {}).get("prompt_template")
    if not recorded:
        return None
    mark = "\x00"
    before, after = recorded["no_input"].format(instruction=mark, input="").split(mark)
    quote = lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'  # noqa: E731
    return ("{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}" + f"{{{{ {quote(before)} + message['content'] + {quote(after)} }}}}"
            "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}{%- endif -%}"
            "{%- endfor -%}")


END_OF_TEXT_LOGIT = -100.0  # a character model's end-of-text token: e^-100 next to any real logit


def end_of_text_row(model):
    """The output row of the end-of-text token a character model gets: -c / gain, whose logit is
    -c * sum(bias / gain) whatever the input, since the final LayerNorm's normalised output sums to 0;
    c makes that END_OF_TEXT_LOGIT. It needs the LayerNorm's bias (bias=True)."""
    ln = model.transformer.ln_f
    gain = ln.weight.detach().double()
    s = float((ln.bias.detach().double() / gain).sum()) if ln.bias is not None else 0.0
    row = (END_OF_TEXT_LOGIT / s) / gain if s else None
    if row is None or not torch.isfinite(row).all() or row.abs().max() > 6e4:  # (f16's range)
        raise UserError("a character model gets an end-of-text token for llama.cpp whose logit stays far below every "
                        "character's, which takes the final LayerNorm's bias: a model trained with bias=False cannot "
                        "carry one (llama.cpp would end generations at character 11); train with bias=True to export")
    return row.float()


def tensors(model, extra_row=None):
    """(GGUF name, float32 array) of every weight, in llama.cpp's gpt2 names; a bias the model lacks
    (bias=False) is written as zeros, which computes the same. extra_row: one more row for the token
    embedding and the output (a character model's end-of-text token)."""
    import gguf
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if extra_row is not None:
        for key in {"transformer.wte.weight", "lm_head.weight"}:
            sd[key] = torch.cat([sd[key], extra_row[None]])
    cfg = model.config
    name = lambda t, i=None: gguf.TENSOR_NAMES[t].format(bid=i) if i is not None else gguf.TENSOR_NAMES[t]  # noqa: E731
    T = gguf.MODEL_TENSOR
    ours = {"transformer.wte": name(T.TOKEN_EMBD), "transformer.wpe": name(T.POS_EMBD),
            "transformer.ln_f": name(T.OUTPUT_NORM)}
    for i in range(cfg.n_layer):
        ours.update({f"transformer.h.{i}.ln_1": name(T.ATTN_NORM, i), f"transformer.h.{i}.attn.c_attn": name(T.ATTN_QKV, i),
                     f"transformer.h.{i}.attn.c_proj": name(T.ATTN_OUT, i), f"transformer.h.{i}.ln_2": name(T.FFN_NORM, i),
                     f"transformer.h.{i}.mlp.c_fc": name(T.FFN_UP, i), f"transformer.h.{i}.mlp.c_proj": name(T.FFN_DOWN, i)})
    if not cfg.tie_weights:  # tied: llama.cpp reads the output matrix from token_embd
        ours["lm_head"] = name(T.OUTPUT)
    for module, gguf_name in ours.items():
        weight = sd[f"{module}.weight"]
        yield f"{gguf_name}.weight", weight.numpy()
        if module.startswith(("transformer.h.", "transformer.ln_f")):  # every LayerNorm and Linear of gpt2 has a bias
            bias = sd.get(f"{module}.bias", torch.zeros(weight.size(0)))
            yield f"{gguf_name}.bias", bias.numpy()


def write_gguf(model, data_meta, path, dtype):
    """Write model to path as GGUF (architecture gpt2): through a temporary file beside it, fsynced and
    renamed, so the file appears whole or not at all. Returns its size in bytes."""
    import gguf
    cfg = model.config
    tokens, types, merges, eot = vocabulary(data_meta, cfg.vocab_size)
    extra_row = end_of_text_row(model) if len(tokens) > cfg.vocab_size else None
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    try:
        w = gguf.GGUFWriter(str(tmp), "gpt2")
        w.add_name(path.stem)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(1e-5)  # nn.LayerNorm's
        w.add_file_type(file_type)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(eot)
        w.add_eos_token_id(eot)
        w.add_add_bos_token(False)  # GPT-2 was trained without one
        template = chat_template(data_meta)
        if template:
            w.add_chat_template(template)
        for name, array in tensors(model, extra_row):
            data, raw_dtype = _stored(array, dtype, gguf)
            w.add_tensor(name, data, raw_dtype=raw_dtype)  # (a quantised one as its bytes, with its type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=sys.stderr.isatty())  # a bar on a terminal, nothing in a log
        w.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent if str(path.parent) else ".")
    except BaseException:
        tmp.unlink(missing_ok=True)  # never a half-written file
        raise
    return path.stat().st_size


def _stored(array, dtype, gguf):
    """(data, raw_dtype) of one tensor: matrices in dtype, 1-D tensors (norms, biases) in f32."""
    if array.ndim == 1 or dtype == "f32":
        return np.ascontiguousarray(array, dtype=np.float32), None
    if dtype == "f16":
        return np.ascontiguousarray(array, dtype=np.float16), None
    q8 = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), q8), q8


def main(cfg):
    path = target_path(cfg)
    if cfg.out_dir:  # LoRA merged, a quantised base dequantised: a plain float GPT
        model, info = weights.load_model(cfg.out_dir, which=cfg.which, base_dir=cfg.base_dir)
        data_meta = info.get("data_meta") or {"tokenizer": "gpt2"}
    else:
        model, data_meta, _ = weights.load_any(cfg.init_from, base_dir=cfg.base_dir)
    exportable(model.config, data_meta)
    size = write_gguf(model, data_meta, path, cfg.dtype)
    print(f"wrote {path} ({size / 2**20:,.1f} MiB, {cfg.dtype}); run it with llama.cpp (llama-cli -m {path}), or in "
          f"Ollama with a Modelfile holding 'FROM ./{path.name}'")
    return path


if __name__ == "__main__":
    run(main, GGUFConfig)
