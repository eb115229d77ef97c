"""Data: the embedded corpus, a byte-level BPE, packed sequences and a sharded sampler.

* **Corpus.** By default Python's own standard-library sources (found through `sysconfig`
  at run time, so nothing is downloaded): real code, a few MB, the same on every machine with
  the same Python. Users may pass `.txt`/`.jsonl` files (or folders of them) or one
  pre-tokenised `.bin` memmap.
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

import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from haillm.trainer.config import ConfigError, DataConfig

__all__ = ["EOS", "PackedDataset", "Sampler", "build_dataset", "load_or_train_tokenizer",
           "read_documents"]

EOS = "<|endoftext|>"


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        # tests and site-packages are not "the standard library" we want to learn from
        # tests, vendored packages and generated tables (codec maps, pydoc topics) are not
        # the code we want the model to learn from
        if set(rel) & {"site-packages", "test", "tests", "idlelib", "encodings", "pydoc_data",
                       "lib2to3", "ensurepip", "__pycache__"}:
            continue
        files.append(p)
    if not files:
        raise ConfigError(f"no Python sources found under {root} for the embedded corpus; "
                          "pass data.corpus=path/to/files")
    return files


def _user_files(spec: str) -> list[Path]:
    files: list[Path] = []
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        p = Path(part).expanduser()
        if not p.exists():
            raise ConfigError(f"data.corpus: {str(p)!r} does not exist")
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".jsonl"))
            if not found:
                raise ConfigError(f"data.corpus: folder {str(p)!r} holds no .txt/.jsonl files")
            files += found
        elif p.suffix in (".txt", ".jsonl"):
            files.append(p)
        else:
            raise ConfigError(f"data.corpus: {str(p)!r} is not .txt/.jsonl/.bin")
    return files


def read_documents(cfg: DataConfig) -> list[str]:
    """The corpus as a list of documents, at most `max_corpus_mb` of text, in a fixed order."""
    files = _stdlib_files() if cfg.corpus == "stdlib" else _user_files(cfg.corpus)
    budget = int(cfg.max_corpus_mb * 2**20)
    docs: list[str] = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        new = ([json.loads(line)[cfg.jsonl_key] for line in text.splitlines() if line.strip()]
               if f.suffix == ".jsonl" else [text])
        for d in new:
            if budget <= 0:
                return docs
            d = d[:budget]
            docs.append(d)
            budget -= len(d)
    return docs


def load_or_train_tokenizer(docs: list[str], vocab_size: int, cache: Path | None):
    """A byte-level BPE with `<|endoftext|>`, trained on `docs` (or loaded from `cache`)."""
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
        cache.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(cache))
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


def build_dataset(cfg: DataConfig, vocab_size: int, seq_len: int, out: Path | None,
                  *, is_writer: bool = True):
    """The packed dataset and its tokenizer (None for a `.bin` corpus without a tokenizer).

    Only the writer rank (global rank 0) trains and caches; the others call this after a
    barrier and read the cache (`<out>/tokenizer.json`, `<out>/tokens.bin`).
    """
    if cfg.corpus.endswith(".bin"):
        p = Path(cfg.corpus).expanduser()
        if not p.is_file():
            raise ConfigError(f"data.corpus: {str(p)!r} does not exist")
        tokens = np.memmap(p, dtype=np.dtype(cfg.bin_dtype), mode="r")
        tok = None
        if cfg.tokenizer:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(cfg.tokenizer)
        if int(tokens.max()) >= vocab_size:
            raise ConfigError(f"{p}: token id {int(tokens.max())} >= model.vocab_size "
                              f"({vocab_size})")
        return PackedDataset(tokens, seq_len, cfg.val_fraction), tok

    tok_cache = Path(cfg.tokenizer) if cfg.tokenizer else (out / "tokenizer.json" if out else None)
    bin_cache = out / "tokens.bin" if out else None
    meta = out / "tokens.json" if out else None
    key = {"corpus": cfg.corpus, "mb": cfg.max_corpus_mb, "vocab": vocab_size}
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32
    if (bin_cache and bin_cache.is_file() and meta.is_file() and tok_cache.is_file()
            and json.loads(meta.read_text()) == key):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tok_cache))
        tokens = np.memmap(bin_cache, dtype=dtype, mode="r")
        return PackedDataset(tokens, seq_len, cfg.val_fraction), tok
    if not is_writer:
        raise RuntimeError("the tokenised corpus cache is missing; rank 0 builds it first")
    docs = read_documents(cfg)
    tok = load_or_train_tokenizer(docs, vocab_size, tok_cache)
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids += enc.ids
        ids.append(eos)
    tokens = np.asarray(ids, dtype=dtype)
    if bin_cache is not None:
        tmp = bin_cache.with_suffix(f".tmp{os.getpid()}")
        tokens.tofile(tmp)
        tmp.replace(bin_cache)
        meta.write_text(json.dumps(key))
    return PackedDataset(tokens, seq_len, cfg.val_fraction), tok
