"""
The data of a training run: token files (dataloader.py) or instruction / completion JSONL (sft.py).
open_data reads and checks every file before a model is built, so data that would stop the run stops
it at once; batches makes the samplers once the micro-batch is chosen.

    data = open_data(cfg, meta_hint)                   # train.py, before the model
    sampler, val_batches = batches(cfg, data, dist_info)
"""

from typing import NamedTuple

from homegpt import sft
from homegpt.dataloader import TokenData, Tokenizer, eval_batches, make_sampler, resolve_data_dir
from homegpt.runtime import print0


class RunData(NamedTuple):
    meta: dict  # what a checkpoint records of the data: tokenizer, vocabulary, an SFT run's prompt template
    train: object  # TokenData of the train split, or the tokenized SFT examples
    val: object  # TokenData of the val split, the tokenized SFT validation examples, or None


def open_data(cfg, meta_hint=None):
    """Every file the run reads, opened and checked: the token files' headers, token counts and lengths
    (each split must hold a window of block_size+1 tokens), or the SFT files read and tokenized.
    meta_hint: the meta the model came with (a fine-tune reads text with its base's tokenizer)."""
    if cfg.sft_train_file:
        return _open_sft(cfg, meta_hint)
    data_dir = resolve_data_dir(cfg.data_dir, cfg.dataset)
    train, val = TokenData(data_dir, "train"), TokenData(data_dir, "val")
    for split in (train, val):  # found now, not at the first evaluation (the CPU recipes': the last step)
        split.check_windows(cfg.block_size)
    print0(f"data: {data_dir}: {train.n_tokens:,} train tokens in {len(train.files)} file(s), "
           f"{val.n_tokens:,} val tokens; sampling={cfg.sampling}")
    # a data_dir without meta.json (e.g. nanoGPT's own folder, holding meta.pkl) keeps the meta the
    # model came with, so that a checkpoint saved from here still decodes its ids
    return RunData(train.meta or meta_hint or {}, train, val)


def _open_sft(cfg, meta_hint):
    tokenizer = Tokenizer(meta_hint or {"tokenizer": "gpt2"})
    template = cfg.sft_template or None
    sft.check_template(template)
    records = sft.read_records(cfg.sft_train_file)
    train, n_cut = sft.tokenize_examples([sft.format_example(r, template) for r in records], tokenizer, cfg.block_size)
    print0(f"sft: {len(train):,} training examples from {cfg.sft_train_file}, {n_cut} truncated to block_size")
    val = None
    if cfg.sft_val_file:
        val, _ = sft.tokenize_examples(sft.load_examples(cfg.sft_val_file, template), tokenizer, cfg.block_size)
    meta = {k: v for k, v in (meta_hint or {"tokenizer": "gpt2", "vocab_size": tokenizer.vocab_size}).items()
            if k != "prompt_template"}  # (a base tuned on other data may carry its own)
    if any("instruction" in r for r in records):  # chat and the judge wrap instructions as training did
        meta["prompt_template"] = sft.prompt_templates(template)
    return RunData(meta, train, val or None)


def batches(cfg, data, dist_info):
    """(train sampler, function yielding the fixed validation batches or None) at cfg.batch_size."""
    if cfg.sft_train_file:
        sampler = sft.SFTSampler(data.train, cfg.batch_size, cfg.block_size, cfg.seed, dist_info.rank,
                                 dist_info.world_size, packing=cfg.sft_packing)
        val = (lambda: sft.sft_eval_batches(data.val, cfg.batch_size, cfg.block_size, cfg.eval_iters)) if data.val else None
        return sampler, val
    vocab = data.train.meta.get("vocab_size") or 50304
    sampler = make_sampler(cfg.sampling, data.train, cfg.batch_size, cfg.block_size, cfg.seed,
                           dist_info.rank, dist_info.world_size, vocab)
    return sampler, lambda: eval_batches(data.val, cfg.batch_size, cfg.block_size, cfg.eval_iters, vocab)
