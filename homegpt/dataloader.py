"""
Token files on disk and the batches drawn from them.

    from homegpt.dataloader import TokenData, RandomSampler
    train = TokenData("data/shakespeare_char", "train")
    x, y = RandomSampler(train, batch_size=12, block_size=64, seed=1337).next_batch()

Two on-disk formats, both uint16 tokens:
- nanoGPT's `train.bin` / `val.bin`: raw tokens, no header; meta.json beside them records the token
  counts so that a truncated file is caught.
- llm.c / modded-nanogpt shards `*_train_NNNNNN.bin` / `*_val_NNNNNN.bin`: a header of 256 int32
  (magic 20240520, version 1, token count) then the tokens. Shards published for those projects
  train here as they are.

Reading: every read opens a fresh memmap and copies out a bounded slice. One long-lived memmap read
at random offsets makes the process's RSS grow towards the whole file: every page it has touched
stays mapped into the process, and a long run touches nearly all of them.
Samplers keep their position in a small JSON-able state so a resumed run continues exactly.
"""

import json
import re
from pathlib import Path

import numpy as np

from homegpt.errors import MissingFile, UserError
from homegpt.fileio import atomic_write

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.uint16  # GPT-2's 50257 ids fit; a larger vocab needs another format


# GPT-2's BPE ranks, shipped in the checkout (OpenAI's published vocabulary, MIT; see assets/README.md):
# byte-identical to tiktoken's r50k_base, whose own download is checked against the same sha256
GPT2_RANKS = Path(__file__).resolve().parents[1] / "assets" / "r50k_base.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
_GPT2 = None


def gpt2_encoding():
    """tiktoken's GPT-2 BPE (50,257 ids, <|endoftext|> = 50256), built from the ranks file in assets/.

    The same ranks tiktoken.get_encoding("gpt2") downloads, read from the checkout instead: no
    network, no cache directory to set up, and the same ids everywhere. tiktoken checks the hash."""
    global _GPT2
    if _GPT2 is None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenisation regex
        if not GPT2_RANKS.is_file():
            raise MissingFile(f"{GPT2_RANKS}: GPT-2's BPE ranks are missing from the checkout; "
                                    f"restore them with git checkout -- assets/")
        ranks = load_tiktoken_bpe(str(GPT2_RANKS), expected_hash=GPT2_RANKS_SHA256)
        _GPT2 = tiktoken.Encoding(name="r50k_base", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                  special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    return _GPT2


class Tokenizer:
    """encode/decode for a prepared dataset's meta.json: {"tokenizer": "char", "itos": [...]} or "gpt2"."""

    def __init__(self, meta):
        kind = (meta or {}).get("tokenizer", "gpt2")
        self.kind = kind
        if kind == "char":
            itos = meta["itos"]
            stoi = {ch: i for i, ch in enumerate(itos)}
            self.vocab_size, self.eot = len(itos), None
            self.encode = lambda s: [stoi[c] for c in s if _known(c, stoi)]
            self.decode = lambda ids: "".join(itos[i] for i in ids)
        elif kind == "gpt2":
            enc = gpt2_encoding()
            self.vocab_size, self.eot = enc.n_vocab, enc.eot_token
            self.encode = enc.encode_ordinary
            self.decode = enc.decode
        else:
            raise UserError(f"unknown tokenizer {kind!r} in meta.json: expected 'char' or 'gpt2'")


def _known(c, stoi):
    if c not in stoi:
        raise UserError(f"character {c!r} is not in the dataset's vocabulary; use characters of the training text")
    return True


# ----------------------------------------------------------------------------- the file formats

def write_shard(path, tokens):
    """Write tokens as an llm.c shard, atomically: a crash leaves either no file or the whole file."""
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) > np.iinfo(TOKEN_DTYPE).max:
        raise UserError(f"token id {int(tokens.max())} does not fit uint16 shards (vocab too large)")
    atomic_write(path, [shard_header(tokens.size).tobytes(), memoryview(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE))])


def shard_header(n_tokens):
    """The 256-int32 header of an llm.c shard holding n_tokens."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, n_tokens
    return header


def write_raw_tokens(path, tokens):
    """Write nanoGPT's raw uint16 token file, atomically."""
    atomic_write(path, [memoryview(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE))])


def read_header(path):
    """(offset in bytes, token count) of a token file; raises ValueError naming the file on any damage."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
        head = np.frombuffer(raw[:len(raw) // 4 * 4], dtype=np.int32)
    if head.size >= 3 and head[0] == SHARD_MAGIC:
        if head[1] != SHARD_VERSION:
            raise UserError(f"{path}: shard version {head[1]}, expected {SHARD_VERSION}")
        n = int(head[2])
        if size != HEADER_BYTES + 2 * n:
            raise UserError(f"{path}: header says {n:,} tokens ({HEADER_BYTES + 2 * n:,} bytes) but the file "
                             f"has {size:,} bytes: truncated or corrupted, prepare it again")
        return HEADER_BYTES, n
    if "_train_" in path.name or "_val_" in path.name:
        raise UserError(f"{path}: not a token shard (magic {int(head[0]) if head.size else None}, "
                         f"expected {SHARD_MAGIC}); prepare the dataset again")
    if size % 2:
        raise UserError(f"{path}: odd size {size:,} bytes for uint16 tokens: truncated, prepare it again")
    return 0, size // 2


CHECKOUT = Path(__file__).resolve().parents[1]


def resolve_data_dir(data_dir, dataset):
    """The prepared dataset a run reads: data_dir, else data/<dataset>. A relative path is looked up in
    the working directory first, then in the checkout (where the data/*/prepare.py scripts write), so
    the commands work from any directory."""
    path = Path(data_dir or Path("data") / dataset)
    if path.is_absolute() or path.exists() or not (CHECKOUT / path).exists():
        return path
    return CHECKOUT / path




def load_meta(data_dir):
    """meta.json of a prepared dataset, or {} when there is none."""
    p = Path(data_dir) / "meta.json"
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON ({e}); prepare the dataset again") from e


def prepare_command(data_dir):
    """The command that prepares data_dir, for the "no tokens" error; it depends on data_dir alone.

    data/<name>/ with its own prepare.py -> python data/<name>/prepare.py. A directory inside
    data/fineweb/ that its prepare.py named (default_out_dir there: <dataset>[_<sample>][_<budget>],
    e.g. fineweb-edu_10BT_3.26e9) -> the prepare.py call that writes it again; chinchilla:<params>
    budgets are written as the token count they came to, which names the same directory.
    """
    d = Path(data_dir)
    if (d / "prepare.py").is_file():
        if d.name == "fineweb":  # it writes one subdirectory per dataset and budget, not data/fineweb itself
            return (f"python {d / 'prepare.py'} --dataset=fineweb-edu --sample=10BT, then "
                    f"data_dir=<the directory it prints>")
        return f"python {d / 'prepare.py'}"
    script = d.parent / "prepare.py"
    if d.parent.name == "fineweb" and script.is_file():
        parts = d.name.split("_")
        budget = parts.pop() if len(parts) > 1 and re.fullmatch(r"\d+(\.\d+)?(e\d+)?", parts[-1]) else ""
        tokens = f" --tokens={budget}" if budget else ""
        if parts[0] in ("fineweb", "fineweb-edu"):
            return f"python {script} --dataset={parts[0]} --sample={'_'.join(parts[1:]) or repr('')}{tokens}"
        if parts[0].startswith("local-"):  # named after a hash of the glob, which cannot be recovered
            return f"python {script} --data_files=<the same glob as before>{tokens}"
        return f"python {script} --dataset=<fineweb or fineweb-edu> (or --data_files=...) --out_dir={d}"
    return ("the prepare.py of its dataset (e.g. python data/shakespeare_char/prepare.py), "
            "or point data_dir at a prepared directory")


class TokenData:
    """The token files of one split of a prepared dataset directory, validated on open."""

    def __init__(self, data_dir, split):
        data_dir = Path(data_dir)
        self.split = split
        raw = data_dir / f"{split}.bin"
        files = [raw] if raw.exists() else sorted(data_dir.glob(f"*_{split}_*.bin"))
        if not files:
            raise MissingFile(
                f"no '{split}' tokens in {data_dir}: expected {split}.bin or *_{split}_NNNNNN.bin shards. "
                f"Prepare the dataset first: {prepare_command(data_dir)}")
        self.meta = load_meta(data_dir)
        self.files, self.offsets, self.lengths = [], [], []
        for f in files:
            offset, n = read_header(f)
            if n == 0:
                raise UserError(f"{f}: holds no tokens; prepare the dataset again")
            self.files.append(f)
            self.offsets.append(offset)
            self.lengths.append(n)
        expected = self.meta.get(f"{split}_tokens")
        if expected is not None and expected != sum(self.lengths):
            where = raw if raw.exists() else f"{data_dir} ({len(files)} {split} shards)"
            raise UserError(f"{where}: {sum(self.lengths):,} tokens but meta.json records {expected:,}: "
                             f"truncated, missing shards or from another preparation; run prepare.py again")
        self.vocab_size = self.meta.get("vocab_size")
        self.n_tokens = sum(self.lengths)

    def read(self, file_idx, start, length):
        """A copy of tokens [start, start+length) of one file as int64."""
        return self.read_windows(file_idx, [start], length)[0]

    def read_windows(self, file_idx, starts, length):
        """Copies of tokens [s, s+length) for each s in starts of one file, as int64 (len(starts), length).
        One fresh memmap per call, dropped at the end (a memmap kept open grows the process's resident
        memory over a long run), and one per call rather than one per window: opening a memmap costs
        far more host time than copying a window out of it, and every step of a small model on a GPU
        waits for that time."""
        m = np.memmap(self.files[file_idx], dtype=TOKEN_DTYPE, mode="r",
                      offset=self.offsets[file_idx], shape=(self.lengths[file_idx],))
        out = np.empty((len(starts), length), dtype=np.int64)
        for i, s in enumerate(starts):
            out[i] = m[s:s + length]
        del m
        return out

    def check_windows(self, block_size):
        """Refuse a split none of whose files holds a window of block_size+1 tokens: nothing could be
        sampled or evaluated from it (a short file among longer ones is only skipped)."""
        if all(n < block_size + 1 for n in self.lengths):
            raise UserError(f"every '{self.split}' token file is shorter than block_size+1 = {block_size + 1} tokens "
                            f"({self.n_tokens:,} tokens in {[str(f) for f in self.files[:3]]}): use a smaller "
                            f"block_size, or prepare more data")

    def check_vocab(self, vocab_size):
        if self.vocab_size is not None and self.vocab_size > vocab_size:
            raise UserError(f"the dataset's vocab_size {self.vocab_size} (meta.json) exceeds the model's "
                             f"{vocab_size}: the data was prepared with another tokenizer")


# ----------------------------------------------------------------------------- samplers

class _Sampler:
    """Common part: turn a list of (file, start) windows into (x, y) int64 arrays of (B, T)."""

    def __init__(self, data, batch_size, block_size, vocab_size=None):
        self.data, self.batch_size, self.block_size, self.vocab_size = data, batch_size, block_size, vocab_size
        data.check_windows(block_size)

    def _batch(self, windows):
        buf = np.empty((len(windows), self.block_size + 1), dtype=np.int64)  # (B, T+1)
        by_file = {}
        for row, (f, s) in enumerate(windows):
            by_file.setdefault(f, []).append((row, s))
        for f, items in by_file.items():
            rows, starts = zip(*items)
            buf[list(rows)] = self.data.read_windows(f, starts, self.block_size + 1)
        if self.vocab_size is not None and int(buf.max()) >= self.vocab_size:
            raise UserError(f"token id {int(buf.max())} in {self.data.files[windows[0][0]].parent} is >= the "
                             f"model's vocab_size {self.vocab_size}: data and model use different tokenizers")
        return buf[:, :-1], buf[:, 1:]


class RandomSampler(_Sampler):
    """nanoGPT's sampling: windows at uniformly random offsets (files weighted by their length)."""

    def __init__(self, data, batch_size, block_size, seed, rank=0, vocab_size=None):
        super().__init__(data, batch_size, block_size, vocab_size)
        self.starts = np.array([max(n - block_size, 0) for n in data.lengths], dtype=np.float64)
        self.rng = np.random.default_rng([seed, rank])  # each rank its own stream: different data

    def next_batch(self):
        fidx = self.rng.choice(len(self.starts), size=self.batch_size, p=self.starts / self.starts.sum())
        offs = [int(self.rng.integers(self.starts[f])) for f in fidx]
        return self._batch(list(zip(fidx.tolist(), offs)))

    def state_dict(self):
        return {"kind": "random", "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        assert state["kind"] == "random", f"cannot resume a {state['kind']} sampler as a random one"
        self.rng.bit_generator.state = state["rng"]


class EpochOrder:
    """Position g of an endless stream of epochs -> the index of an item among n: each epoch is a
    seeded permutation of all n, a new one per epoch. Shared by every sampler that visits each item
    once per epoch (token windows here, SFT examples in sft.py)."""

    def __init__(self, n, seed):
        self.n, self.seed = n, seed
        self._epoch, self._perm = None, None

    def __call__(self, g):
        epoch, i = divmod(g, self.n)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[i])


class SequentialSampler(_Sampler):
    """Every non-overlapping window once per epoch, in a seeded order that changes each epoch.

    The position is one global counter of windows consumed by all ranks together; rank r of W takes
    windows [cursor + r*B, cursor + (r+1)*B), so ranks read disjoint windows and a run can resume on
    another world size.
    """

    def __init__(self, data, batch_size, block_size, seed, rank=0, world_size=1, vocab_size=None):
        super().__init__(data, batch_size, block_size, vocab_size)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        per_file = [max((n - 1) // block_size, 0) for n in data.lengths]
        self.first = np.concatenate([[0], np.cumsum(per_file)]).astype(np.int64)  # window index of each file
        self.n_windows = int(self.first[-1])
        self.cursor = 0
        self.order = EpochOrder(self.n_windows, seed)

    def _window(self, g):
        w = self.order(g)
        f = int(np.searchsorted(self.first, w, side="right") - 1)
        return f, (w - int(self.first[f])) * self.block_size

    def next_batch(self):
        base = self.cursor + self.rank * self.batch_size
        windows = [self._window(base + j) for j in range(self.batch_size)]
        self.cursor += self.world_size * self.batch_size
        return self._batch(windows)

    @property
    def epoch(self):
        return self.cursor / self.n_windows

    def state_dict(self):
        return {"kind": "sequential", "cursor": self.cursor, "seed": self.seed, "n_windows": self.n_windows}

    def load_state_dict(self, state):
        assert state["kind"] == "sequential", f"cannot resume a {state['kind']} sampler as a sequential one"
        if state["n_windows"] != self.n_windows:
            raise UserError(f"the dataset has {self.n_windows} windows but the checkpoint's sampler had "
                             f"{state['n_windows']}: the data or block_size changed since the checkpoint")
        self.cursor, self.seed = state["cursor"], state["seed"]
        self.order = EpochOrder(self.n_windows, self.seed)  # the order of an epoch depends on the restored seed


def make_sampler(kind, data, batch_size, block_size, seed, rank=0, world_size=1, vocab_size=None):
    if kind == "random":
        return RandomSampler(data, batch_size, block_size, seed, rank, vocab_size)
    if kind == "sequential":
        return SequentialSampler(data, batch_size, block_size, seed, rank, world_size, vocab_size)
    raise UserError(f"sampling must be 'random' or 'sequential', got {kind!r}")


def eval_batches(data, batch_size, block_size, max_batches=0, vocab_size=None):
    """The fixed evaluation set: consecutive non-overlapping windows from the start of the split, in
    file order, the first max_batches batches of them (all when max_batches <= 0). The same weights
    always give the same number, and every run is measured on the same tokens."""
    sampler = _Sampler(data, batch_size, block_size, vocab_size)
    windows = _eval_windows(data, batch_size, block_size, max_batches)
    for i in range(0, len(windows), batch_size):
        yield sampler._batch(windows[i:i + batch_size])


def count_eval_batches(data, batch_size, block_size, max_batches=0):
    """How many batches eval_batches yields with these arguments (a progress bar's total)."""
    return -(-len(_eval_windows(data, batch_size, block_size, max_batches)) // batch_size)


def _eval_windows(data, batch_size, block_size, max_batches):
    """(file index, start) of each window eval_batches reads, in order."""
    windows = [(f, s) for f, n in enumerate(data.lengths) for s in range(0, n - block_size, block_size)]
    return windows[:max_batches * batch_size] if max_batches > 0 else windows


def to_device(arrays, device):
    """numpy batches -> int64 tensors on the device; pinned and non-blocking on CUDA."""
    import torch  # here only: data preparation workers need numpy, not torch's start-up and memory
    out = []
    for a in arrays:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if device.type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
        else:
            t = t.to(device)
        out.append(t)
    return out
