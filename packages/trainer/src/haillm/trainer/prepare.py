"""`haillm-prepare`: tokenise a corpus once, into memory-mapped `.bin` shards and an index.

    haillm-prepare --corpus data/ --out prepared/ [--preset tiny] [--text-key text]
                   [--max-mb 0] [--workers 8] [--shard-mb 256] [--tokenizer FILE]

The output folder holds `tokens.json` (the index: shards, token and document counts, dtype,
the tokenizer's SHA-256 and the fingerprint of the inputs), `tokenizer.json` and
`tokens-00000.bin`, ... Its token stream is exactly what `haillm-train` would tokenise in
process from the same configuration. Use it in one of two ways:

* `haillm-train --set data.corpus=prepared/`: read as-is (nothing re-tokenised, nothing
  written; every rank memory-maps the shards);
* `haillm-prepare ... --out RUN` then `haillm-train --out RUN`: the run finds its cache.

The main process reads the documents in order (streaming) and trains the tokenizer when none
is given; worker processes encode chunks of documents in parallel, and the main process
writes their tokens in the original order, so the result does not depend on `--workers`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from haillm.trainer.config import PRESETS, ConfigError, load_config
from haillm.trainer.data import (
    TokenWriter,
    _chunks,
    _encode,
    _pyarrow,
    _save_tokenizer,
    _sha256_file,
    _token_dtype,
    corpus_files,
    corpus_fingerprint,
    eos_id,
    is_pretokenised,
    iter_documents,
    load_or_train_tokenizer,
)

__all__ = ["prepare", "prepare_parser", "run_prepare"]


def prepare_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="haillm-prepare",
        description="Tokenise a corpus into memory-mapped .bin shards + an index (tokens.json), "
                    "in parallel worker processes.",
        epilog="example: haillm-prepare --preset small --corpus data/ --max-mb 0 --out prepared "
               "&& haillm-train --preset small --set data.corpus=prepared",
    )
    ap.add_argument("--corpus", help="the data.corpus to tokenise: .txt/.jsonl/.parquet/.arrow "
                    "files, Hugging Face save_to_disk folders or folders of files "
                    "(comma-separated); default: the config's")
    ap.add_argument("--out", required=True, help="output folder (a run folder works too)")
    ap.add_argument("--config", metavar="FILE.toml", help="TOML file (as haillm-train)")
    ap.add_argument("--preset", default=None, help=f"named preset: {', '.join(PRESETS)} "
                    "(default: tiny unless --config is given); sets model.vocab_size")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="SECTION.KEY=VALUE", help="override any config key (repeatable)")
    ap.add_argument("--text-key", help="key (.jsonl) or column (parquet, arrow) of the text "
                    "(data.text_key; default: text)")
    ap.add_argument("--max-mb", type=float, help="read at most this many MB of text "
                    "(data.max_corpus_mb; 0: all of it)")
    ap.add_argument("--vocab-size", type=int, help="model.vocab_size (the tokenizer's size)")
    ap.add_argument("--tokenizer", help="an existing tokenizer.json (default: train a "
                    "byte-level BPE on the corpus)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="encoding processes (default: min(8, CPUs)); 1: in this process")
    ap.add_argument("--shard-mb", type=float, default=256.0,
                    help="start a new .bin shard after this many MB of tokens (default 256)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


# ------------------------------------------------------------------ worker processes
_WORKER_TOK = None
_WORKER_EOS = 0


def _init_worker(tok_json: str, eos: int) -> None:
    global _WORKER_TOK, _WORKER_EOS
    _WORKER_EOS = eos
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the parallelism is the processes
    from tokenizers import Tokenizer

    _WORKER_TOK = Tokenizer.from_str(tok_json)


def _encode_in_worker(docs: list[str]) -> tuple[bytes, int, str]:
    tok = _WORKER_TOK
    dtype = _token_dtype(tok.get_vocab_size())
    arr = _encode(tok, docs, _WORKER_EOS, dtype)
    return arr.tobytes(), len(docs), np.dtype(dtype).name


class _Progress:
    """A progress bar on stderr (a line every 10 % when stderr is not a terminal)."""

    def __init__(self, total_chars: int, enabled: bool, stream=None):
        self.total, self.enabled = max(total_chars, 1), enabled
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = self.last = time.perf_counter()
        self.docs = self.tokens = self.chars = 0
        self.shown = -1

    def line(self, done: bool = False) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        frac = 1.0 if done else min(self.chars / self.total, 0.99)  # the total is an estimate
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        return (f"haillm-prepare: [{bar}] {100 * frac:3.0f}% {self.docs:,} documents "
                f"{self.tokens:,} tokens | {self.docs / dt:,.0f} documents/s "
                f"{self.tokens / dt:,.0f} tokens/s")

    def update(self, docs: int, tokens: int, chars: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.chars += chars
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty and now - self.last >= 0.2:
            print("\r" + self.line(), end="", file=self.stream, flush=True)
            self.last = now
        elif not self.tty and int(10 * self.chars / self.total) > self.shown:
            self.shown = int(10 * self.chars / self.total)
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(("\r" if self.tty else "") + self.line(done=True), file=self.stream,
                  flush=True)


def _estimate_chars(files: list[Path], budget: int | None) -> int:
    """Characters the run will read, for the progress bar (file sizes; parquet: the
    uncompressed size of its columns)."""
    total = 0
    for f in files:
        if f.suffix == ".parquet":
            pa = _pyarrow()
            md = pa.parquet.ParquetFile(str(f)).metadata
            total += sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
        else:
            total += f.stat().st_size
        if budget is not None and total >= budget:
            return budget
    return total


def prepare(data, vocab_size: int, out: Path, *, workers: int = 1, shard_mb: float = 256.0,
            progress: bool = False, stream=None) -> dict:
    """Tokenise `data` (a `DataConfig`) into `out`; returns the index (`tokens.json`)."""
    from tokenizers import Tokenizer

    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if shard_mb <= 0:
        raise ConfigError(f"--shard-mb must be > 0, got {shard_mb}")
    if is_pretokenised(data.corpus):
        raise ConfigError(f"--corpus {data.corpus!r} is already tokenised (a .bin or a "
                          "haillm-prepare folder): pass it to haillm-train as data.corpus")
    files = corpus_files(data)
    fp = corpus_fingerprint(data, vocab_size, files)
    say = (lambda s: print(f"haillm-prepare: {s}", file=stream or sys.stderr, flush=True))
    out = Path(out)
    tok_path = out / "tokenizer.json"
    if data.tokenizer:
        src = Path(data.tokenizer).expanduser()
        if not src.is_file():
            raise ConfigError(f"--tokenizer {str(src)!r} does not exist")
        tok = Tokenizer.from_file(str(src))
        # fewer tokens than embedding rows is fine (DeepSeek LLM pads 100015 to 102400)
        if tok.get_vocab_size() > vocab_size:
            raise ConfigError(f"--tokenizer {str(src)!r} has {tok.get_vocab_size()} tokens, "
                              f"more than model.vocab_size ({vocab_size}) (pass --vocab-size "
                              f"{tok.get_vocab_size()})")
    else:
        if progress:
            say(f"training a byte-level BPE of {vocab_size} tokens on {len(files)} file(s)")
        tok = load_or_train_tokenizer(iter_documents(data, files), vocab_size, None)
    out.mkdir(parents=True, exist_ok=True)
    if data.tokenizer:  # the very file (its SHA-256 is part of the fingerprint)
        if src.resolve() != tok_path.resolve():
            shutil.copyfile(src, tok_path)
        sha = _sha256_file(tok_path)
    else:
        sha = _save_tokenizer(tok, tok_path)
    dtype = _token_dtype(vocab_size)
    eos = eos_id(tok, src if data.tokenizer else None)  # an HF tokenizer: its own eos_token
    writer = TokenWriter(out, dtype, eos=eos,
                         shard_tokens=max(1, int(shard_mb * 2**20 / np.dtype(dtype).itemsize)))
    budget = int(data.max_corpus_mb * 2**20) if data.max_corpus_mb > 0 else None
    bar = _Progress(_estimate_chars(files, budget), progress, stream)
    chunks = _chunks(iter_documents(data, files))
    if workers == 1:
        for chunk in chunks:
            arr = _encode(tok, chunk, eos, dtype)
            writer.write(arr, len(chunk))
            bar.update(len(chunk), len(arr), sum(map(len, chunk)))
    else:
        _encode_parallel(tok, chunks, workers, writer, bar)
    bar.close()
    idx = writer.finish(tokenizer_sha256=sha, fingerprint=fp, vocab_size=vocab_size)
    dt = max(time.perf_counter() - bar.t0, 1e-9)
    say(f"{idx['n_documents']:,} documents, {idx['n_tokens']:,} tokens in "
        f"{len(idx['shards'])} shard(s) -> {out} ({idx['n_documents'] / dt:,.0f} documents/s, "
        f"{idx['n_tokens'] / dt:,.0f} tokens/s, {workers} worker(s))")
    if budget is not None and bar.chars >= budget:
        say(f"stopped at data.max_corpus_mb = {data.max_corpus_mb:g} MB of text "
            "(--max-mb 0 reads everything)")
    return idx


def _encode_parallel(tok, chunks, workers: int, writer: TokenWriter, bar: _Progress) -> None:
    """Encode the chunks in `workers` processes, written back in order; at most 2 chunks per
    worker in flight, so memory stays bounded however large the corpus."""
    import multiprocessing as mp

    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # forked children: no warning, no threads
    try:
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tok.to_str(), writer.eos))
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    with pool:
        pending: deque = deque()

        def drain_one():
            res, chars = pending.popleft()
            data, n_docs, dtype = res.get()
            arr = np.frombuffer(data, dtype=dtype)
            writer.write(arr, n_docs)
            bar.update(n_docs, len(arr), chars)

        for chunk in chunks:
            pending.append((pool.apply_async(_encode_in_worker, (chunk,)),
                            sum(map(len, chunk))))
            if len(pending) >= 2 * workers:
                drain_one()
        while pending:
            drain_one()


def run_prepare(argv: list[str] | None = None, *, stream=None) -> dict:
    """`haillm-prepare`'s work: parse `argv`, build the config, tokenise. Raises ConfigError."""
    a = prepare_parser().parse_args(argv)
    overrides = list(a.overrides)
    if a.corpus is not None:
        overrides.append(f"data.corpus={a.corpus}")
    if a.text_key is not None:
        overrides.append(f"data.text_key={a.text_key}")
    if a.max_mb is not None:
        overrides.append(f"data.max_corpus_mb={a.max_mb}")
    if a.vocab_size is not None:
        overrides.append(f"model.vocab_size={a.vocab_size}")
    if a.tokenizer is not None:
        overrides.append(f"data.tokenizer={a.tokenizer}")
    cfg = load_config(a.preset or (None if a.config else "tiny"), a.config, overrides)
    if cfg.model.vocab_size < 257:
        raise ConfigError(f"model.vocab_size must be >= 257 (256 bytes + EOS), got "
                          f"{cfg.model.vocab_size}")
    return prepare(cfg.data, cfg.model.vocab_size, Path(a.out), workers=a.workers,
                   shard_mb=a.shard_mb, progress=not a.quiet, stream=stream)
