"""Data: the embedded corpus, packing with EOS, the sharded deterministic sampler."""

from __future__ import annotations

import numpy as np
import pytest

from haillm.trainer import ConfigError, load_config
from haillm.trainer.data import EOS, PackedDataset, Sampler, build_dataset, read_documents


def test_sampler_is_deterministic_sharded_and_resumable():
    a = Sampler(n=100, global_batch=8, seed=3)
    first = [a.next_global() for _ in range(15)]  # crosses an epoch boundary (12 per epoch)
    assert all(len(set(b)) == 8 for b in first)
    epoch = sum(first[:12], [])
    assert len(set(epoch)) == 96 and set(epoch) <= set(range(100))  # no window twice
    assert epoch != sorted(epoch)  # shuffled, not in window order
    assert set(first[12]) != set(first[0])  # the next epoch draws a new permutation
    b = Sampler(n=100, global_batch=8, seed=3)
    for _ in range(5):
        b.next_global()
    c = Sampler(n=100, global_batch=8, seed=0)
    c.load_state_dict(b.state_dict())
    assert [c.next_global() for _ in range(10)] == first[5:]
    # the DP shards of one global batch are disjoint, cover it, and keep micro-batch order
    g = first[0]
    shards = [Sampler.shard(g, 2, r, 2) for r in range(2)]
    assert sum(sum(shards, []), []) == g


def test_packing_windows_and_split():
    tokens = np.arange(101, dtype=np.uint16)
    ds = PackedDataset(tokens, seq_len=10, val_fraction=0.2)
    assert (ds.n_train, ds.n_val) == (8, 2)  # windows 4 and 9 held out (every 5th)
    x, y = ds.batch([0, 7])
    assert x.shape == (2, 10) and (y[:, :-1] == x[:, 1:]).all() and x[1, 0] == 80
    assert ds.val_indices(3) == [0, 1, 0]
    xv, _ = ds.val_batch([0, 1])
    assert xv[:, 0].tolist() == [40, 90]
    with pytest.raises(ConfigError, match="too small"):
        PackedDataset(tokens[:5], seq_len=10)


def test_embedded_corpus_tokenizer_and_cache(tmp_path):
    cfg = load_config("micro", overrides=["data.max_corpus_mb=0.05"]).data
    docs = read_documents(cfg)
    assert docs and sum(map(len, docs)) <= 0.05 * 2**20 and "def " in "".join(docs)
    ds, tok = build_dataset(cfg, 300, 16, tmp_path)
    assert tok.get_vocab_size() == 300
    eos = tok.token_to_id(EOS)
    assert (np.asarray(ds.tokens) == eos).sum() == len(docs)  # one EOS after each document
    assert tok.decode(tok.encode("import os\n").ids) == "import os\n"  # byte-level: lossless
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokens.bin").is_file()
    ds2, _ = build_dataset(cfg, 300, 16, tmp_path, is_writer=False)  # the others read the cache
    assert np.array_equal(np.asarray(ds2.tokens), np.asarray(ds.tokens))


def test_user_files_and_bin(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 200)
    (tmp_path / "b.jsonl").write_text('{"text": "print(1)"}\n{"text": "x = 2"}\n')
    cfg = load_config("micro", overrides=[f"data.corpus={tmp_path}"]).data
    assert len(read_documents(cfg)) == 3
    binf = tmp_path / "t.bin"
    np.arange(1000, dtype=np.uint16).tofile(binf)
    cfg = load_config("micro", overrides=[f"data.corpus={binf}"]).data
    ds, tok = build_dataset(cfg, 1000, 16, None)
    assert tok is None and ds.n_train + ds.n_val == 62
    for bad in ("/no/such/file.txt", str(tmp_path / "missing.bin")):
        with pytest.raises(ConfigError, match="does not exist"):
            build_dataset(load_config("micro", overrides=[f"data.corpus={bad}"]).data, 512, 16,
                          None)
    with pytest.raises(ConfigError, match="token id 999"):
        build_dataset(cfg, 512, 16, None)
