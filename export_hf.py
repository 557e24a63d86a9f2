"""
Export one of our checkpoints as a Hugging Face GPT-2 directory, for transformers, lm-evaluation-harness,
vLLM and the rest of that ecosystem; or a LoRA run as a PEFT adapter on its unmerged base.

    python export_hf.py --out_dir=out-shakespeare --hf_dir=hf-shakespeare
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('hf-shakespeare')"
    python export_hf.py --out_dir=out-instruct-lora --hf_dir=hf-base --adapter_dir=hf-adapter

The run's checkpoint is loaded with any LoRA adapter merged into the weights (a quantised base
dequantised first) and written as config.json + model.safetensors (float32, or --dtype=float16 /
bfloat16); a model trained on GPT-2 BPE also gets the tokenizer files (rebuilt offline from
tiktoken's ranks), so AutoTokenizer.from_pretrained(hf_dir) works too. A
character-level model gets none: Hugging Face has no tokenizer for it (its vocabulary is in the
checkpoint's data_meta). Each directory appears complete or not at all. A big model takes minutes to
load and to write: on a terminal a bar names the step under way.

With --adapter_dir, a LoRA run's adapter stays separate: adapter_config.json + adapter_model.safetensors
in PEFT's format go to adapter_dir, the frozen base (without the adapter) to hf_dir, and
peft.PeftModel.from_pretrained(base, adapter_dir) computes what our adapted model does. Without
--hf_dir only the adapter is written, on the run's own base (a GPT-2 name or a Hugging Face directory);
a base that is one of our runs is not loadable by transformers, so it needs --hf_dir.
"""

from dataclasses import dataclass
from pathlib import Path

from homegpt.errors import UserError
from homegpt.fileio import CKPT_PREFIX
from configurator import run
from homegpt.checkpoint import read_checkpoint
from homegpt.weights import load_model
from homegpt.runs import holds_checkpoint
from homegpt.runtime import progress
from homegpt.export import check_export_dir, export_hf, export_peft_adapter
from homegpt.lora import count_params


@dataclass
class ExportConfig:
    out_dir: str = "out"  # the run to export, or one ckpt-NNNNNNN directory
    which: str = "best"  # the run's 'best' checkpoint (lowest validation loss; its latest if it never evaluated) or 'latest'
    base_dir: str = ""  # a LoRA / 1-D run whose base run moved: where it is now (it must hold the checkpoint trained on)
    hf_dir: str = ""  # the Hugging Face directory to write; '' = <out_dir>-hf (with adapter_dir: no base written)
    adapter_dir: str = ""  # '' = merge LoRA into the exported model; else write the adapter here in PEFT's format and export the unmerged base to hf_dir
    overwrite: bool = False  # replace an earlier export in hf_dir / adapter_dir (never anything else)
    dtype: str = "float32"  # of the exported weights: 'float32', 'float16' or 'bfloat16' (GPT-J-6B: 24 / 12 / 12 GB)


def lora_base(cfg):
    """The base a LoRA run builds on, as its checkpoint names it (a GPT-2 name, a Hugging Face
    directory or one of our runs); refuses a run without LoRA, and a base of ours without --hf_dir."""
    try:
        _, state = read_checkpoint(cfg.out_dir, cfg.which, verify=False)  # state.json only: the load verifies
    except UserError as e:
        raise UserError(f"cannot load a checkpoint from {cfg.out_dir}: {e}") from e
    rank = (state.get("config") or {}).get("lora_rank", 0)
    if not rank or not state.get("base"):
        raise UserError(f"--adapter_dir exports a LoRA adapter, but {cfg.out_dir} is not a LoRA run "
                        f"(lora_rank={rank}): drop --adapter_dir to export its weights as one model")
    base = state["base"]  # a dict: one of our runs' checkpoints, pinned (weights.base_reference)
    if (isinstance(base, dict) or holds_checkpoint(base)) and not cfg.hf_dir:
        where = base["run"] if isinstance(base, dict) else base
        raise UserError(f"the run's base {where} is one of our runs, which transformers cannot load: pass "
                        f"--hf_dir=<dir> to export the base there too (the adapter will point at it)")
    return base


def main(cfg):
    adapter_dir = Path(cfg.adapter_dir) if cfg.adapter_dir else None
    base = lora_base(cfg) if adapter_dir is not None else None
    hf_dir = _target_dirs(cfg, adapter_dir)
    # a 6B model takes minutes to read and as long again to write: the bar names the step under way
    with progress(None, "export", total=1 + (hf_dir is not None) + (adapter_dir is not None), unit="step") as bar:
        bar.set_postfix_str(f"loading {cfg.out_dir}")
        try:
            # on the CPU; LoRA merged, unless the adapter is exported on its own
            model, info = load_model(cfg.out_dir, which=cfg.which, merge_lora=adapter_dir is None,
                                     base_dir=cfg.base_dir)
        except UserError as e:
            raise UserError(f"cannot load a checkpoint from {cfg.out_dir}: {e}") from e
        bar.update()
        if hf_dir is not None:
            _export_weights(cfg, model, info, hf_dir, adapter_dir, base, bar)
        if adapter_dir is None:
            bar.write(f"load it with: AutoModelForCausalLM.from_pretrained('{hf_dir}')")
            return hf_dir
        _export_adapter(cfg, model, info, hf_dir, adapter_dir, base, bar)
    return adapter_dir


def _target_dirs(cfg, adapter_dir):
    """The Hugging Face directory to write (None: the adapter alone), every target checked before the
    (possibly slow) load: a model of billions of parameters is not loaded to be refused a directory."""
    if adapter_dir is None:
        hf_dir = Path(cfg.hf_dir) if cfg.hf_dir else default_hf_dir(cfg.out_dir)
    else:
        hf_dir = Path(cfg.hf_dir) if cfg.hf_dir else None  # None: the adapter applies to the run's own base
        if hf_dir is not None and hf_dir.resolve() == adapter_dir.resolve():
            raise UserError(f"--hf_dir and --adapter_dir are both {hf_dir}: give them different directories")
    targets = [(d, option) for d, option in ((hf_dir, "--hf_dir"), (adapter_dir, "--adapter_dir")) if d is not None]
    doomed = [(d, check_export_dir(d, option, cfg.overwrite)) for d, option in targets]
    for d, names in doomed:  # every target checked first: nothing is announced for a refused command
        if names:
            print(f"overwrite: {d} holds an earlier export; deleting {', '.join(names)} there once the new export "
                  f"is written")
    return hf_dir


def default_hf_dir(out_dir):
    """<out_dir>-hf beside the run. For one checkpoint directory (out/ckpt-0000500) that would be a
    ckpt-* directory inside the run, which train.py would take for a checkpoint and prune: the export
    goes beside the run instead (out-ckpt-0000500-hf)."""
    path = Path(str(out_dir).rstrip("/\\"))
    if not path.name.startswith(CKPT_PREFIX):
        return Path(f"{path}-hf")
    run_dir = path.absolute().parent
    return run_dir.with_name(f"{run_dir.name}-{path.name}-hf")


def _what(info):
    return f"{info.get('checkpoint')} (iter {info.get('iter_num')})"


def _export_weights(cfg, model, info, hf_dir, adapter_dir, base, bar):
    """The model (LoRA merged), or with adapter_dir its frozen base, as a transformers directory."""
    tokenizer = "gpt2" if (info.get("data_meta") or {}).get("tokenizer") == "gpt2" else None
    n_adapter, n_total = count_params(model) if adapter_dir else (0, model.get_num_params())
    if adapter_dir is not None and (info.get("config") or {}).get("base_quant"):
        raise UserError(f"{cfg.out_dir} trained on a quantised base (base_quant="
                        f"{info['config']['base_quant']!r}): its frozen base is the original model, so export "
                        f"the adapter alone (drop --hf_dir: it applies to {base}), or merge it (drop --adapter_dir)")
    bar.set_postfix_str(f"writing {hf_dir}")
    export_hf(model, hf_dir, tokenizer=tokenizer, overwrite=cfg.overwrite, drop_lora=adapter_dir is not None,
              dtype=cfg.dtype)
    bar.update()
    bar.write(f"exported {'the frozen base of ' if adapter_dir else ''}{_what(info)}, "
              f"{(n_total - n_adapter) / 1e6:.2f}M parameters -> {hf_dir}")
    if tokenizer is None:
        bar.write("no tokenizer files: the model was not trained on GPT-2 BPE; decode its ids with the "
                  "checkpoint's data_meta (sample.py does)")


def _export_adapter(cfg, model, info, hf_dir, adapter_dir, base, bar):
    """A LoRA run's adapter in PEFT's format, pointing at hf_dir when the base was written there, else
    at the run's own base."""
    # as given, not resolved: the pair of directories can move together
    base_ref = cfg.hf_dir if hf_dir is not None else base
    bar.set_postfix_str(f"writing {adapter_dir}")
    export_peft_adapter(model, adapter_dir, base_ref, overwrite=cfg.overwrite)
    bar.update()
    c = info.get("config") or {}
    bar.write(f"exported the LoRA adapter of {_what(info)}: rank {c.get('lora_rank')}, targets "
              f"{c.get('lora_targets')!r}, {count_params(model)[0]:,} parameters -> {adapter_dir}, "
              f"on the base {base_ref}")
    bar.write(f"load it with: python -c \"from transformers import AutoModelForCausalLM as M; from peft import "
              f"PeftModel; m = PeftModel.from_pretrained(M.from_pretrained('{base_ref}'), '{adapter_dir}')\"")


if __name__ == "__main__":
    run(main, ExportConfig)
