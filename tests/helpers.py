"""Small builders shared by the tests: a char dataset, a tiny training config, a fake GPU, a fake terminal."""

import io
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "shakespeare_char" / "input.txt"


def char_dataset(path, n_chars=200_000):
    """The first n_chars of Tiny Shakespeare as a char dataset (train.bin, val.bin, meta.json) in path."""
    from homegpt.prepare_text import prepare_chars  # what data/shakespeare_char/prepare.py runs
    path.mkdir(parents=True, exist_ok=True)
    prepare_chars(path, SHAKESPEARE.read_text(encoding="utf-8")[:n_chars])
    return path


def all_logits(model, idx):
    """Our GPT's logits at every position (targets of -1 ask for the full sequence without a loss)."""
    import torch
    logits, _ = model(idx, targets=torch.full_like(idx, -1))
    return logits


def tiny_train_config(data_dir, out_dir, **overrides):
    from train import TrainConfig
    cfg = dict(out_dir=str(out_dir), data_dir=str(data_dir), device="cpu", dtype="float32", compile=False,
               n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, dropout=0.0,
               max_iters=20, eval_interval=10, eval_iters=4, log_interval=1, warmup_iters=5,
               lr_decay_iters=20, learning_rate=3e-3, min_lr=3e-4)
    cfg.update(overrides)
    return TrainConfig(**cfg)


def tiny_run(path, **overrides):
    """A tiny char model trained into path/out on 20,000 characters (path/data); returns the out_dir."""
    import train
    train.main(tiny_train_config(char_dataset(path / "data", n_chars=20_000), path / "out", **overrides))
    return path / "out"


def fake_gpu(monkeypatch, name, capability):
    """torch.cuda answering as the named card would, on a machine without CUDA."""
    import torch
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # what recent torch says on a T4: its including_emulation defaults to True, so emulated bf16 counts
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    return torch.device("cuda")  # no CUDA needed: only the queries above are consulted


def intact_checkpoints(out):
    """{checkpoint name: its model file's bytes} of every checkpoint in a run whose files verify (sizes and
    sha256): what 'no intact checkpoint lost' is checked against."""
    from homegpt import checkpoint
    found = {}
    for ckpt in checkpoint.checkpoint_dirs(out):
        try:
            checkpoint._validated_state(ckpt, verify=True)
        except (ValueError, FileNotFoundError):
            continue
        found[ckpt.name] = (ckpt / "model.safetensors").read_bytes()
    return found


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as stderr is in an interactive shell."""

    def isatty(self):
        return True


from homegpt.runs import read_metrics  # noqa: E402,F401  (the tests read runs as plot.py does)
