"""dataloader.py: llm.c shard files on disk, and the samplers that read windows from them.

    python -m pytest -q tests/test_shards.py
"""

import json

import numpy as np
import pytest

from homegpt.dataloader import (HEADER_BYTES, SHARD_MAGIC, RandomSampler, SequentialSampler, TokenData, read_header,
                        write_raw_tokens, write_shard)

BLOCK = 16
LENGTHS = [5 * BLOCK + 1, 3 * BLOCK + 7, 4 * BLOCK + 1]  # 5 + 3 + 4 = 12 non-overlapping windows


@pytest.fixture
def shards(tmp_path):
    """Three train shards whose tokens are their global positions, so a window names itself."""
    start = 0
    for i, n in enumerate(LENGTHS):
        write_shard(tmp_path / f"t_train_{i:06d}.bin", np.arange(start, start + n))
        start += n
    data = TokenData(tmp_path, "train")
    # every window: (first token, the file it lies in)
    windows = [int(sum(LENGTHS[:f])) + w * BLOCK for f, n in enumerate(LENGTHS) for w in range((n - 1) // BLOCK)]
    return data, windows


def _check_rows(x, y, data):
    """Each row is BLOCK+1 consecutive tokens of one file: y is x shifted by one."""
    assert x.shape == y.shape and x.shape[1] == BLOCK and x.dtype == np.int64
    assert np.array_equal(y[:, :-1], x[:, 1:])
    ends = np.cumsum(LENGTHS)
    for row_x, row_y in zip(x, y):
        full = np.concatenate([row_x, row_y[-1:]])
        assert np.array_equal(np.diff(full), np.ones(BLOCK))  # consecutive: never crosses into another file
        f = int(np.searchsorted(ends, full[0], side="right"))
        assert full[-1] < ends[f]


# ----------------------------------------------------------------------------- the shard format

def test_shard_header_round_trip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7, 50256], dtype=np.int64)
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, tokens)
    assert read_header(path) == (HEADER_BYTES, tokens.size)
    head = np.fromfile(path, dtype=np.int32, count=3)
    assert head.tolist() == [SHARD_MAGIC, 1, tokens.size]
    assert path.stat().st_size == HEADER_BYTES + 2 * tokens.size
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: no temp file left
    data = TokenData(tmp_path, "train")
    assert np.array_equal(data.read(0, 0, tokens.size), tokens)
    assert np.array_equal(data.read(0, 2, 3), tokens[2:5])
    with pytest.raises(ValueError, match="does not fit uint16"):
        write_shard(tmp_path / "y_train_000000.bin", [1, 70000])


def test_wrong_magic_or_version_is_refused_with_the_file_named(tmp_path):
    bad = tmp_path / "x_val_000000.bin"
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [12345, 1, 4]
    bad.write_bytes(header.tobytes() + np.arange(4, dtype=np.uint16).tobytes())
    with pytest.raises(ValueError, match=r"x_val_000000\.bin.*not a token shard"):
        read_header(bad)
    header[:3] = [SHARD_MAGIC, 2, 4]
    bad.write_bytes(header.tobytes() + np.arange(4, dtype=np.uint16).tobytes())
    with pytest.raises(ValueError, match=r"x_val_000000\.bin.*version 2"):
        read_header(bad)
    with pytest.raises(ValueError, match=r"x_val_000000\.bin"):
        TokenData(tmp_path, "val")


def test_truncated_body_is_refused_with_the_file_named(tmp_path):
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, np.arange(100))
    path.write_bytes(path.read_bytes()[:-2])  # one token short, as an interrupted copy leaves it
    with pytest.raises(ValueError, match=r"x_train_000000\.bin.*100 tokens.*truncated"):
        read_header(path)
    with pytest.raises(ValueError, match=r"x_train_000000\.bin"):
        TokenData(tmp_path, "train")


def test_files_shorter_than_a_header(tmp_path):
    """Files under 1 KB whose size is not a multiple of 4 once crashed numpy inside read_header."""
    write_raw_tokens(tmp_path / "val.bin", np.arange(51))  # a tiny but valid raw token file
    assert read_header(tmp_path / "val.bin") == (0, 51)
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, np.arange(100))
    path.write_bytes(path.read_bytes()[:10])  # cut inside the header
    with pytest.raises(ValueError, match=r"x_train_000000\.bin"):
        read_header(path)


def test_raw_bin_must_match_meta(tmp_path):
    write_raw_tokens(tmp_path / "train.bin", np.arange(50))
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 65, "train_tokens": 60}))
    with pytest.raises(ValueError, match=r"train\.bin.*50 tokens.*60"):
        TokenData(tmp_path, "train")
    (tmp_path / "train.bin").write_bytes(b"\x00" * 2001)
    with pytest.raises(ValueError, match=r"train\.bin.*odd size"):
        TokenData(tmp_path, "train")


# ----------------------------------------------------------------------------- sequential sampling

def _firsts(x):
    return [int(v) for v in x[:, 0]]


def test_sequential_visits_every_window_once_per_epoch(shards):
    data, windows = shards
    s = SequentialSampler(data, batch_size=3, block_size=BLOCK, seed=7)
    assert s.n_windows == len(windows) == 12
    epochs = []
    for _ in range(2):
        seen = []
        for _ in range(4):  # 4 batches of 3 = one epoch
            x, y = s.next_batch()
            _check_rows(x, y, data)
            seen += _firsts(x)
        assert sorted(seen) == windows  # each window exactly once
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a fresh order each epoch
    assert s.epoch == 2.0


def test_sequential_two_ranks_split_the_windows(shards):
    data, windows = shards
    ranks = [SequentialSampler(data, 2, BLOCK, seed=7, rank=r, world_size=2) for r in range(2)]
    single = SequentialSampler(data, 4, BLOCK, seed=7)
    per_rank = [[], []]
    for _ in range(3):  # 3 steps x 2 ranks x 2 rows = 12 windows = one epoch
        both = []
        for r, s in enumerate(ranks):
            x, y = s.next_batch()
            _check_rows(x, y, data)
            per_rank[r] += _firsts(x)
            both += _firsts(x)
        # together the ranks read what one process with the whole batch reads: resumable on any world size
        assert both == _firsts(single.next_batch()[0])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == windows
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_sequential_resume_mid_epoch_continues_the_same_stream(shards):
    data, _ = shards
    a = SequentialSampler(data, 3, BLOCK, seed=11)
    for _ in range(2):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # the checkpoint stores it as JSON
    b = SequentialSampler(data, 3, BLOCK, seed=11)
    b.load_state_dict(state)
    for _ in range(5):  # through the end of the epoch and into the next
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    other = SequentialSampler(data, 3, BLOCK // 2, seed=11)
    with pytest.raises(ValueError, match="windows"):
        other.load_state_dict(state)  # block_size changed: the cursor would mean other windows


def test_sequential_load_state_after_drawing_uses_the_restored_seed(shards):
    data, _ = shards
    a = SequentialSampler(data, 3, BLOCK, seed=2)
    a.next_batch()
    b = SequentialSampler(data, 3, BLOCK, seed=1)
    b.next_batch()  # caches seed 1's order for epoch 0
    b.load_state_dict(a.state_dict())
    assert np.array_equal(a.next_batch()[0], b.next_batch()[0])


# ----------------------------------------------------------------------------- random sampling

def test_random_sampler_state_round_trip(shards):
    data, _ = shards
    a = RandomSampler(data, 4, BLOCK, seed=3)
    for _ in range(3):
        x, y = a.next_batch()
        _check_rows(x, y, data)
    state = json.loads(json.dumps(a.state_dict()))
    b = RandomSampler(data, 4, BLOCK, seed=999)  # the state carries the stream, whatever the seed
    b.load_state_dict(state)
    for _ in range(3):
        assert np.array_equal(a.next_batch()[0], b.next_batch()[0])
    r0, r1 = (RandomSampler(data, 4, BLOCK, seed=3, rank=r) for r in range(2))
    assert not np.array_equal(r0.next_batch()[0], r1.next_batch()[0])  # each rank its own data
    with pytest.raises(AssertionError):
        b.load_state_dict(SequentialSampler(data, 4, BLOCK, seed=3).state_dict())
