"""
Export one of our checkpoints as a Hugging Face GPT-2 directory, for transformers, lm-evaluation-harness,
vLLM and the rest of that ecosystem.

    python export_hf.py --out_dir=out-shakespeare --hf_dir=hf-shakespeare
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('hf-shakespeare')"

The run's latest checkpoint is loaded with any LoRA adapter merged into the weights and written as
config.json + model.safetensors (float32); a model trained on GPT-2 BPE also gets the tokenizer files
(rebuilt offline from tiktoken's ranks), so AutoTokenizer.from_pretrained(hf_dir) works too. A
character-level model gets none: Hugging Face has no tokenizer for it (its vocabulary is in the
checkpoint's data_meta). The directory appears complete or not at all.
"""

from dataclasses import dataclass
from pathlib import Path

from configurator import UserError, run


@dataclass
class ExportConfig:
    out_dir: str = "out"  # the run to export, or one ckpt-NNNNNNN directory
    which: str = "best"  # the run's 'best' checkpoint (lowest validation loss; its latest if it never evaluated) or 'latest'
    hf_dir: str = ""  # the Hugging Face directory to write; '' = <out_dir>-hf
    overwrite: bool = False  # replace an existing non-empty hf_dir


def main(cfg):
    from checkpoint import load_model
    from hf import export_hf
    hf_dir = Path(cfg.hf_dir or str(Path(cfg.out_dir)).rstrip("/\\") + "-hf")
    # refuse before the (possibly slow) load: an export must never clobber a directory by surprise
    if hf_dir.exists() and (not hf_dir.is_dir() or any(hf_dir.iterdir())) and not cfg.overwrite:
        raise UserError(f"{hf_dir} already exists and is not empty: choose another --hf_dir "
                        f"or pass --overwrite=True to replace it")
    try:
        model, info = load_model(cfg.out_dir, which=cfg.which)  # on the CPU, LoRA merged
    except UserError as e:
        raise UserError(f"cannot load a checkpoint from {cfg.out_dir}: {e}") from e
    tokenizer = "gpt2" if (info.get("data_meta") or {}).get("tokenizer") == "gpt2" else None
    export_hf(model, hf_dir, tokenizer=tokenizer, overwrite=cfg.overwrite)
    n = model.get_num_params()
    print(f"exported {info.get('checkpoint')} (iter {info.get('iter_num')}, {n / 1e6:.2f}M parameters) -> {hf_dir}")
    if tokenizer is None:
        print("no tokenizer files: the model was not trained on GPT-2 BPE; decode its ids with the "
              "checkpoint's data_meta (sample.py does)")
    print(f"load it with: AutoModelForCausalLM.from_pretrained('{hf_dir}')")
    return hf_dir


if __name__ == "__main__":
    run(main, ExportConfig)
