"""LoRA adapters exported in PEFT's format: PeftModel on the exported base gives our adapted model's logits.

    python -m pytest -q tests/test_peft_export.py

No network: the bases are tiny random models (ours, or a transformers GPT-2 saved to tmp_path).
"""

import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import PeftModel  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import export_hf  # noqa: E402
from homegpt import export, hf  # noqa: E402
import train  # noqa: E402
from homegpt.weights import load_model  # noqa: E402
from helpers import all_logits, char_dataset, tiny_train_config  # noqa: E402
from homegpt.lora import LoRALinear, apply_lora  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

VOCAB = 97


@torch.no_grad()
def _lora_model(targets, seed=0):
    """A tiny GPT with non-zero biases, then LoRA with random A and B: with B = 0 (its init) the
    adapter would compute nothing, and a lost or transposed adapter would go unnoticed."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=VOCAB, dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 1:
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    base_sd = hf.hf_state_dict(model)
    # dropout 0.1: exported as PEFT's lora_dropout, and off in eval mode on both sides
    names = apply_lora(model, rank=4, alpha=8, dropout=0.1, targets=targets)
    for n, p in model.named_parameters():
        if n.endswith(("lora_A", "lora_B")):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval(), names, base_sd


def _peft_model(hf_base, adapter_dir):
    base = GPT2LMHeadModel.from_pretrained(str(hf_base))
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def _adapted(peft_model):
    """The module names PEFT put a LoRA layer on, as named in the transformers model."""
    prefix = export.PEFT_PREFIX
    return {n.removeprefix(prefix) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def _max_diff(ours, theirs, vocab, seed=3):
    idx = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (theirs(idx).logits - all_logits(ours, idx)).abs().max().item()


# ----------------------------------------------------------------------------- export.export_peft_adapter

@pytest.mark.parametrize("targets", ["attn", "all"])
def test_peft_on_the_exported_base_gives_our_logits(tmp_path, targets):
    model, names, base_sd = _lora_model(targets)
    # the base export of the LoRA model is exactly the model before apply_lora: adapters left out, not merged
    frozen = hf.hf_state_dict(model, drop_lora=True)
    assert frozen.keys() == base_sd.keys() and all(torch.equal(v, base_sd[k]) for k, v in frozen.items())
    export.export_hf(model, tmp_path / "base", tokenizer=None, drop_lora=True)
    out = export.export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="base")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"], config["fan_in_fan_out"],
            config["base_model_name_or_path"]) == ("LORA", "CAUSAL_LM", 4, 8, True, "base")

    theirs = _peft_model(tmp_path / "base", out)
    # exactly the layers we adapted: 'attn' must not catch mlp.c_proj through its c_proj suffix
    assert _adapted(theirs) == set(names)
    assert len(names) == {"attn": 2, "all": 4}[targets] * 2
    diff = _max_diff(model, theirs, VOCAB)
    assert diff < 1e-5, diff
    # and the adapter is what makes them equal: the bare base computes something else
    assert _max_diff(model, GPT2LMHeadModel.from_pretrained(str(tmp_path / "base")).eval(), VOCAB) > 1e-2


def test_peft_saves_our_adapter_back_unchanged(tmp_path):
    """Our files are what PEFT itself writes: loaded and saved again by PEFT, the tensors, their names
    and the config fields we write come back the same."""
    from safetensors.torch import load_file
    model, _, _ = _lora_model("all")
    export.export_hf(model, tmp_path / "base", tokenizer=None, drop_lora=True)
    ours = export.export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="base")
    _peft_model(tmp_path / "base", ours).save_pretrained(str(tmp_path / "again"))
    a, b = load_file(str(ours / "adapter_model.safetensors")), load_file(str(tmp_path / "again/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mine = json.loads((ours / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "again/adapter_config.json").read_text())
    for key, value in mine.items():
        if key == "target_modules":
            assert sorted(value) == sorted(theirs[key])
        else:
            assert theirs[key] == value, key


def test_a_model_without_adapters_is_refused(tmp_path):
    model, _, _ = _lora_model("attn")
    plain = GPT(model.config)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export.export_peft_adapter(plain, tmp_path / "adapter", base_model_name_or_path="gpt2")
    with pytest.raises(ValueError, match="drop_lora=True"):  # the merged export refuses the unmerged model
        hf.hf_state_dict(model)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- export_hf.py on train.py's runs

def _train(out, data, **kw):
    # 4 steps at a high learning rate: B moves away from its zero init
    train.main(tiny_train_config(data, out, block_size=16, batch_size=4, max_iters=4, eval_interval=4,
                                 eval_iters=2, warmup_iters=0, lr_decay_iters=4, learning_rate=1e-2, **kw))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny pretrained char run of ours and a LoRA fine-tune of it (all four matmuls adapted)."""
    d = tmp_path_factory.mktemp("runs")
    data = char_dataset(d / "data", n_chars=20_000)
    pre = _train(d / "pre", data)
    ft = _train(d / "ft", data, init_from=str(pre), lora_rank=2, lora_alpha=4.0, lora_dropout=0.0,
                lora_targets="all")
    return pre, ft


def _check_parity(ft, hf_base, adapter_dir):
    ours, _ = load_model(str(ft), merge_lora=False, which="best")
    assert any(isinstance(m, LoRALinear) for m in ours.modules())
    assert any(m.lora_B.abs().max() > 0 for m in ours.modules() if isinstance(m, LoRALinear)), "B never trained"
    theirs = _peft_model(hf_base, adapter_dir)
    assert _adapted(theirs) == {n for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    diff = _max_diff(ours, theirs, ours.config.vocab_size)
    assert diff < 1e-5, diff
    return diff


@pytest.mark.slow
def test_export_script_writes_base_and_adapter_for_a_lora_run(runs, tmp_path, capsys):
    pre, ft = runs
    hf_base, adapter = tmp_path / "hf-base", tmp_path / "hf-adapter"
    export_hf.main(export_hf.ExportConfig(out_dir=str(ft), hf_dir=str(hf_base), adapter_dir=str(adapter)))
    printed = capsys.readouterr().out
    assert f"PeftModel.from_pretrained(M.from_pretrained('{hf_base}'), '{adapter}')" in printed
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(hf_base)
    _check_parity(ft, hf_base, adapter)
    # the base written is the frozen pretrained run, not the merged fine-tune
    base_model, _ = load_model(str(pre), which="best")
    with torch.no_grad():
        assert _max_diff(base_model, GPT2LMHeadModel.from_pretrained(str(hf_base)).eval(),
                         base_model.config.vocab_size) < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-adapter", "hf-base"]  # no temporary copies


@pytest.mark.slow
def test_adapter_alone_points_at_a_hugging_face_base(tmp_path):
    # a LoRA fine-tune of a Hugging Face directory: no base to write, the adapter names that directory
    torch.manual_seed(0)
    base = tmp_path / "base-hf"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=50257)).save_pretrained(base)
    from homegpt.dataloader import gpt2_encoding, write_raw_tokens
    ids = gpt2_encoding().encode_ordinary("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40)
    data = tmp_path / "data"
    data.mkdir()
    n = int(0.9 * len(ids))
    write_raw_tokens(data / "train.bin", ids[:n])
    write_raw_tokens(data / "val.bin", ids[n:])
    (data / "meta.json").write_text(json.dumps({"vocab_size": 50257, "tokenizer": "gpt2",
                                                "train_tokens": n, "val_tokens": len(ids) - n}))
    ft = _train(tmp_path / "ft", data, init_from=str(base), lora_rank=2, lora_targets="attn")
    adapter = tmp_path / "adapter"
    export_hf.main(export_hf.ExportConfig(out_dir=str(ft), adapter_dir=str(adapter)))
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base-hf", "data", "ft"]  # no <out_dir>-hf
    _check_parity(ft, base, adapter)
    # AutoPeftModelForCausalLM finds the base through base_model_name_or_path alone
    from peft import AutoPeftModelForCausalLM
    ours, _ = load_model(str(ft), merge_lora=False, which="best")
    assert _max_diff(ours, AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval(), 50257) < 1e-5


@pytest.mark.slow
def test_export_script_refuses_what_it_cannot_export(runs, tmp_path):
    pre, ft = runs
    adapter = tmp_path / "adapter"
    with pytest.raises(ValueError, match="not a LoRA run"):
        export_hf.main(export_hf.ExportConfig(out_dir=str(pre), hf_dir=str(tmp_path / "hf"), adapter_dir=str(adapter)))
    with pytest.raises(ValueError, match="--hf_dir"):  # its base is our run: transformers cannot load it
        export_hf.main(export_hf.ExportConfig(out_dir=str(ft), adapter_dir=str(adapter)))
    with pytest.raises(ValueError, match="different directories"):
        export_hf.main(export_hf.ExportConfig(out_dir=str(ft), hf_dir=str(adapter), adapter_dir=str(adapter)))
    assert list(tmp_path.iterdir()) == []
    adapter.mkdir()
    (adapter / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # what an export did not write is never replaced
        with pytest.raises(ValueError, match="notes.txt"):
            export_hf.main(export_hf.ExportConfig(out_dir=str(ft), hf_dir=str(tmp_path / "hf"),
                                                  adapter_dir=str(adapter), overwrite=overwrite))
    assert [p.name for p in adapter.iterdir()] == ["notes.txt"] and not (tmp_path / "hf").exists()
    (adapter / "notes.txt").unlink()
    for overwrite in (False, True):  # the second replaces the first's adapter and base
        export_hf.main(export_hf.ExportConfig(out_dir=str(ft), hf_dir=str(tmp_path / "hf"), adapter_dir=str(adapter),
                                              overwrite=overwrite))
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
