"""Data: the embedded corpus, a byte-level BPE, packed sequences and a sharded sampler.

* **Corpus.** By default Python's own standard-library sources (found through `sysconfig`
  at run time, so nothing is downloaded): real code, a few MB, the same on every machine with
  the same Python. Users may pass `.txt`/`.jsonl`/`.parquet`/`.arrow` files, Hugging Face
  `save_to_disk` folders (pyarrow: the `data` extra) or folders of files, the text chosen by
  `data.text_key`; or a pre-tokenised corpus read as-is (a `.bin` memmap, or a folder written
  by `haillm-prepare`).
* **Cache.** The tokenised corpus is cached in the run folder (`tokens.json` index,
  `tokens.bin`, `tokenizer.json`) under a fingerprint of the inputs (paths, sizes, mtimes, a
  hash of a sample of each file, key, budget, vocabulary, tokenizer): a changed corpus is
  tokenised again. Every node's local rank 0 builds or finds it (`build_dataset_on_nodes`).
* **Tokenizer.** A byte-level BPE trained with Hugging Face `tokenizers` to
  `model.vocab_size`, with one special token `<|endoftext|>` (EOS), cached in the run folder.
* **Packing.** Every document is tokenised, followed by EOS, and all are concatenated into one
  token stream, cut into windows of `seq_len + 1` tokens (inputs and shifted targets). The last
  `val_fraction` of the windows are held out for the validation loss.
* **Sampler.** A seeded permutation per epoch; global step k takes windows
  `[k*G, (k+1)*G)`; data-parallel rank r takes its contiguous slice and micro-batch j a slice of
  that. The same global batch whatever the layout, which is what makes the losses of
  different layouts comparable. Its position (epoch, step in epoch) is its whole state.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from haillm.trainer.config import ConfigError, DataConfig

__all__ = ["EOS", "PackedDataset", "Sampler", "ShardedTokens", "TokenWriter", "build_dataset",
           "build_dataset_on_nodes", "corpus_files", "corpus_fingerprint", "dataset_identity",
           "is_pretokenised", "iter_documents", "load_or_train_tokenizer", "load_tokens",
           "read_documents"]

EOS = "<|endoftext|>"


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # tests, site-packages, vendored packages and generated tables (codec maps, pydoc topics)
    # are not the code we want the model to learn from; pruned while walking (fast)
    skip = {"site-packages", "test", "tests", "idlelib", "encodings", "pydoc_data", "lib2to3",
            "ensurepip", "__pycache__"}
    found = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip]
        found += [Path(d) / n for n in names if n.endswith(".py")]
    files = sorted(found)
    if not files:
        raise ConfigError(f"no Python sources found under {root} for the embedded corpus; "
                          "pass data.corpus=path/to/files")
    return files


CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")
_EXTRA = "pip install 'haillm-trainer[data]' (or: pip install pyarrow)"


def _pyarrow():
    """pyarrow, or a `ConfigError` naming the extra that installs it."""
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError("data.corpus: parquet files and Hugging Face dataset folders need "
                          f"pyarrow, which is not installed: {_EXTRA}") from None
    return pyarrow


def _hf_files(folder: Path) -> list[Path]:
    """The `data-*.arrow` files of a Hugging Face `save_to_disk` folder, in their order."""
    if (folder / "dataset_dict.json").is_file():  # a DatasetDict: one sub-folder per split
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise ConfigError(f"data.corpus: {str(folder)!r} is a DatasetDict without a 'train' "
                              f"split (splits: {', '.join(splits)}); pass "
                              f"data.corpus={folder}/SPLIT")
        return _hf_files(folder / "train")
    state = json.loads((folder / "state.json").read_text())
    names = [d["filename"] for d in state.get("_data_files", [])]
    files = [folder / n for n in names] if names else sorted(folder.glob("data-*.arrow"))
    for f in files:
        if not f.is_file():
            raise ConfigError(f"data.corpus: {str(folder)!r}: state.json lists {f.name}, which "
                              "is missing")
    return files


def _is_hf_folder(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or (
        (p / "state.json").is_file() and (p / "dataset_info.json").is_file())


def is_pretokenised(spec: str) -> bool:
    """True for a corpus read as-is: a `.bin` memmap or a folder written by `haillm-prepare`."""
    p = Path(spec).expanduser()
    return spec.endswith(".bin") or (p.is_dir() and _read_index(p) is not None)


def _user_files(spec: str) -> list[Path]:
    files: list[Path] = []
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        p = Path(part).expanduser()
        if not p.exists():
            raise ConfigError(f"data.corpus: {str(p)!r} does not exist")
        if p.is_dir() and _is_hf_folder(p):
            files += _hf_files(p)
        elif p.is_dir():
            if _read_index(p) is not None:
                raise ConfigError(f"data.corpus: {str(p)!r} is a pre-tokenised corpus "
                                  "(haillm-prepare); it must be the only data.corpus")
            found = sorted(q for q in p.rglob("*") if q.suffix in CORPUS_SUFFIXES
                           and q.is_file() and not q.name.startswith("."))
            if not found:
                raise ConfigError(f"data.corpus: folder {str(p)!r} holds no "
                                  ".txt/.jsonl/.parquet/.arrow files")
            files += found
        elif p.suffix in CORPUS_SUFFIXES:
            files.append(p)
        else:
            raise ConfigError(f"data.corpus: {str(p)!r} is not .txt/.jsonl/.parquet/.arrow/.bin, "
                              "a Hugging Face dataset folder or a haillm-prepare folder")
    return files


def corpus_files(cfg: DataConfig) -> list[Path]:
    """The text files of the corpus, in reading order."""
    return _stdlib_files() if cfg.corpus == "stdlib" else _user_files(cfg.corpus)


def _missing_key(f: Path, where: str, key: str, have: list[str]) -> ConfigError:
    return ConfigError(f"data.text_key: {where} of {str(f)!r} has no {key!r} "
                       f"(it has: {', '.join(map(str, have)) or 'nothing'}); pass "
                       f"--set data.text_key=NAME (haillm-prepare: --text-key NAME)")


def _text(value, f: Path, where: str, key: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ConfigError(f"data.text_key: {key!r} in {where} of {str(f)!r} is a "
                      f"{type(value).__name__}, expected a string")


def _jsonl_docs(f: Path, key: str):
    with f.open(encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"data.corpus: line {n} of {str(f)!r} is not JSON "
                                  f"({e.msg}); expected one JSON object per line") from None
            if not isinstance(row, dict) or key not in row:
                raise _missing_key(f, f"line {n}", key,
                                   list(row) if isinstance(row, dict) else [])
            yield _text(row[key], f, f"line {n}", key)


def _column_docs(f: Path, key: str, batches, names: list[str], types: dict):
    if key not in names:
        raise _missing_key(f, "the table", key, names)
    pa = _pyarrow()
    t = types[key]
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)
            or getattr(pa.types, "is_string_view", lambda _: False)(t)):
        raise ConfigError(f"data.text_key: column {key!r} of {str(f)!r} is {t}, expected a "
                          "string column")
    for batch in batches:
        yield from batch.column(batch.schema.get_field_index(key)).to_pylist()


def _parquet_docs(f: Path, key: str):
    pa = _pyarrow()
    try:
        pf = pa.parquet.ParquetFile(str(f))
    except pa.ArrowException as e:
        raise ConfigError(f"data.corpus: {str(f)!r} is not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    types = {n: schema.field(n).type for n in schema.names}
    yield from _column_docs(f, key, pf.iter_batches(batch_size=1024, columns=[key])
                            if key in types else iter(()), schema.names, types)


def _open_arrow(f: Path):
    """Arrow IPC: the stream format (what `datasets` writes), else the file format."""
    pa = _pyarrow()
    src = pa.memory_map(str(f))
    try:
        return pa.ipc.open_stream(src)
    except pa.ArrowInvalid:
        try:
            return pa.ipc.open_file(pa.memory_map(str(f)))
        except pa.ArrowInvalid as e:
            raise ConfigError(f"data.corpus: {str(f)!r} is not an Arrow IPC stream or file "
                              f"({e})") from None


def _arrow_docs(f: Path, key: str):
    reader = _open_arrow(f)
    schema = reader.schema
    types = {n: schema.field(n).type for n in schema.names}
    batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if hasattr(
        reader, "get_batch") else reader
    yield from _column_docs(f, key, batches, schema.names, types)


def _file_docs(f: Path, key: str):
    if f.suffix == ".jsonl":
        return _jsonl_docs(f, key)
    if f.suffix == ".parquet":
        return _parquet_docs(f, key)
    if f.suffix == ".arrow":
        return _arrow_docs(f, key)
    return iter([f.read_text(encoding="utf-8", errors="replace")])


def _budget(cfg: DataConfig) -> int | None:
    return int(cfg.max_corpus_mb * 2**20) if cfg.max_corpus_mb > 0 else None


def iter_documents(cfg: DataConfig, files: list[Path] | None = None):
    """The corpus one document at a time (streaming), at most `max_corpus_mb` of text.

    `.txt`: one document per file; `.jsonl`: one per line (the `data.text_key` field);
    parquet / arrow / Hugging Face dataset folders: one per row (the `data.text_key` column).
    Null values are skipped. The last document is cut at the budget.
    """
    files = corpus_files(cfg) if files is None else files
    key = cfg.key
    budget = _budget(cfg)
    for f in files:
        for d in _file_docs(f, key):
            if d is None:
                continue
            if budget is not None:
                if budget <= 0:
                    return
                d = d[:budget]
                budget -= len(d)
            yield d


def read_documents(cfg: DataConfig) -> list[str]:
    """The corpus as a list of documents, at most `max_corpus_mb` of text, in a fixed order."""
    return list(iter_documents(cfg))

def load_or_train_tokenizer(docs, vocab_size: int, cache: Path | None):
    """A byte-level BPE with `<|endoftext|>`, trained on `docs` (an iterable of strings), or
    loaded from `cache` when it exists with `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if cache is not None and cache.is_file():
        tok = Tokenizer.from_file(str(cache))
        if tok.get_vocab_size() == vocab_size:
            return tok
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        # a corpus too small to learn vocab_size merges: pad with unused tokens so that the
        # model's vocabulary (and its TP split) stays what the config says
        tok.add_tokens([f"<|unused{i}|>" for i in range(vocab_size - tok.get_vocab_size())])
    if cache is not None:
        _save_tokenizer(tok, cache)
    return tok


class PackedDataset:
    """A token stream cut into windows of `seq_len + 1` tokens.

    Args:
        tokens: 1-D integer array (numpy or memmap) of the packed stream.
        seq_len: tokens per training sequence.
        val_fraction: share of windows held out (taken from the end of the stream).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, val_fraction: float = 0.0):
        self.tokens, self.seq_len = tokens, seq_len
        n = (len(tokens) - 1) // seq_len
        windows = np.arange(n)
        if val_fraction > 0 and n >= 2:
            # every k-th window is held out: the split samples the whole corpus (a tail split
            # would hold out whatever files sort last, e.g. only encoding tables)
            k = max(2, round(1 / val_fraction))
            held = windows % k == k - 1
            self.train_ids, self.val_ids = windows[~held], windows[held]
        else:
            self.train_ids, self.val_ids = windows, windows[:0]
        if len(self.train_ids) < 1:
            raise ConfigError(f"corpus of {len(tokens)} tokens is too small for one sequence of "
                              f"{seq_len} tokens; raise data.max_corpus_mb or lower model.seq_len")
        self.n_train, self.n_val = len(self.train_ids), len(self.val_ids)

    def window(self, index: int) -> torch.Tensor:
        """Window `index` of the whole stream as an int64 tensor of shape (seq_len + 1,)."""
        s = index * self.seq_len
        return torch.from_numpy(np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64))

    def batch(self, indices, *, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, both (len(indices), seq_len) int64; indices count within `split`."""
        ids = self.train_ids if split == "train" else self.val_ids
        w = torch.stack([self.window(int(ids[i])) for i in indices])  # (B, S + 1)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def val_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out inputs and targets (the training windows when nothing is held out)."""
        return self.batch(indices, split="val" if self.n_val else "train")

    def val_indices(self, count: int) -> list[int]:
        """`count` indices into the held-out split (repeated if there are fewer)."""
        return [i % (self.n_val or self.n_train) for i in range(count)]


@dataclass
class Sampler:
    """Deterministic order of training windows; `(epoch, step)` is its whole state.

    Args:
        n: number of training windows.
        global_batch: windows per optimizer step.
        seed: seed of the per-epoch permutations.
    """

    n: int
    global_batch: int
    seed: int
    epoch: int = 0
    step: int = 0

    def _perm(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def next_global(self) -> list[int]:
        """The `global_batch` window indices of the next step (advances the state)."""
        per_epoch = self.n // self.global_batch
        if per_epoch == 0:  # tiny corpus: sample with wrap-around
            base = (self.epoch * 7919 + self.step) * self.global_batch
            self.step += 1
            return [(base + i) % self.n for i in range(self.global_batch)]
        if self.step >= per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        perm = self._perm()
        out = perm[self.step * self.global_batch:(self.step + 1) * self.global_batch].tolist()
        self.step += 1
        return out

    @staticmethod
    def shard(indices: list[int], dp: int, dp_rank: int, microbatches: int) -> list[list[int]]:
        """This DP rank's micro-batches: a contiguous slice of the global batch, cut in M."""
        per_rank = len(indices) // dp
        mine = indices[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        mbs = per_rank // microbatches
        return [mine[j * mbs:(j + 1) * mbs] for j in range(microbatches)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.step, self.seed = sd["epoch"], sd["step"], sd["seed"]


# --------------------------------------------------------------------------- the token cache
# A tokenised corpus is a folder: `tokens.json` (the index), `tokenizer.json` and one or more
# `.bin` shards (the packed token stream, in order; `np.memmap`-able). The in-process cache in
# `<out>` has one shard, `tokens.bin`; `haillm-prepare` writes `tokens-00000.bin`, ... The
# index records the fingerprint of the inputs that made it: a cache is used only when the
# fingerprint of the current inputs equals it, so a changed corpus is re-tokenised.

INDEX = "tokens.json"
FORMAT = "haillm-tokens"
VERSION = 2
_SAMPLE = 64 * 1024  # bytes hashed at the head and at the tail of every input file


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def _reachable(files: list[Path], budget: int | None) -> list[Path]:
    """The files the character budget can reach (a UTF-8 text file of n bytes holds at most n
    characters; compressed parquet has no such bound, so from the first one on all count)."""
    if budget is None:
        return files
    out, total = [], 0
    for f in files:
        out.append(f)
        if f.suffix == ".parquet":
            return files
        total += f.stat().st_size
        if total >= budget:
            break
    return out


def corpus_fingerprint(cfg: DataConfig, vocab_size: int, files: list[Path] | None = None) -> dict:
    """What the tokenised corpus depends on: the input files (paths, sizes, mtimes and a
    SHA-256 of the first and last 64 KiB of each), the text key, the budget, the vocabulary
    size and, when one is given, the tokenizer file's SHA-256."""
    files = _reachable(corpus_files(cfg) if files is None else files, _budget(cfg))
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        with f.open("rb") as fh:
            h.update(fh.read(_SAMPLE))
            if st.st_size > 2 * _SAMPLE:
                fh.seek(st.st_size - _SAMPLE)
                h.update(fh.read(_SAMPLE))
    tok = Path(cfg.tokenizer).expanduser() if cfg.tokenizer else None
    return {"corpus": cfg.corpus, "files": len(files), "inputs_sha256": h.hexdigest(),
            "text_key": cfg.key, "max_corpus_mb": cfg.max_corpus_mb, "vocab_size": vocab_size,
            "tokenizer_sha256": _sha256_file(tok) if tok and tok.is_file() else None,
            "version": VERSION}


def _read_index(folder: Path) -> dict | None:
    p = folder / INDEX
    try:
        idx = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return idx if isinstance(idx, dict) and idx.get("format") == FORMAT else None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def _shards_ok(folder: Path, idx: dict) -> bool:
    item = np.dtype(idx["dtype"]).itemsize
    return all((folder / s["file"]).is_file()
               and (folder / s["file"]).stat().st_size == s["tokens"] * item
               for s in idx["shards"])


class ShardedTokens:
    """The token stream of several `.bin` shards, read as one 1-D array (slices only)."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])
        self.dtype = arrays[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, sl: slice) -> np.ndarray:
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise TypeError("ShardedTokens supports contiguous slices only")
        lo, hi, _ = sl.indices(len(self))
        parts = []
        i = max(0, int(np.searchsorted(self.starts, lo, side="right")) - 1)
        while lo < hi and i < len(self.arrays):
            a, s = self.arrays[i], int(self.starts[i])
            take = a[lo - s:min(hi - s, len(a))]
            parts.append(take)
            lo += len(take)
            i += 1
        return np.concatenate(parts) if len(parts) != 1 else np.asarray(parts[0])

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(self.arrays)
        return out.astype(dtype) if dtype is not None else out

    def max(self) -> int:
        return max(int(a.max()) for a in self.arrays if len(a))


def load_tokens(folder: Path, idx: dict | None = None):
    """The token stream of a tokenised-corpus folder (a memmap, or `ShardedTokens`)."""
    idx = idx or _read_index(folder)
    arrays = [np.memmap(folder / s["file"], dtype=np.dtype(idx["dtype"]), mode="r")
              for s in idx["shards"] if s["tokens"]]
    if not arrays:
        return np.zeros(0, dtype=np.dtype(idx["dtype"]))
    return arrays[0] if len(arrays) == 1 else ShardedTokens(arrays)


class TokenWriter:
    """Appends packed tokens to `.bin` shards in `folder`, then writes the index (atomically:
    shards and index are written under temporary names and renamed when complete)."""

    def __init__(self, folder: Path, dtype, *, shard_tokens: int | None = None,
                 single_name: str | None = "tokens.bin", eos: int | None = None):
        self.folder, self.dtype, self.eos = folder, np.dtype(dtype), eos
        self.shard_tokens, self.single = shard_tokens, single_name
        self.shards: list[dict] = []
        self.tag = f"{socket.gethostname()}-{os.getpid()}"
        self.fh = None
        self.n_tokens = self.n_docs = 0
        self.max_id = -1
        folder.mkdir(parents=True, exist_ok=True)

    def _name(self, i: int) -> str:
        return self.single if (self.single and not self.shard_tokens) else f"tokens-{i:05d}.bin"

    def _open(self):
        name = self._name(len(self.shards))
        self.shards.append({"file": name, "tokens": 0, "documents": 0})
        self.fh = open(self.folder / f".{name}.tmp-{self.tag}", "wb")

    def write(self, tokens: np.ndarray, n_docs: int) -> None:
        """Append `tokens` (the packed stream of `n_docs` documents); a shard is cut at exactly
        `shard_tokens` tokens (its `documents`: the documents that end in it)."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        self.n_tokens += len(tokens)
        self.n_docs += n_docs
        if len(tokens):
            self.max_id = max(self.max_id, int(tokens.max()))
        while True:
            if self.fh is None:
                self._open()
            s = self.shards[-1]
            room = self.shard_tokens - s["tokens"] if self.shard_tokens else len(tokens)
            part, tokens = tokens[:room], tokens[room:]
            self.fh.write(part.tobytes())
            s["tokens"] += len(part)
            ends = int((part == self.eos).sum()) if self.eos is not None else n_docs
            s["documents"] += ends
            n_docs -= ends
            if self.shard_tokens and s["tokens"] >= self.shard_tokens:
                self.fh.close()
                self.fh = None
            if not len(tokens):
                return

    def finish(self, *, tokenizer_sha256: str | None, fingerprint: dict,
               vocab_size: int) -> dict:
        if self.fh is None and not self.shards:
            self._open()
        if self.fh is not None:
            self.fh.close()
        for s in self.shards:
            (self.folder / f".{s['file']}.tmp-{self.tag}").replace(self.folder / s["file"])
        keep = {s["file"] for s in self.shards}
        for old in self.folder.glob("tokens-*.bin"):  # shards of an earlier, longer build
            if old.name not in keep:
                old.unlink(missing_ok=True)
        idx = {"format": FORMAT, "version": VERSION, "dtype": self.dtype.name,
               "n_tokens": self.n_tokens, "n_documents": self.n_docs,
               "max_token_id": self.max_id, "vocab_size": vocab_size,
               "tokenizer": "tokenizer.json", "tokenizer_sha256": tokenizer_sha256,
               "fingerprint": fingerprint, "shards": self.shards,
               "built_by": {"host": socket.gethostname(), "pid": os.getpid(),
                            "time": time.time()}}
        _atomic_write(self.folder / INDEX, json.dumps(idx, indent=1).encode())
        return idx


def _save_tokenizer(tok, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, tok.to_str().encode())
    return _sha256_file(path)


def eos_id(tok, tok_path: Path | None = None) -> int:
    """The id of the token that ends every document: `EOS` (the trainer's BPE), else the
    `eos_token` of a `tokenizer_config.json` beside `tok_path` (a Hugging Face folder's
    tokenizer, e.g. DeepSeek LLM's); `ConfigError` when there is none."""
    i = tok.token_to_id(EOS)
    if i is not None:
        return i
    side = Path(tok_path).parent / "tokenizer_config.json" if tok_path else None
    if side is not None and side.is_file():
        try:
            t = json.loads(side.read_text(encoding="utf-8")).get("eos_token")
        except ValueError:
            t = None
        t = t.get("content") if isinstance(t, dict) else t
        if isinstance(t, str) and tok.token_to_id(t) is not None:
            return tok.token_to_id(t)
    raise ConfigError(f"data.tokenizer: {str(tok_path)!r} has no end-of-document token "
                      f"({EOS!r}, or an eos_token in a tokenizer_config.json beside it)")


def _encode(tok, docs: list[str], eos: int, dtype) -> np.ndarray:
    """The packed tokens of `docs`: each document's ids, then EOS."""
    parts = []
    for enc in tok.encode_batch(docs):
        parts.append(np.asarray(enc.ids, dtype=dtype))
        parts.append(np.asarray([eos], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _chunks(docs, max_docs: int = 256, max_chars: int = 1 << 18):
    """Consecutive groups of documents, of at most `max_docs` documents or ~`max_chars`."""
    chunk, size = [], 0
    for d in docs:
        chunk.append(d)
        size += len(d)
        if len(chunk) >= max_docs or size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _log(msg: str) -> None:
    print(f"haillm: data: {msg}", file=sys.stderr, flush=True)


def _read_pretokenised(cfg: DataConfig, vocab_size: int, seq_len: int):
    p = Path(cfg.corpus).expanduser()
    if p.suffix == ".bin":
        if not p.is_file():
            raise ConfigError(f"data.corpus: {str(p)!r} does not exist")
        tokens = np.memmap(p, dtype=np.dtype(cfg.bin_dtype), mode="r")
        top = int(tokens.max()) if len(tokens) else -1
        tok_file = Path(cfg.tokenizer).expanduser() if cfg.tokenizer else None
    else:
        idx = _read_index(p)
        if not _shards_ok(p, idx):
            raise ConfigError(f"data.corpus: the pre-tokenised corpus {str(p)!r} is incomplete "
                              f"(a shard listed in {INDEX} is missing or truncated); run "
                              "haillm-prepare again")
        tokens = load_tokens(p, idx)
        top = idx["max_token_id"]
        tok_file = Path(cfg.tokenizer).expanduser() if cfg.tokenizer else p / idx["tokenizer"]
        if cfg.tokenizer and idx.get("tokenizer_sha256") and tok_file.is_file() and (
                _sha256_file(tok_file) != idx["tokenizer_sha256"]):
            raise ConfigError(f"data.tokenizer: {str(tok_file)!r} is not the tokenizer that "
                              f"tokenised {str(p)!r}; leave data.tokenizer empty to use "
                              f"{p / idx['tokenizer']}")
    if top >= vocab_size:
        raise ConfigError(f"{p}: token id {top} >= model.vocab_size ({vocab_size})")
    tok = None
    if tok_file is not None:
        if not tok_file.is_file():
            raise ConfigError(f"data.tokenizer: {str(tok_file)!r} does not exist")
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tok_file))
    return PackedDataset(tokens, seq_len, cfg.val_fraction), tok


def _find_cache(cfg: DataConfig, vocab_size: int, out: Path, tok_path: Path,
                fingerprint: dict) -> tuple[dict | None, str]:
    """The index of a valid cache in `out` (or None) and, if not, why not."""
    idx = _read_index(out)
    if idx is None:
        return None, "no tokenised corpus yet"
    if idx.get("fingerprint") != fingerprint:
        return None, (f"the inputs changed since {out / INDEX} was written (corpus files, "
                      "sizes, mtimes or contents, text key, budget, vocabulary or tokenizer)")
    if not tok_path.is_file() or _sha256_file(tok_path) != idx.get("tokenizer_sha256"):
        return None, f"{tok_path} is not the tokenizer that tokenised the cache"
    if not _shards_ok(out, idx):
        return None, "a shard of the cache is missing or truncated"
    return idx, ""


def _tokenizer_for(cfg: DataConfig, vocab_size: int, out: Path | None, tok_path: Path | None,
                   docs):
    """The tokenizer to tokenise with: the configured file, the run's own (kept when the run
    folder holds checkpoints, whose model was trained with it), or a new one trained on
    `docs`."""
    from tokenizers import Tokenizer

    if cfg.tokenizer and tok_path.is_file():
        tok = Tokenizer.from_file(str(tok_path))
        # fewer tokens than embedding rows is fine (DeepSeek LLM pads 100015 to 102400)
        if tok.get_vocab_size() > vocab_size:
            raise ConfigError(f"data.tokenizer: {str(tok_path)!r} has {tok.get_vocab_size()} "
                              f"tokens, more than model.vocab_size ({vocab_size})")
        return tok
    if (tok_path is not None and tok_path.is_file() and out is not None
            and any((out / "checkpoints").glob("step_*"))):
        tok = Tokenizer.from_file(str(tok_path))
        if tok.get_vocab_size() == vocab_size:
            _log(f"keeping the run's tokenizer {tok_path} (the checkpoints in {out} use it)")
            return tok
    return load_or_train_tokenizer(docs, vocab_size, None)


def build_dataset(cfg: DataConfig, vocab_size: int, seq_len: int, out: Path | None,
                  *, is_writer: bool = True):
    """The packed dataset and its tokenizer (None for a `.bin` corpus without a tokenizer).

    A pre-tokenised corpus (a `.bin` memmap, or a `haillm-prepare` folder) is read as-is.
    Otherwise the corpus is tokenised into `out` (`tokens.json`, `tokens.bin`,
    `tokenizer.json`), or found there when the fingerprint of the inputs matches; a changed
    corpus is re-tokenised. Only a writer (every node's local rank 0) builds; the others call
    this after a barrier with `is_writer=False` and read the cache.
    """
    if is_pretokenised(cfg.corpus):
        return _read_pretokenised(cfg, vocab_size, seq_len)
    dtype = _token_dtype(vocab_size)
    files = corpus_files(cfg)
    if out is None:  # nothing to cache into: tokenise in memory
        docs = list(iter_documents(cfg, files))
        tok = _tokenizer_for(cfg, vocab_size, None,
                             Path(cfg.tokenizer).expanduser() if cfg.tokenizer else None, docs)
        tokens = _encode(tok, docs, eos_id(tok, cfg.tokenizer or None), dtype)
        return PackedDataset(tokens, seq_len, cfg.val_fraction), tok
    out = Path(out)
    tok_path = Path(cfg.tokenizer).expanduser() if cfg.tokenizer else out / "tokenizer.json"
    fp = corpus_fingerprint(cfg, vocab_size, files)
    idx, why = _find_cache(cfg, vocab_size, out, tok_path, fp)
    if idx is None:
        if not is_writer:
            raise RuntimeError(f"the tokenised corpus cache in {out} is missing or out of date "
                               f"({why}); this node's local rank 0 builds it before the other "
                               "ranks read it")
        if _read_index(out) is not None:
            _log(f"re-tokenising the corpus into {out}: {why}")
        docs = list(iter_documents(cfg, files))
        tok = _tokenizer_for(cfg, vocab_size, out, tok_path, docs)
        if cfg.tokenizer and tok_path.is_file():
            sha = _sha256_file(tok_path)
        else:  # trained here (data.tokenizer naming a missing file: trained and saved there)
            sha = _save_tokenizer(tok, tok_path)
        if cfg.tokenizer:
            fp["tokenizer_sha256"] = sha
        eos = eos_id(tok, tok_path)
        w = TokenWriter(out, dtype, eos=eos)
        for chunk in _chunks(docs):
            w.write(_encode(tok, chunk, eos, dtype), len(chunk))
        idx = w.finish(tokenizer_sha256=sha, fingerprint=fp, vocab_size=vocab_size)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tok_path))
    return PackedDataset(load_tokens(out, idx), seq_len, cfg.val_fraction), tok


def dataset_identity(ds: PackedDataset, tok) -> str:
    """A short digest of the token stream (length, head and tail) and of the tokenizer."""
    t = ds.tokens
    n = len(t)
    h = hashlib.sha256(f"{n}\0".encode())
    h.update(np.asarray(t[0:min(n, 4096)]).astype(np.int64).tobytes())
    h.update(np.asarray(t[max(0, n - 4096):n]).astype(np.int64).tobytes())
    if tok is not None:
        h.update(tok.to_str().encode())
    return h.hexdigest()[:16]


def build_dataset_on_nodes(cfg: DataConfig, vocab_size: int, seq_len: int, out: Path | None):
    """`build_dataset` in every rank of a job, without a shared filesystem.

    Every node's local rank 0 (`LOCAL_RANK`, set by torchrun) builds or finds the cache in
    its own `out`; the other ranks wait at a barrier, then read their node's cache. Finally
    all ranks compare `dataset_identity`: nodes that tokenised different corpora (another
    corpus file on one node) stop with an error instead of training on different data.
    """
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not on:
        return build_dataset(cfg, vocab_size, seq_len, out)
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if local_rank == 0:
        ds, tok = build_dataset(cfg, vocab_size, seq_len, out)
    dist.barrier()
    if local_rank != 0:
        ds, tok = build_dataset(cfg, vocab_size, seq_len, out, is_writer=False)
    mine = (socket.gethostname(), str(out), dataset_identity(ds, tok))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if len({e[2] for e in every}) > 1:
        lines = "; ".join(f"rank {r} ({h}, {o}): {d}" for r, (h, o, d) in enumerate(every))
        raise RuntimeError("the ranks hold different tokenised corpora (each node tokenises "
                           "its own copy of data.corpus: are the files the same on every "
                           f"node?): {lines}")
    return ds, tok
