"""Quantised frozen bases (quant.py, base_quant='int8' / 'nf4') and GPT-J-6B's recipes on a small random
GPT-J: logits close to float32, weights loaded tensor by tensor (peak memory near the quantised size),
LoRA and 1-D training on top, merged export, resume, the hub download, and GPT-J-6B's counts.

    python -m pytest -q tests/test_quant.py
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (dev extra)")
transformers = pytest.importorskip("transformers")
from transformers import GPTJConfig, GPTJForCausalLM  # noqa: E402

from homegpt import hf, hub  # noqa: E402
from homegpt import lora  # noqa: E402
from homegpt import quant  # noqa: E402
from homegpt.errors import UserError  # noqa: E402
from configurator import parse_config  # noqa: E402
from helpers import all_logits, read_metrics, tiny_train_config  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# how far a quantised base's logits may be from float32's (relative L2 norm of the difference, on the
# random GPT-J below): LLM.int8 rounds each weight row and each input row to 8 bits (measured 0.27% at
# the logits); NF4 has 16 levels per block of 64 weights (measured 3.8%)
TOLERANCE = {"int8": 0.02, "nf4": 0.1}
GPTJ_6B = dict(vocab_size=50400, block_size=2048, n_layer=28, n_head=16, n_embd=4096, rotary_dim=64, bias=True,
               qkv_bias=False, attn_proj_bias=False, tie_weights=False, lm_head_bias=True, parallel_residual=True)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def gptj_dir(tmp_path_factory):
    """A random GPT-J directory as save_pretrained writes it (GPT-2's vocabulary padded to 50,400, as
    GPT-J-6B's), with biases and gains off their init so a misplaced one shows."""
    torch.manual_seed(0)
    model = GPTJForCausalLM(GPTJConfig(vocab_size=50400, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                       rotary_dim=8, bos_token_id=50256, eos_token_id=50256))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape))
    d = tmp_path_factory.mktemp("gptj")
    model.save_pretrained(d)
    return d


def tokens(seed=5, shape=(2, 16)):
    return torch.randint(0, 50257, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_quantised_base_stays_within_its_tolerance_of_float32(gptj_dir, kind):
    ref = hf.from_pretrained(str(gptj_dir))
    q = hf.from_pretrained(str(gptj_dir), base_quant=kind)
    layers = [n for n, m in q.named_modules() if quant.is_quantized(m)]
    assert len(layers) == 2 * 4 and not quant.is_quantized(q.lm_head)  # every block matmul, not lm_head
    idx = tokens()
    with torch.no_grad():
        err = rel_err(all_logits(q, idx), all_logits(ref, idx))
    print(f"{kind}: logits within {err:.4f} (relative) of float32")
    assert 0 < err < TOLERANCE[kind]
    # dequantised back into float layers, the model computes with exactly the rounded weights
    quant.dequantize_model(q)
    assert not any(quant.is_quantized(m) for m in q.modules())
    with torch.no_grad():
        assert rel_err(all_logits(q, idx), all_logits(ref, idx)) < TOLERANCE[kind]


def test_quantize_model_matches_quantising_while_loading(gptj_dir):
    """One of our runs as a base is quantised after loading; a pretrained one while loading: same weights."""
    loaded = hf.from_pretrained(str(gptj_dir), base_quant="int8")
    after = hf.from_pretrained(str(gptj_dir))
    quant.quantize_model(after, "int8")
    for (n, a), (_, b) in zip(loaded.named_modules(), after.named_modules()):
        if quant.is_quantized(a):
            assert torch.equal(quant.dequantized_weight(a), quant.dequantized_weight(b)), n


PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    from homegpt import hf
    from homegpt.hardware import proc_status_bytes, reset_peak_rss
    import bitsandbytes  # imported before the baseline: their code is not the weights
    from homegpt import quant
    before = proc_status_bytes("VmRSS")
    reset_peak_rss()
    model = hf.from_pretrained({path!r}, base_quant={kind!r})
    print(proc_status_bytes("VmHWM") - before)
""")


@pytest.mark.parametrize("kind", ["int8", ""])
def test_loading_reads_tensor_by_tensor_so_an_int8_base_peaks_near_its_size(tmp_path, kind):
    """A GPT-J whose block matmuls are 403 MB in float32 (the 6B's 24 GB in small), sharded as
    save_pretrained shards it: loading quantised must never hold the float copy (peak ~ the int8 size
    plus one block's tensors), and even a float load holds the model once, not twice."""
    torch.manual_seed(0)
    cfg = GPTJConfig(vocab_size=64, n_positions=64, n_embd=1024, n_layer=8, n_head=8, rotary_dim=16,
                     bos_token_id=None, eos_token_id=None)
    GPTJForCausalLM(cfg).save_pretrained(tmp_path, max_shard_size="100MB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    floats = 8 * 12 * 1024 * 1024 * 4  # the block matmuls in float32
    # glibc keeps freed chunks of 4-32 MB (this model's tensor sizes) for reuse once its adaptive mmap
    # threshold has risen, which would count freed float tensors as held: a fixed threshold returns
    # them. (GPT-J-6B's 268 MB tensors are above glibc's 32 MB cap and always return.)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT.format(root=str(ROOT), path=str(tmp_path), kind=kind)],
                         capture_output=True, text=True, check=True, env=env)
    grown = int(out.stdout.split()[-1])
    print(f"base_quant={kind!r}: peak grew {grown / 2**20:.0f} MB loading {floats / 2**20:.0f} MB of float32 matmuls")
    if kind:  # int8: 101 MB, plus one block's float tensors while they are stacked and quantised
        assert grown < 0.5 * floats
    else:  # the model once, plus one tensor being converted
        assert grown < 1.3 * floats


def test_a_sharded_pytorch_bin_directory_loads_as_its_transformers_model(tmp_path, gptj_dir):
    """The layout of GPT-J-6B's own repository (pickled .bin shards and their index), written by hand:
    transformers 5 saves safetensors only."""
    theirs = GPTJForCausalLM.from_pretrained(str(gptj_dir)).eval()
    sd = theirs.state_dict()
    names = list(sd)
    shards = {"pytorch_model-00001-of-00002.bin": names[:len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in shards.items():
        torch.save({k: sd[k].clone() for k in keys}, tmp_path / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((gptj_dir / "config.json").read_text())
    ours = hf.from_pretrained(str(tmp_path))
    idx = tokens()
    with torch.no_grad():
        assert (all_logits(ours, idx) - theirs(idx).logits).abs().max().item() < 1e-5


def test_a_hub_repository_downloads_safetensors_when_it_has_them_else_the_bin_files(monkeypatch, gptj_dir):
    import huggingface_hub
    asked = []
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: None)
    for listing, expected in ((["config.json", "model.safetensors"], "*.safetensors"),
                              (["config.json", "pytorch_model.bin"], "pytorch_model*.bin")):
        monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, listing=listing: listing)
        monkeypatch.setattr(huggingface_hub, "snapshot_download",
                            lambda repo, allow_patterns, **kw: asked.append((repo, allow_patterns)) or str(gptj_dir))
        model = hf.from_pretrained("EleutherAI/gpt-j-6b")
        assert model.config.rotary_dim == 8 and asked[-1][0] == "EleutherAI/gpt-j-6b"
        assert expected in asked[-1][1] and not {"*.safetensors", "pytorch_model*.bin"} <= set(asked[-1][1])


def test_offline_without_a_cached_copy_a_hub_repository_fails_at_once_saying_what_to_do(monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: "HF_HUB_OFFLINE=1 is set")

    def no_cache(repo, **kw):
        assert kw.get("local_files_only"), "offline, only the cache may be read"
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_cache)
    with pytest.raises(UserError, match=r"(?s)EleutherAI/gpt-j-6b.*unreachable.*snapshot_download"):
        hf.from_pretrained("EleutherAI/gpt-j-6b", base_quant="int8")


def finetune(tmp_path, gptj_dir, out, **overrides):
    import train
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {w}\nA:", "completion": f" {w.upper()}"}) + "\n"
                            for w in ["red", "blue", "green", "gold"] * 4))
    cfg = dict(init_from=str(gptj_dir), sft_train_file=str(data), sft_val_file=str(data), block_size=32,
               max_iters=30, eval_interval=30, learning_rate=3e-2, min_lr=3e-3, lr_decay_iters=30, warmup_iters=2,
               eval_iters=0, base_quant="int8")
    cfg.update(overrides)
    return train.main(tiny_train_config(tmp_path, out, **cfg))


def test_lora_over_an_nf4_base_learns(tmp_path, gptj_dir):
    from homegpt.weights import load_any
    out = tmp_path / "run"
    finetune(tmp_path, gptj_dir, out, lora_rank=4, lora_alpha=8, lora_dropout=0.0, base_quant="nf4")
    val = [m["val_loss"] for m in read_metrics(out) if "val_loss" in m]
    assert val[-1] < val[0] - 0.5, val
    adapted, _, _ = load_any(str(out))
    assert isinstance(adapted.transformer.h[0].attn.c_attn.base, __import__("bitsandbytes").nn.Linear4bit)


def test_lora_over_an_int8_base_learns_and_its_merged_export_matches(tmp_path, gptj_dir):
    import export_hf
    from homegpt.weights import load_any, load_model
    out = tmp_path / "run"
    finetune(tmp_path, gptj_dir, out, lora_rank=4, lora_alpha=8, lora_dropout=0.0, optimizer="adamw8bit")
    val = [m["val_loss"] for m in read_metrics(out) if "val_loss" in m]
    assert val[-1] < val[0] - 0.5, val  # the adapters alone lower the loss above the frozen int8 weights
    adapted, _, _ = load_any(str(out))  # as trained: int8 base, adapters unmerged
    assert any(isinstance(m, lora.QuantLoRALinear) for m in adapted.modules())
    merged, _ = load_model(out)  # adapters folded into the dequantised weights: a float GPT-J
    assert not any(quant.is_quantized(m) or isinstance(m, lora.LORA_LAYERS) for m in merged.modules())
    idx = tokens()
    with torch.no_grad():
        a, m = all_logits(adapted, idx), all_logits(merged, idx)
    assert rel_err(m, a) < TOLERANCE["int8"]  # int8 rounds the inputs; the merged model does not
    export_hf.main(export_hf.ExportConfig(out_dir=str(out), hf_dir=str(tmp_path / "hf"), dtype="float16"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(theirs).__name__ == "GPTJForCausalLM"
    with torch.no_grad():  # stored in float16: what our merged model computes with its weights so rounded
        for p in merged.parameters():
            p.copy_(p.half().float())
        assert (theirs(idx).logits - all_logits(merged, idx)).abs().max().item() < 1e-5
    # the adapter alone: a GPT-J's q, k, v are three layers in transformers, so PEFT's format is refused
    with pytest.raises(UserError, match="GPT-2 models only"):
        export_hf.main(export_hf.ExportConfig(out_dir=str(out), adapter_dir=str(tmp_path / "adapter")))


def test_train_1d_only_over_an_int8_base_trains_the_biases_and_keeps_the_int8_weights(tmp_path, gptj_dir):
    from homegpt.weights import load_any
    from homegpt.checkpoint import read_checkpoint
    out = tmp_path / "run"
    before = hf.from_pretrained(str(gptj_dir), base_quant="int8")
    finetune(tmp_path, gptj_dir, out, train_1d_only=True, learning_rate=1e-2, max_iters=10, eval_interval=10,
             lr_decay_iters=10)
    ckpt, state = read_checkpoint(out)
    from safetensors.torch import load_file
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved and all(t.dim() == 1 for t in saved.values()) and state["trainable_only"]
    after, _, _ = load_any(str(out))
    moved = [n for n, p in after.named_parameters() if p.dim() == 1
             and not torch.equal(p, dict(before.named_parameters())[n])]
    assert any("mlp.c_fc.bias" in n for n in moved)  # the int8 layers' own biases trained
    for (n, a), (_, b) in zip(after.named_modules(), before.named_modules()):
        if quant.is_quantized(a):
            assert torch.equal(a.weight.data, b.weight.data), n  # the int8 weights never change


def test_a_resume_refuses_another_base_quant(tmp_path, gptj_dir):
    from homegpt import config_checks
    out = tmp_path / "run"
    finetune(tmp_path, gptj_dir, out, lora_rank=4, max_iters=2, eval_interval=2, lr_decay_iters=2)
    with pytest.raises(UserError, match="base_quant"):
        finetune(tmp_path, gptj_dir, out, lora_rank=4, max_iters=4, eval_interval=2, lr_decay_iters=4,
                 base_quant="nf4", init_from="resume")
    assert config_checks.RESUME_FIXED.count("base_quant") == 1


def test_base_quant_is_refused_where_nothing_frozen_would_train():
    import train
    from homegpt.runtime import Dist
    cfg = train.TrainConfig(init_from="gpt2", base_quant="int8", out_dir="/nonexistent-out")
    with pytest.raises(UserError, match="lora_rank > 0 or train_1d_only"):
        train.check_config(cfg, Dist())
    with pytest.raises(UserError, match="base_quant must be"):
        train.check_config(train.TrainConfig(init_from="gpt2", base_quant="int4", lora_rank=8), Dist())


def test_gptj_6b_trainable_counts_on_the_meta_device():
    """What docs/gptj.md's table says each way trains, counted on GPT-J-6B's real shape (nothing allocated)."""
    counts = {}
    for way in ("1d", "attn", "all"):
        with torch.device("meta"):
            model = GPT(GPTConfig(**GPTJ_6B))
        if way == "1d":
            lora.train_only_1d(model)
        else:
            lora.apply_lora(model, 8, 16.0, 0.0, way)
        counts[way] = lora.count_params(model)
    print({k: f"{t:,} of {n:,}" for k, (t, n) in counts.items()})
    base = counts["1d"][1]
    # GPT-J-6B's parameters: 28 blocks x (ln_1, q/k/v/out 4 x 4096^2, fc_in and fc_out with biases),
    # wte and the untied lm_head (50,400 x 4,096 each) with lm_head's bias, ln_f
    block = 2 * 4096 + 4 * 4096 ** 2 + 2 * 4096 * 16384 + 16384 + 4096
    assert base == 28 * block + 2 * 50400 * 4096 + 50400 + 2 * 4096 == 6_050_882_784
    assert counts["1d"][0] == 28 * (2 * 4096 + 16384 + 4096) + 2 * 4096 + 50400 == 861_408
    assert counts["attn"][0] == 28 * 8 * (4096 + 3 * 4096 + 2 * 4096) == 5_505_024
    assert counts["all"][0] == 5_505_024 + 28 * 8 * 2 * (4096 + 16384) == 14_680_064


def test_memory_prices_an_int8_base_as_the_quantised_model_holds_it(gptj_dir):
    from homegpt import memory
    q = hf.from_pretrained(str(gptj_dir), base_quant="int8")
    lora.apply_lora(q, 4, 8.0, 0.0, "attn")
    f = hf.from_pretrained(str(gptj_dir))
    lora.apply_lora(f, 4, 8.0, 0.0, "attn")
    measured = memory.estimate_training_memory(q, 1, 32, optimizer="adamw8bit")  # bitsandbytes' own dtypes
    priced = memory.estimate_training_memory(f, 1, 32, optimizer="adamw8bit", base_quant="int8")
    rows = 2 * (3 * 64 + 64 + 4 * 64 + 64)  # one float32 scale per weight row (SCB): not a parameter
    assert priced["weights"] == measured["weights"] + 4 * rows
    matmuls = 2 * (3 * 64 * 64 + 64 * 64 + 2 * 64 * 256)  # the block matmuls' weights: 4 bytes -> 1 (+ scales)
    assert memory.estimate_training_memory(f, 1, 32)["weights"] - priced["weights"] == 3 * matmuls - 4 * rows


def test_gptj_6b_with_int8_lora_and_adamw8bit_fits_11_gb_by_the_estimate():
    from homegpt import memory
    with torch.device("meta"):
        model = GPT(GPTConfig(**GPTJ_6B))
    lora.apply_lora(model, 8, 16.0, 0.0, "attn")
    est = memory.estimate_training_memory(model, 1, 256, compute_dtype_bytes=2, optimizer="adamw8bit",
                                          activation_checkpointing=True, base_quant="int8")
    report = memory.memory_report(est, 11 * 2**30)
    print(report)
    assert "-> fits" in report and 6.5 * 2**30 < est["weights"] < 7.5 * 2**30


def config_run(tmp_path, name, gptj_dir, **overrides):
    """A GPT-J recipe from config/ as train.py reads it, shrunk to seconds on the small GPT-J."""
    from train import TrainConfig
    small = dict(init_from=str(gptj_dir), out_dir=str(tmp_path / name), device="cpu", dtype="float32",
                 batch_size=2, gradient_accumulation_steps=1, block_size=48, max_iters=4, eval_interval=2,
                 eval_iters=2, warmup_iters=1, lr_decay_iters=4, log_interval=1)
    small.update(overrides)
    return parse_config(TrainConfig, [str(ROOT / "config" / f"{name}.py")] + [f"--{k}={v}" for k, v in small.items()])


def prepare(script, *args):
    subprocess.run([sys.executable, str(ROOT / "data" / script / "prepare.py"), *args], check=True,
                   capture_output=True, text=True)


@pytest.fixture(scope="module")
def hate_speech(tmp_path_factory):
    d = tmp_path_factory.mktemp("hate_speech")
    rows = [{"tweet": f"tweet number {i} about {['x', 'y', 'z'][i % 3]}", "class": i % 3} for i in range(1500)]
    (d / "tweets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare("hate_speech", f"--input={d / 'tweets.jsonl'}", f"--out_dir={d}")
    return d


@pytest.mark.parametrize("name,overrides", [("finetune_gptj_lora_all", {}),
                                            ("finetune_gptj_lora_all", {"lora_targets": "attn"}),  # way 2
                                            ("finetune_gptj_1d", {})], ids=["lora_all", "lora_attn", "1d"])
def test_the_gptj_classifier_recipes_run_end_to_end(tmp_path, gptj_dir, hate_speech, name, overrides):
    import eval as eval_script
    import train
    cfg = config_run(tmp_path, name, gptj_dir, sft_train_file=hate_speech / "train.jsonl",
                     sft_val_file=hate_speech / "val.jsonl", **overrides)
    assert cfg.base_quant == "int8" and cfg.optimizer == "adamw8bit" and cfg.activation_checkpointing
    result = train.main(cfg)
    assert result["iter_num"] == 4
    ecfg = parse_config(eval_script.EvalConfig, [f"--out_dir={cfg.out_dir}", "--tasks=generate", "--max_new_tokens=2",
                                                 f"--data_file={hate_speech / 'val.jsonl'}", "--limit=6",
                                                 f"--out_file={tmp_path / 'eval.json'}", "--progress=False"])
    eval_script.main(ecfg)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert "generate" in json.dumps(report)


def test_the_gptj_fewshot_config_scores_the_int8_base(tmp_path, gptj_dir, hate_speech):
    import eval as eval_script
    cfg = parse_config(eval_script.EvalConfig, [
        str(ROOT / "config" / "finetune_gptj_fewshot.py"), f"--init_from={gptj_dir}",
        f"--data_file={hate_speech / 'val.jsonl'}", f"--shots_file={hate_speech / 'train.jsonl'}", "--limit=6",
        f"--out_file={tmp_path / 'fewshot.json'}", "--progress=False", "--device=cpu"])
    assert cfg.base_quant == "int8" and cfg.k_shot == 4
    eval_script.main(cfg)
    assert (tmp_path / "fewshot.json").is_file()


def test_the_gptj_mnli_recipe_trains_on_packed_text_and_exports(tmp_path, gptj_dir):
    import export_hf
    import train
    src = tmp_path / "mnli_jsonl"
    src.mkdir()
    words = ["cats", "dogs", "rain", "music", "trains", "tea"]
    for split, n in (("train", 120), ("validation_matched", 30)):
        (src / f"{split}.jsonl").write_text("".join(json.dumps(
            {"premise": f"the {words[i % 6]} are here today", "hypothesis": f"{words[(i * 7) % 6]} exist",
             "label": i % 3}) + "\n" for i in range(n)))
    data = tmp_path / "mnli"
    prepare("mnli", f"--input_dir={src}", f"--out_dir={data}")
    cfg = config_run(tmp_path, "finetune_gptj_mnli", gptj_dir, data_dir=data, block_size=64)
    assert cfg.sampling == "sequential" and not cfg.sft_train_file and cfg.base_quant == "int8"
    train.main(cfg)
    export_hf.main(export_hf.ExportConfig(out_dir=cfg.out_dir, hf_dir=str(tmp_path / "hf-gptj-mnli"), dtype="float16"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf-gptj-mnli"))
    assert type(theirs).__name__ == "GPTJForCausalLM"


def test_an_nf4_layer_passes_gradients_after_an_evaluation_on_every_cpu():
    """bitsandbytes repacks an nf4 weight for its inference kernel at the first eval-mode forward on a CPU
    with AVX512-BF16 (Zen 4, Sapphire Rapids) and keeps it: that kernel has no backward, so LoRA over an
    nf4 base stopped learning (or raised) after its first validation there. quant.py turns the packing
    off; on a CPU without AVX512-BF16 the packing never happens, and the flag pins the fix there too."""
    torch.manual_seed(0)
    weight = torch.randn(64, 128) * 0.05
    layer = quant.quantized_linear(weight, torch.zeros(64), "nf4")
    assert layer.support_avx512bf16_for_cpu is False
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, 128))  # an evaluation: where the packing would happen
    layer.train()
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    expected = quant.dequantized_weight(layer).sum(0).expand(3, -1)  # d(sum(x W^T + b)) / dx
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-4)
