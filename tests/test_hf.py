"""Hugging Face GPT-2 import/export: exact logits both ways, every key accounted for, clear errors.

    python -m pytest -q tests/test_hf.py

No network: the "pretrained" GPT-2 is a small random transformers model saved to tmp_path.
"""

import json
import logging
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from homegpt import export, hf, hub  # noqa: E402
from helpers import all_logits  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from homegpt.generate import generate

VOCAB = 97


@torch.no_grad()
def _perturb(module, seed):
    """Random non-trivial biases and LayerNorm gains: with the init's zeros/ones a dropped or
    misplaced bias or gain would go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() == 1:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def make_hf_gpt2(tie=True, seed=0, vocab_size=VOCAB):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=vocab_size,
                     tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(cfg).eval()
    _perturb(model, seed)
    return model


def save_openai_style_bin(model, path):
    """pytorch_model.bin as OpenAI's hub files have it: no "transformer." prefix, the causal-mask
    buffers attn.bias / attn.masked_bias included, no lm_head (GPT2Model's state dict)."""
    path.mkdir()
    model.config.save_pretrained(path)
    sd = {k.removeprefix("transformer."): v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    n = model.config.n_positions
    for i in range(model.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, path / "pytorch_model.bin")


@pytest.fixture
def hf_dir(tmp_path):
    d = tmp_path / "hf-tiny"
    make_hf_gpt2().save_pretrained(d)
    return d


# ----------------------------------------------------------------------------- import

@pytest.mark.parametrize("fmt", ["safetensors", "openai_bin", "untied"])
def test_import_gives_transformers_logits_and_generations(tmp_path, fmt):
    ref = make_hf_gpt2(tie=(fmt != "untied"))
    d = tmp_path / "hf"
    if fmt == "openai_bin":
        save_openai_style_bin(ref, d)
    else:
        ref.save_pretrained(d)
    model = hf.from_pretrained(str(d)).eval()
    assert model.config.tie_weights == (fmt != "untied")
    assert (model.config.block_size, model.config.vocab_size, model.config.n_layer) == (16, VOCAB, 2)
    idx = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = all_logits(model, idx)
        theirs = ref(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    prompt = idx[:, :5]
    greedy = generate(model, prompt, max_new_tokens=11, temperature=0)
    expected = ref.generate(prompt, max_new_tokens=11, do_sample=False, pad_token_id=0,
                            attention_mask=torch.ones_like(prompt))
    assert torch.equal(greedy, expected)


@pytest.fixture
def hub_online(monkeypatch):
    """The hub probe answers "reachable" without asking anything (tests never touch the network)."""
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: None)


@pytest.fixture
def hub_offline(monkeypatch):
    reason = "https://huggingface.co: [Errno -2] Name or service not known"
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: reason)
    return reason


def test_hub_names_download_through_transformers(monkeypatch, hub_online):
    # the hub is unreachable here: stand in for it with a random model, to check what the download
    # path does with a live GPT2LMHeadModel (prefixed names, the tied lm_head in its state dict)
    ref = make_hf_gpt2()
    asked = []
    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained",
                        lambda name, **kw: asked.append((name, kw.get("local_files_only"))) or ref)
    model = hf.from_pretrained("gpt2-large").eval()
    assert asked == [("openai-community/gpt2-large", False)]  # online: a real download, with its retries
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (all_logits(model, idx) - ref(idx).logits).abs().max().item() < 1e-5


def test_block_size_crop_and_dropout_override(hf_dir):
    full = hf.from_pretrained(str(hf_dir)).eval()
    cropped = hf.from_pretrained(str(hf_dir), {"block_size": 8, "dropout": 0.25})
    assert cropped.config.block_size == 8 and cropped.transformer.wpe.weight.shape == (8, 32)
    assert cropped.config.dropout == 0.25
    assert cropped.transformer.drop.p == 0.25 and cropped.transformer.h[0].attn.dropout == 0.25
    assert full.config.dropout == 0.0
    idx = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # a crop keeps the first positions' embeddings: the same logits for a short enough input
        assert torch.allclose(all_logits(cropped.eval(), idx), all_logits(full, idx), atol=1e-6)
    with pytest.raises(ValueError, match="cropped down"):
        hf.from_pretrained(str(hf_dir), {"block_size": 32})
    with pytest.raises(ValueError, match="n_layer"):
        hf.from_pretrained(str(hf_dir), {"n_layer": 4})


def test_unknown_name_and_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="gpt2-xl") as e:
        hf.from_pretrained("gpt3")
    assert "'gpt3'" in str(e.value)
    missing = tmp_path / "no-such-dir"
    with pytest.raises(ValueError, match="no-such-dir"):
        hf.from_pretrained(str(missing))


def test_failed_download_says_to_use_a_local_directory(monkeypatch, hub_online):
    def failed(*args, **kwargs):
        raise OSError("503 Server Error: Service Unavailable for url: https://huggingface.co/...")
    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", failed)
    with pytest.raises(ValueError) as e:
        hf.from_pretrained("gpt2-medium")
    msg = str(e.value)
    assert "download failed (503 Server Error" in msg and "openai-community/gpt2-medium" in msg
    assert "save_pretrained('gpt2-medium-hf')" in msg and "in place of 'gpt2-medium'" in msg


# ----------------------------------------------------------------------------- offline

def test_unreachable_hub_reads_only_the_cache_then_says_what_to_do(monkeypatch, hub_offline):
    # offline, the retrying download (~30 s of "Retrying in 8s") must not run: only the cache is read
    calls = []

    def from_pretrained(name, **kw):
        calls.append((name, kw.get("local_files_only")))
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't "
                      "find them in the cached files.")
    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", from_pretrained)
    with pytest.raises(ValueError) as e:
        hf.from_pretrained("gpt2-medium")
    assert calls == [("openai-community/gpt2-medium", True)]
    msg = str(e.value)
    assert f"unreachable ({hub_offline})" in msg and "not in the local Hugging Face cache" in msg
    assert "save_pretrained('gpt2-medium-hf')" in msg and "(e.g. ./gpt2-medium-hf)" in msg
    # the library does not know which option took the name: that is for the script to say (eval.py: --models)
    assert "--init_from" not in msg


def _hf_cache(root, repo, model):
    """The layout huggingface_hub's cache has after a download: refs/main -> snapshots/<commit>/."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    d = root / f"models--{repo.replace('/', '--')}"
    model.save_pretrained(d / "snapshots" / commit)
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(commit)


def test_warm_cache_loads_offline_without_a_connection(tmp_path, monkeypatch, hub_offline):
    import socket
    from huggingface_hub import constants

    ref = make_hf_gpt2(seed=4)
    _hf_cache(tmp_path, "openai-community/gpt2", ref)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("offline loading tried to connect")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    model = hf.from_pretrained("gpt2").eval()
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (all_logits(model, idx) - ref(idx).logits).abs().max().item() < 1e-5


def test_malformed_directories_name_the_path_and_the_problem(hf_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        hf.from_pretrained(str(empty))

    (empty / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        hf.from_pretrained(str(empty))

    (empty / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="has no weights"):
        hf.from_pretrained(str(empty))

    weights = (hf_dir / "model.safetensors").read_bytes()
    (empty / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # a truncated copy
    with pytest.raises(ValueError, match="model.safetensors.*damaged or truncated"):
        hf.from_pretrained(str(empty))

    with pytest.raises(ValueError, match="is a file"):
        hf.from_pretrained(str(hf_dir / "config.json"))


def test_missing_leftover_or_misshapen_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    ref = make_hf_gpt2()
    d = tmp_path / "hf"
    ref.save_pretrained(d)
    sd = load_file(str(d / "model.safetensors"))

    save_file({k: v for k, v in sd.items() if k != "transformer.h.1.mlp.c_fc.bias"}, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['h.1.mlp.c_fc.bias'\]"):
        hf.from_pretrained(str(d))

    save_file({**sd, "transformer.h.2.ln_1.weight": torch.ones(32)}, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected \['h.2.ln_1.weight'\]"):
        hf.from_pretrained(str(d))

    bad = dict(sd)
    bad["transformer.h.0.attn.c_attn.weight"] = bad["transformer.h.0.attn.c_attn.weight"].t().contiguous()
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"h.0.attn.c_attn.weight has shape \(96, 32\)"):
        hf.from_pretrained(str(d))


@pytest.mark.parametrize("change,match", [
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
    ({"n_inner": 64}, "n_inner 64"),
    ({"model_type": "gpt_neo"}, "model_type"),
])
def test_configs_model_py_cannot_reproduce_are_refused(hf_dir, change, match):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(change)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        hf.from_pretrained(str(hf_dir))


@pytest.mark.parametrize("act,ours", [("gelu_pytorch_tanh", "gelu_tanh"), ("gelu", "gelu")])
def test_other_gelus_import_exactly(tmp_path, act, ours):
    # gelu_pytorch_tanh is GPT-2's tanh GELU computed by torch; "gelu" is the exact one (nanoGPT's)
    ref = make_hf_gpt2()
    ref.config.activation_function = act
    ref = GPT2LMHeadModel(ref.config).eval()
    _perturb(ref, 0)
    ref.save_pretrained(tmp_path / "hf")
    model = hf.from_pretrained(str(tmp_path / "hf")).eval()
    assert model.config.activation == ours
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (all_logits(model, idx) - ref(idx).logits).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------- export

def _our_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=VOCAB, dropout=0.0)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg)).eval()
    _perturb(model, seed)
    return model


@pytest.mark.parametrize("kw", [
    dict(),  # GPT-2's shape: biases, tied head
    dict(tie_weights=False),
    dict(bias=False),
    dict(bias=False, tie_weights=False),
    dict(bias=True, qkv_bias=False),
    dict(bias=False, qkv_bias=True),
    dict(activation="gelu"),
], ids=["gpt2", "untied", "nobias", "nobias-untied", "no-qkv-bias", "qkv-bias-only", "exact-gelu"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, kw, caplog):
    model = _our_model(**kw)
    out = export.export_hf(model, tmp_path / "export", tokenizer=None)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with caplog.at_level(logging.WARNING):
        loaded, info = GPT2LMHeadModel.from_pretrained(str(out), output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert not [r for r in caplog.records if "were not" in r.getMessage() or "newly initialized" in r.getMessage()]
    assert loaded.config.tie_word_embeddings == model.config.tie_weights
    if not model.config.tie_weights:
        assert not torch.equal(loaded.lm_head.weight, loaded.transformer.wte.weight)
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (loaded.eval()(idx).logits - all_logits(model, idx)).abs().max().item()
    assert diff < 1e-5
    # and back: the exported directory imports to the same function
    back = hf.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert (all_logits(back, idx) - all_logits(model, idx)).abs().max().item() < 1e-5


def test_export_replaces_only_an_earlier_export_and_only_with_overwrite(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # what an export did not write is never replaced
        with pytest.raises(ValueError, match="notes.txt"):
            export.export_hf(_our_model(), target, tokenizer=None, overwrite=overwrite)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    (target / "notes.txt").unlink()
    export.export_hf(_our_model(), target, tokenizer=None)  # an empty directory is written
    with pytest.raises(ValueError, match="--overwrite=True"):
        export.export_hf(_our_model(), target, tokenizer=None)
    export.export_hf(_our_model(), target, tokenizer=None, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary or old copies left


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError):
        export.export_hf(_our_model(), tmp_path / "export", tokenizer=None)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_lora_leftovers_and_gpt2_tokenizer_on_a_small_vocab(tmp_path):
    model = _our_model()
    with pytest.raises(ValueError, match="tokenizer=None"):
        export.export_hf(model, tmp_path / "a", tokenizer="gpt2")
    with pytest.raises(ValueError, match="tokenizer="):
        export.export_hf(model, tmp_path / "b", tokenizer="char")
    model.transformer.h[0].attn.c_attn.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(4, 32)))
    with pytest.raises(ValueError, match="merge LoRA"):
        export.export_hf(model, tmp_path / "c", tokenizer=None)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- tokenizer

def test_recovered_merges_are_gpt2s():
    vocab, merges = export.gpt2_vocab_and_merges()
    assert len(vocab) == 50257 and len(merges) == 50000 and vocab["<|endoftext|>"] == 50256
    # the first lines of OpenAI's merges.txt; ' the' could also be ' th'+'e', but BPE builds ' t'+'he'
    assert merges[:8] == [("Ġ", "t"), ("Ġ", "a"), ("h", "e"), ("i", "n"), ("r", "e"), ("o", "n"),
                          ("Ġt", "he"), ("e", "r")]
    assert vocab["Ġthe"] == 262 and vocab["!"] == 0


def test_exported_tokenizer_encodes_like_tiktoken(tmp_path):
    from transformers import AutoTokenizer

    from homegpt.dataloader import gpt2_encoding
    model = _our_model(vocab_size=50257)
    out = export.export_hf(model, tmp_path / "export", tokenizer="gpt2")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 50256
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token_id == 50256 and tok.model_max_length == 16
    enc = gpt2_encoding()
    shakespeare = (Path(__file__).resolve().parents[1] / "data" / "shakespeare_char" / "input.txt")
    texts = [
        "Hello world", " Hello world",
        "naïve café — 東京の天気は晴れ 🎉🚀 Ünïcödé",
        "  leading\n\n\ttabs   and    runs   \n\n\n", "trailing spaces   ", "a\r\nb \u00a0c\u2003d",
        "12345 3.14159 1,000,000 0x1F 2024-05-20", "It's they're we've I'm you'll he'd",
        "def f(x):\n    return x**2  # comment\n",
        shakespeare.read_text()[:20000] if shakespeare.exists() else "First Citizen:\nBefore we proceed",
    ]
    for text in texts:
        ids = enc.encode_ordinary(text)
        assert tok(text)["input_ids"] == ids, text[:40]
        assert tok.decode(ids) == text


# ----------------------------------------------------------------------------- export_hf.py on train.py's checkpoints

ROOT = Path(__file__).resolve().parents[1]


def _gpt2_dataset(d):
    from homegpt.dataloader import gpt2_encoding, write_raw_tokens
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40
    ids = gpt2_encoding().encode_ordinary(text)
    n = int(0.9 * len(ids))
    d.mkdir()
    write_raw_tokens(d / "train.bin", ids[:n])
    write_raw_tokens(d / "val.bin", ids[n:])
    (d / "meta.json").write_text(json.dumps({"vocab_size": 50257, "tokenizer": "gpt2",
                                             "train_tokens": n, "val_tokens": len(ids) - n}))
    return d


def _run(script, *args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True)


def _train(tmp_path, out, *extra):
    data = tmp_path / "data" if (tmp_path / "data").exists() else _gpt2_dataset(tmp_path / "data")
    r = _run("train.py", f"--data_dir={data}", f"--out_dir={out}", "--n_layer=2", "--n_head=2", "--n_embd=32",
             "--block_size=16", "--batch_size=4", "--max_iters=3", "--eval_interval=3", "--eval_iters=2",
             "--warmup_iters=0", "--learning_rate=1e-2", "--device=cpu", "--dtype=float32", *extra)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def _check_export_matches_checkpoint(out, hf_out):
    from homegpt.weights import load_model
    ours, _ = load_model(str(out))
    loaded, info = GPT2LMHeadModel.from_pretrained(str(hf_out), output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (loaded.eval()(idx).logits - all_logits(ours, idx)).abs().max().item()
    assert diff < 1e-5
    return loaded


@pytest.mark.slow
def test_export_script_writes_a_checkpoint_transformers_loads(tmp_path):
    from transformers import AutoTokenizer
    out, hf_out = tmp_path / "out", tmp_path / "hf"
    _train(tmp_path, out)
    r = _run("export_hf.py", f"--out_dir={out}", f"--hf_dir={hf_out}")
    assert r.returncode == 0, r.stderr
    _check_export_matches_checkpoint(out, hf_out)
    tok = AutoTokenizer.from_pretrained(str(hf_out))  # the dataset was GPT-2 BPE: tokenizer files come along
    assert tok("Before we proceed")["input_ids"] == [8421, 356, 5120]
    # an existing export is not overwritten unless asked (in-process: the same main(), no interpreter start-up)
    import export_hf
    before = (hf_out / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="--overwrite=True"):
        export_hf.main(export_hf.ExportConfig(out_dir=str(out), hf_dir=str(hf_out)))
    assert (hf_out / "model.safetensors").read_bytes() == before
    export_hf.main(export_hf.ExportConfig(out_dir=str(out), hf_dir=str(hf_out), overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "hf", "out"]  # no temporary copies left
    with pytest.raises(ValueError, match="no-run"):
        export_hf.main(export_hf.ExportConfig(out_dir=str(tmp_path / "no-run"), hf_dir=str(tmp_path / "hf2")))
    assert not (tmp_path / "hf2").exists()


@pytest.mark.slow
def test_lora_fine_tune_of_an_hf_model_exports_merged(tmp_path):
    base = tmp_path / "base-hf"
    make_hf_gpt2(vocab_size=50257).save_pretrained(base)
    out, hf_out = tmp_path / "out", tmp_path / "hf"
    _train(tmp_path, out, f"--init_from={base}", "--lora_rank=2")
    r = _run("export_hf.py", f"--out_dir={out}", f"--hf_dir={hf_out}")
    assert r.returncode == 0, r.stderr
    loaded = _check_export_matches_checkpoint(out, hf_out)
    # the adapter really is in the exported weights: they moved away from the base
    base_w = GPT2LMHeadModel.from_pretrained(str(base)).transformer.h[0].attn.c_attn.weight
    assert not torch.allclose(loaded.transformer.h[0].attn.c_attn.weight, base_w)
