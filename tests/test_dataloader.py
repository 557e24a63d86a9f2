"""nanoGPT-style token files: the Shakespeare split, batches, and bad files refused with the file named."""

import json

import numpy as np
import pytest

from homegpt.dataloader import RandomSampler, TokenData, Tokenizer, eval_batches, write_raw_tokens
from helpers import SHAKESPEARE, char_dataset


def test_shakespeare_char_split_matches_nanogpt(tmp_path):
    char_dataset(tmp_path, n_chars=10 ** 9)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["vocab_size"] == 65 and len(meta["itos"]) == 65
    assert TokenData(tmp_path, "train").n_tokens == 1_003_854
    assert TokenData(tmp_path, "val").n_tokens == 111_540
    tok = Tokenizer(meta)
    text = SHAKESPEARE.read_text()
    assert tok.decode(TokenData(tmp_path, "train").read(0, 0, 200).tolist()) == text[:200]


def _dataset(tmp_path, tokens, vocab=10, **meta):
    write_raw_tokens(tmp_path / "train.bin", tokens)
    write_raw_tokens(tmp_path / "val.bin", tokens)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": vocab, "tokenizer": "char",
                                                    "itos": [str(i) for i in range(vocab)]} | meta))
    return tmp_path


def test_batches_are_shifted_windows(tmp_path):
    data = TokenData(_dataset(tmp_path, np.arange(100) % 10), "train")
    x, y = RandomSampler(data, batch_size=4, block_size=8, seed=0).next_batch()
    assert x.shape == y.shape == (4, 8) and x.dtype == np.int64
    assert np.array_equal(y[:, :-1], x[:, 1:])
    assert np.array_equal((x[:, 0] + 1) % 10, y[:, 0])


def test_eval_batches_are_fixed_and_cover_the_split(tmp_path):
    data = TokenData(_dataset(tmp_path, np.arange(1000) % 10), "val")
    a = list(eval_batches(data, 4, 16))
    b = list(eval_batches(data, 4, 16))
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(a, b))
    assert sum(x.shape[0] for x, _ in a) == (1000 - 1) // 16  # every full window once
    assert len(list(eval_batches(data, 4, 16, max_batches=2))) == 2


def test_truncated_file_is_refused(tmp_path):
    _dataset(tmp_path, np.arange(100) % 10, train_tokens=100)
    (tmp_path / "train.bin").write_bytes((tmp_path / "train.bin").read_bytes()[:150])
    with pytest.raises(ValueError, match="train.bin: 75 tokens but meta.json records 100"):
        TokenData(tmp_path, "train")
    (tmp_path / "train.bin").write_bytes(b"\x00" * 151)
    with pytest.raises(ValueError, match="train.bin: odd size"):
        TokenData(tmp_path, "train")


def test_empty_and_missing_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        TokenData(tmp_path, "train")
    _dataset(tmp_path, np.arange(100) % 10)
    (tmp_path / "val.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="val.bin: holds no tokens"):
        TokenData(tmp_path, "val")


def test_missing_tokens_name_the_datasets_own_prepare_command(tmp_path):
    # train.py's first error on a fresh checkout: it must name the command for *this* dataset
    data = tmp_path / "data"
    (data / "mine").mkdir(parents=True)
    (data / "mine" / "prepare.py").write_text("")
    (data / "fineweb").mkdir()
    (data / "fineweb" / "prepare.py").write_text("")
    cases = {
        data / "mine": f"python {data / 'mine' / 'prepare.py'}",
        data / "fineweb" / "fineweb-edu_10BT": f"python {data / 'fineweb' / 'prepare.py'} --dataset=fineweb-edu --sample=10BT",
        data / "fineweb" / "fineweb-edu_10BT_3.26e9":
            f"python {data / 'fineweb' / 'prepare.py'} --dataset=fineweb-edu --sample=10BT --tokens=3.26e9",
        data / "fineweb" / "fineweb_3.2e9": f"python {data / 'fineweb' / 'prepare.py'} --dataset=fineweb --sample='' --tokens=3.2e9",
        data / "fineweb" / "local-corpus-1a2b3c":
            f"python {data / 'fineweb' / 'prepare.py'} --data_files=<the same glob as before>",
        data / "fineweb": f"python {data / 'fineweb' / 'prepare.py'} --dataset=fineweb-edu --sample=10BT, "
                          f"then data_dir=<the directory it prints>",
        tmp_path / "elsewhere": "the prepare.py of its dataset",
    }
    for data_dir, command in cases.items():
        with pytest.raises(FileNotFoundError) as e:
            TokenData(data_dir, "val")
        msg = str(e.value)
        assert f"no 'val' tokens in {data_dir}:" in msg and f"Prepare the dataset first: {command}" in msg
        if data_dir != tmp_path / "elsewhere":  # only the generic hint falls back on an example
            assert "shakespeare_char" not in msg


def test_tokens_outside_the_model_vocab_are_refused(tmp_path):
    data = TokenData(_dataset(tmp_path, np.arange(100)), "train")  # ids up to 99
    with pytest.raises(ValueError, match="token id 9\\d in .* is >= the model's vocab_size 50"):
        for _ in range(10):
            RandomSampler(data, batch_size=8, block_size=16, seed=0, vocab_size=50).next_batch()
    with pytest.raises(ValueError, match="exceeds the model's 5"):
        data.check_vocab(5)


def test_block_larger_than_data_is_refused(tmp_path):
    data = TokenData(_dataset(tmp_path, np.arange(10)), "train")
    with pytest.raises(ValueError, match="shorter than block_size"):
        RandomSampler(data, batch_size=2, block_size=64, seed=0)


def test_memmap_reads_do_not_keep_the_file_mapped(tmp_path):
    data = TokenData(_dataset(tmp_path, np.arange(100_000) % 10), "train")
    sampler = RandomSampler(data, batch_size=4, block_size=64, seed=0)
    for _ in range(50):
        sampler.next_batch()
    maps = open("/proc/self/maps").read() if __import__("os").path.exists("/proc/self/maps") else ""
    # each read maps, copies, unmaps: a map kept open would grow RSS towards the whole file
    assert str(tmp_path / "train.bin") not in maps


def test_gpt2_bpe_works_offline_from_the_checkout(monkeypatch):
    """GPT-2 BPE needs no download and no cache directory: every network read fails here."""
    import tiktoken.load
    from homegpt import dataloader

    def offline(url):
        if "://" in url:
            raise OSError("network unreachable")
        with open(url, "rb") as f:
            return f.read()

    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setattr(dataloader, "_GPT2", None)  # build it afresh under the patch
    enc = dataloader.gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257


def test_damaged_bpe_ranks_are_refused(tmp_path, monkeypatch):
    from homegpt import dataloader
    bad = tmp_path / "r50k_base.tiktoken"
    bad.write_bytes(dataloader.GPT2_RANKS.read_bytes()[:-100])
    monkeypatch.setattr(dataloader, "GPT2_RANKS", bad)
    monkeypatch.setattr(dataloader, "_GPT2", None)
    with pytest.raises(ValueError, match="[Hh]ash mismatch"):
        dataloader.gpt2_encoding()
    monkeypatch.setattr(dataloader, "GPT2_RANKS", tmp_path / "missing.tiktoken")
    with pytest.raises(FileNotFoundError, match="git checkout -- assets/"):
        dataloader.gpt2_encoding()
