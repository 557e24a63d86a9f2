"""export_gguf.py, checked in llama.cpp itself (llama-cpp-python): it loads the files, tokenizes as
tiktoken does, continues a prompt greedily with the tokens our model picks, and wraps a chat message
as sample.py --chat does.

    python -m pytest -q tests/test_gguf.py

The models are small but trained (a random model's logits are too flat for greedy decoding to test
anything): GPT-2 BPE with a vocabulary padded to 50,304 and a tied head, and a character model with
no biases and an untied head.
"""

import pytest
import torch

from homegpt import sft, weights
import export_gguf
import train
from homegpt.dataloader import Tokenizer, gpt2_encoding
from homegpt.errors import UserError
from helpers import ROOT, char_dataset, tiny_train_config
from homegpt.generate import generate

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python checks the GGUF files (pip install -e '.[dev]')")

pytestmark = pytest.mark.slow
PROMPT = "First Citizen:\n"
HARD = "Ünïcödé 東京 ½ 12345 678  three  spaces\n\n\ttab\r\n it's <|endoftext|> done 🤖"


def bpe_data(path):
    """The first 8,000 characters of Tiny Shakespeare in GPT-2 BPE (data/shakespeare/prepare.py): 2,025
    tokens, few enough for a small model to learn them by heart, so its greedy choices are clear ones."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("shakespeare_prepare", ROOT / "data" / "shakespeare" / "prepare.py")
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    path.mkdir(parents=True)
    text = path / "input.txt"
    text.write_text((ROOT / "data" / "shakespeare_char" / "input.txt").read_text(encoding="utf-8")[:8_000])
    prep.main(prep.PrepareConfig(out_dir=str(path), input=str(text)))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two small trained runs: GPT-2 BPE (a tied head, no biases, 50,304 rows) and characters (an untied
    head, biases). About 80 s on a 2-core CPU, most of it the BPE model's 50,304-wide logits."""
    base = tmp_path_factory.mktemp("gguf")
    common = dict(n_layer=2, n_head=4, n_embd=64, eval_iters=2, warmup_iters=10, log_interval=100)
    bpe, char = base / "bpe", base / "char"
    train.main(tiny_train_config(bpe_data(base / "bpe-data"), bpe, block_size=80, batch_size=4, max_iters=500,
                                 lr_decay_iters=500, eval_interval=500, learning_rate=3e-3, min_lr=3e-4,
                                 vocab_size=50304, bias=False, **common))
    train.main(tiny_train_config(char_dataset(base / "char-data", 60_000), char, block_size=128, batch_size=8,
                                 max_iters=300, lr_decay_iters=300, eval_interval=300, learning_rate=3e-3,
                                 min_lr=3e-4, tie_weights=False, **common))
    return {"bpe": bpe, "char": char, "base": base}


def export(run, path, dtype):
    return export_gguf.main(export_gguf.GGUFConfig(out_dir=str(run), gguf=str(path), dtype=dtype))


def ours_greedy(run, prompt_ids, n):
    """The tokens sample.py picks at --temperature=0 (homegpt.generate's greedy decoding)."""
    model, _ = weights.load_model(run)
    idx = torch.tensor([prompt_ids])
    return generate(model, idx, n, temperature=0)[0, len(prompt_ids):].tolist()


def llama_greedy(path, prompt_ids, n):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt_ids) + n, n_threads=2, verbose=False)
    out = []
    for tok in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(tok)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("kind", ["bpe", "char"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_continues_a_prompt_with_our_greedy_tokens(runs, tmp_path, kind, dtype):
    path = export(runs[kind], tmp_path / f"{kind}.gguf", dtype)
    _, info = weights.load_model(runs[kind])
    prompt = Tokenizer(info["data_meta"]).encode(PROMPT)
    ours = ours_greedy(runs[kind], prompt, 64)
    assert llama_greedy(path, prompt, 64) == ours
    assert len(set(ours)) >= 4  # a continuation, not one token repeated: a real test of the weights


def test_q8_0_logits_stay_within_a_stated_tolerance_of_ours(runs, tmp_path):
    """8-bit blocks round every weight: read through llama.cpp, teacher-forced on our greedy continuation
    of 64 tokens, q8_0's logits stay within 0.5 of ours (measured: 0.20 at most, on logits spanning
    -18.6 .. 14.4) and pick our top token at 95% of the positions at least (measured: 98.5%)."""
    path = export(runs["bpe"], tmp_path / "q8.gguf", "q8_0")
    model, _ = weights.load_model(runs["bpe"])
    prompt = gpt2_encoding().encode_ordinary(PROMPT)
    seq = prompt + ours_greedy(runs["bpe"], prompt, 64)
    with torch.no_grad():
        ours = model(torch.tensor([seq]), targets=torch.full((1, len(seq)), -1))[0][0]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(seq), logits_all=True, verbose=False)
    llm.eval(seq)
    theirs = torch.tensor(llm.scores[:len(seq)])
    real = slice(0, 50257)  # (the padding rows are never trained: compare the vocabulary's)
    assert (theirs[:, real] - ours[:, real]).abs().max() < 0.5
    assert (theirs[:, real].argmax(-1) == ours[:, real].argmax(-1)).float().mean() >= 0.95
    import gguf
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType.Q8_0  # the matrices; norms stay f32
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert path.stat().st_size < export(runs["bpe"], tmp_path / "f16.gguf", "f16").stat().st_size


def test_llama_cpp_tokenizes_hard_text_as_tiktoken_does(runs, tmp_path):
    path = export(runs["bpe"], tmp_path / "bpe.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    theirs = llm.tokenize(HARD.encode("utf-8"), add_bos=False, special=True)
    assert theirs == gpt2_encoding().encode(HARD, allowed_special={"<|endoftext|>"})
    assert llm.token_eos() == llm.token_bos() == 50256 and llm.n_vocab() == 50304


def test_a_character_model_tokenizes_as_its_vocabulary_does(runs, tmp_path):
    path = export(runs["char"], tmp_path / "char.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    _, info = weights.load_model(runs["char"])
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak."
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == Tokenizer(info["data_meta"]).encode(text)
    # its own end-of-text token (not character 11, llama.cpp's default), after the characters, never chosen
    n_chars = len(info["data_meta"]["itos"])
    assert llm.token_eos() == n_chars and llm.n_vocab() == n_chars + 1
    model, _ = weights.load_model(runs["char"])
    # a float32 KV cache (llama.cpp's default is float16), so that what is left is llama.cpp's CPU GELU, which
    # reads a float16 table: 5.9e-4 at most at these logits (|logit| < 8) on a Xeon, where the float16 cache
    # made it 1.2e-3; a wrong weight or layout is off by whole units
    full = llama_cpp.Llama(model_path=str(path), n_ctx=32, logits_all=True, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    ids = Tokenizer(info["data_meta"]).encode(text[:30])
    full.eval(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]), targets=torch.full((1, len(ids)), -1))[0][0]
    theirs = torch.tensor(full.scores[:len(ids)])
    assert torch.allclose(theirs[:, :n_chars], ours, atol=2e-3)  # the characters' logits are the model's own
    assert (theirs[:, n_chars] - export_gguf.END_OF_TEXT_LOGIT).abs().max() < 1e-2


def test_an_instruction_tuned_run_chats_with_its_own_template(runs, tmp_path):
    """tokenizer.chat_template wraps a message into the very bytes sample.py --chat encodes."""
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "prompt_template": sft.prompt_templates(None)}
    model, _ = weights.load_model(runs["bpe"])
    path = tmp_path / "chat.gguf"
    export_gguf.write_gguf(model, meta, path, "f16")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(template, eos_token="<|endoftext|>", bos_token="")
    instruction = 'Name three primary colours, "quoted" and \\ escaped.'
    wrapped = formatter(messages=[{"role": "user", "content": instruction}]).prompt
    assert wrapped == meta["prompt_template"]["no_input"].format(instruction=instruction, input="")  # sample.py --chat
    two = formatter(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": "c"}]).prompt
    assert two == (meta["prompt_template"]["no_input"].format(instruction="a", input="") + "b<|endoftext|>"
                   + meta["prompt_template"]["no_input"].format(instruction="c", input=""))


def test_an_imported_gpt2_computes_in_llama_cpp_what_it_computes_here(tmp_path):
    """A Hugging Face GPT-2 directory (random weights of GPT-2's layout, as transformers saves OpenAI's)
    through --init_from: the next-token logits of a prompt agree."""
    transformers = pytest.importorskip("transformers")
    hf_dir = tmp_path / "hf"
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(hf_dir)
    path = export_gguf.main(export_gguf.GGUFConfig(init_from=str(hf_dir), gguf=str(tmp_path / "gpt2.gguf"),
                                                   dtype="f32"))
    model, _, _ = weights.load_any(str(hf_dir))
    prompt = gpt2_encoding().encode_ordinary(PROMPT)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0][0, -1]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, logits_all=True, verbose=False)
    llm.eval(prompt)
    theirs = torch.tensor(llm.scores[len(prompt) - 1])
    assert torch.allclose(theirs, ours, atol=1e-3), (theirs - ours).abs().max()


def test_what_cannot_be_exported_is_refused_in_one_line_and_nothing_is_written(runs, tmp_path):
    target = tmp_path / "x.gguf"
    target.write_text("keep me")
    with pytest.raises(UserError, match="already exists"):
        export(runs["bpe"], target, "f16")
    with pytest.raises(UserError, match="not a GGUF file"):  # --overwrite replaces a GGUF file only
        export_gguf.main(export_gguf.GGUFConfig(out_dir=str(runs["bpe"]), gguf=str(target), overwrite=True))
    assert target.read_text() == "keep me"
    target.unlink()
    export(runs["bpe"], target, "f16")
    export_gguf.main(export_gguf.GGUFConfig(out_dir=str(runs["bpe"]), gguf=str(target), overwrite=True))
    assert target.read_bytes()[:4] == b"GGUF"
    for cfg, message in [(dict(dtype="q4"), "dtype must be one of"), (dict(gguf=str(tmp_path / "m.bin")), "end the name"),
                         (dict(init_from="gpt2"), "one of --out_dir")]:
        with pytest.raises(UserError, match=message):
            export_gguf.main(export_gguf.GGUFConfig(**{"out_dir": str(runs["bpe"]), **cfg}))
    rotary = runs["base"] / "rotary"
    train.main(tiny_train_config(char_dataset(runs["base"] / "rot-data", 20_000), rotary, max_iters=2,
                                 eval_interval=2, rotary_dim=8))
    with pytest.raises(UserError, match="llama.cpp's gptj"):
        export(rotary, tmp_path / "rotary.gguf", "f16")
    odd = {"tokenizer": "char", "itos": ["a", "é"]}
    with pytest.raises(UserError, match="several bytes"):
        export_gguf.exportable(weights.load_model(runs["char"])[0].config, odd)
    exact = weights.load_model(runs["char"])[0].config
    exact.activation = "gelu"  # nanoGPT's exact GELU
    with pytest.raises(UserError, match="tanh GELU"):
        export_gguf.exportable(exact, {"tokenizer": "gpt2"})
    no_bias = runs["base"] / "no-bias"
    train.main(tiny_train_config(char_dataset(runs["base"] / "nb-data", 20_000), no_bias, max_iters=2,
                                 eval_interval=2, bias=False))
    with pytest.raises(UserError, match="bias=False cannot carry one"):
        export(no_bias, tmp_path / "no-bias.gguf", "f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]  # no other file, no temporary left
