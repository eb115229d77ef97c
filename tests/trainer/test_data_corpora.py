"""Real corpora: parquet, Hugging Face `save_to_disk` folders, the text key, the fingerprinted
cache, `haillm-prepare`, and every node's local rank 0 building its own cache."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from haillm.trainer import ConfigError, load_config
from haillm.trainer.cli import prepare_main, train_main
from haillm.trainer.data import (
    build_dataset,
    corpus_fingerprint,
    dataset_identity,
    iter_documents,
    read_documents,
)

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

DOCS = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(40)]


def data_cfg(corpus, *sets):
    return load_config("micro", overrides=[f"data.corpus={corpus}", *sets]).data


def write_hf_folder(folder, table, *, chunks=2):
    """What `datasets.Dataset.save_to_disk` writes: Arrow IPC *stream* files + two JSONs."""
    folder.mkdir(parents=True)
    names = []
    step = -(-table.num_rows // chunks)
    for i in range(chunks):
        name = f"data-{i:05d}-of-{chunks:05d}.arrow"
        with pa.ipc.new_stream(str(folder / name), table.schema) as w:
            w.write_table(table.slice(i * step, step), max_chunksize=7)
        names.append({"filename": name})
    (folder / "state.json").write_text(json.dumps(
        {"_data_files": names, "_fingerprint": "abc", "_format_type": None, "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {
        n: {"dtype": "string", "_type": "Value"} for n in table.column_names}}))


def test_parquet_arrow_folder_and_jsonl_with_another_key(tmp_path):
    table = pa.table({"id": list(range(len(DOCS))), "content": DOCS})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=16)
    write_hf_folder(tmp_path / "hf", table)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"id": i, "content": d}) + "\n"
                                              for i, d in enumerate(DOCS)))
    for corpus in ("c.parquet", "hf", "c.jsonl"):
        cfg = data_cfg(tmp_path / corpus, "data.text_key=content")
        assert read_documents(cfg) == DOCS, corpus
    # jsonl_key: the old name of text_key still works
    assert read_documents(data_cfg(tmp_path / "c.jsonl", "data.jsonl_key=content")) == DOCS
    # a DatasetDict folder (dataset_dict.json + one folder per split) reads its train split
    dd = tmp_path / "dd"
    write_hf_folder(dd / "train", table.slice(0, 5))
    write_hf_folder(dd / "test", table.slice(5, 5))
    (dd / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    assert read_documents(data_cfg(dd, "data.text_key=content")) == DOCS[:5]
    # several sources in one corpus, in the order given; the budget cuts the stream
    cfg = data_cfg(f"{tmp_path / 'c.parquet'},{tmp_path / 'hf'}", "data.text_key=content",
                   "data.max_corpus_mb=0.001")
    docs = read_documents(cfg)
    assert sum(map(len, docs)) == int(0.001 * 2**20) and docs[0] == DOCS[0]
    # a whole run folder of mixed files tokenises (and trains its tokenizer) end to end
    ds, tok = build_dataset(data_cfg(tmp_path / "hf", "data.text_key=content"), 300, 16,
                            tmp_path / "run")
    assert tok.decode(list(np.asarray(ds.tokens[:12]))).startswith("def f0(x)")


def test_missing_key_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n{"body": "y", "id": 2}\n')
    with pytest.raises(ConfigError, match=r"data.text_key: line 2 of .*a.jsonl.* has no 'text' "
                                          r"\(it has: body, id\)"):
        read_documents(data_cfg(tmp_path / "a.jsonl"))
    pq.write_table(pa.table({"body": ["a"], "n": [1]}), tmp_path / "b.parquet")
    with pytest.raises(ConfigError, match=r"has no 'text' \(it has: body, n\)"):
        read_documents(data_cfg(tmp_path / "b.parquet"))
    with pytest.raises(ConfigError, match="column 'n' .* expected a string column"):
        read_documents(data_cfg(tmp_path / "b.parquet", "data.text_key=n"))
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ConfigError, match="line 1 of .* is not JSON"):
        read_documents(data_cfg(tmp_path / "bad.jsonl"))
    with pytest.raises(ConfigError, match="disagree"):
        data_cfg(tmp_path / "a.jsonl", "data.text_key=a", "data.jsonl_key=b").key
    # at the command line: one error line, exit 2, no traceback (fails before any rank starts)
    code = train_main(["--preset", "micro", "--set", f"data.corpus={tmp_path / 'a.jsonl'}",
                       "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and "error: data.text_key" in err
    code = prepare_main(["--corpus", str(tmp_path / "b.parquet"), "--out", str(tmp_path / "p"),
                         "--vocab-size", "300", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("haillm-prepare: error: data.text_key") and \
        "Traceback" not in err


def test_without_pyarrow_the_error_names_the_extra(tmp_path, monkeypatch):
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "a.parquet")
    for mod in ("pyarrow", "pyarrow.ipc", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import pyarrow` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'haillm-trainer\[data\]'"):
        read_documents(data_cfg(tmp_path / "a.parquet"))
    (tmp_path / "a.txt").write_text("plain text needs no pyarrow")
    assert read_documents(data_cfg(tmp_path / "a.txt")) == ["plain text needs no pyarrow"]


def test_a_changed_corpus_is_retokenised(tmp_path, capsys):
    corpus, out = tmp_path / "c.txt", tmp_path / "run"
    corpus.write_text("alpha beta gamma\n" * 300)
    cfg = data_cfg(corpus)
    ds1, _ = build_dataset(cfg, 300, 16, out)
    first = np.array(ds1.tokens)
    stamp = (out / "tokens.bin").stat().st_mtime_ns
    ds, _ = build_dataset(cfg, 300, 16, out, is_writer=False)  # unchanged: found, not rebuilt
    assert (out / "tokens.bin").stat().st_mtime_ns == stamp
    assert np.array_equal(np.asarray(ds.tokens), first)
    # replace the text with other text of the same size, and even restore the mtime: the
    # content hash of the sample still tells
    st = corpus.stat()
    corpus.write_text("delta omega zeta\n" * 300)
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert corpus.stat().st_size == st.st_size
    with pytest.raises(RuntimeError, match="missing or out of date .*inputs changed"):
        build_dataset(cfg, 300, 16, out, is_writer=False)  # never the stale tokens
    ds2, tok2 = build_dataset(cfg, 300, 16, out)
    assert "re-tokenising" in capsys.readouterr().err
    fresh, tok3 = build_dataset(cfg, 300, 16, tmp_path / "fresh")  # == a run in a new folder
    assert np.array_equal(np.asarray(ds2.tokens), np.asarray(fresh.tokens))
    assert not np.array_equal(np.asarray(ds2.tokens), first)
    assert tok2.decode(list(np.asarray(ds2.tokens[:8]))).startswith("delta")
    assert tok2.to_str() == tok3.to_str()  # the tokenizer was retrained on the new text too
    # the fingerprint covers the key, the budget, the vocabulary and a given tokenizer
    base = corpus_fingerprint(cfg, 300)
    assert corpus_fingerprint(cfg, 400) != base
    assert corpus_fingerprint(data_cfg(corpus, "data.max_corpus_mb=0.25"), 300) != base
    assert corpus_fingerprint(data_cfg(corpus, "data.text_key=body"), 300) != base
    assert corpus_fingerprint(data_cfg(corpus, f"data.tokenizer={out / 'tokenizer.json'}"),
                              300) != base


def test_prepare_equals_in_process_tokenisation(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"text": DOCS * 4}), src / "a.parquet", row_group_size=50)
    (src / "b.jsonl").write_text("".join(json.dumps({"text": d[::-1]}) + "\n" for d in DOCS))
    (src / "c.txt").write_text("import os\n" * 100)
    cfg = data_cfg(src, "data.max_corpus_mb=0")
    ds, tok = build_dataset(cfg, 300, 16, tmp_path / "run")  # in process
    code = prepare_main(["--preset", "micro", "--vocab-size", "300", "--corpus", str(src),
                         "--max-mb", "0", "--out", str(tmp_path / "prep"), "--workers", "2",
                         "--shard-mb", "0.004"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "documents/s" in err and "tokens/s" in err and "100%" in err  # the progress bar
    idx = json.loads((tmp_path / "prep" / "tokens.json").read_text())
    assert len(idx["shards"]) >= 2 and idx["n_documents"] == len(read_documents(cfg))
    assert sum(s["documents"] for s in idx["shards"]) == idx["n_documents"]
    assert (tmp_path / "prep" / "tokenizer.json").read_text() == tok.to_str()
    # read as-is: the same stream, window for window, and the tokenizer comes along
    pre, tok_p = build_dataset(data_cfg(tmp_path / "prep"), 300, 16, None)
    assert np.array_equal(np.asarray(pre.tokens), np.asarray(ds.tokens))
    assert len(pre.tokens) == len(ds.tokens) == idx["n_tokens"]
    for i in (0, ds.n_train // 2, ds.n_train - 1):
        assert np.array_equal(pre.batch([i])[0].numpy(), ds.batch([i])[0].numpy())
    cut = idx["shards"][0]["tokens"] // 16  # the window across the first shard boundary
    assert np.array_equal(pre.window(cut).numpy(), ds.window(cut).numpy())
    assert tok_p.to_str() == tok.to_str() and dataset_identity(pre, tok_p) == \
        dataset_identity(ds, tok)
    # prepared into a run folder, the run finds it as its cache (nothing re-tokenised)
    assert prepare_main(["--preset", "micro", "--vocab-size", "300", "--corpus", str(src),
                         "--max-mb", "0", "--out", str(tmp_path / "run2"), "--workers", "1",
                         "--quiet"]) == 0
    capsys.readouterr()
    ds2, _ = build_dataset(cfg, 300, 16, tmp_path / "run2", is_writer=False)
    assert np.array_equal(np.asarray(ds2.tokens), np.asarray(ds.tokens))
    # bad arguments: one error line, exit 2
    for argv, msg in ((["--corpus", str(tmp_path / "nope.txt")], "does not exist"),
                      (["--corpus", str(src), "--workers", "0"], "--workers must be >= 1"),
                      (["--corpus", str(tmp_path / "prep")], "already tokenised")):
        assert prepare_main([*argv, "--out", str(tmp_path / "x"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("haillm-prepare: error:") and msg in err, err


def test_streaming_documents_match_the_list():
    cfg = load_config("micro", overrides=["data.max_corpus_mb=0.02"]).data
    assert list(iter_documents(cfg)) == read_documents(cfg)


def _node_rank_fn(tmp: str, layout: list[tuple[int, int]]):
    """One rank of a job of 'nodes' on this machine: (node, local rank) from `layout`;
    each node has its own copy of the corpus and its own run folder (nothing shared)."""
    import torch.distributed as dist

    from haillm.trainer.data import build_dataset_on_nodes

    node, local = layout[dist.get_rank()]
    os.environ["LOCAL_RANK"] = str(local)  # what torchrun sets
    root = os.path.join(tmp, f"node{node}")
    cfg = data_cfg(os.path.join(root, "corpus.txt"))
    ds, tok = build_dataset_on_nodes(cfg, 300, 16, Path(root) / "run")
    return os.getpid(), dataset_identity(ds, tok)


def test_every_node_local_rank0_builds_its_own_cache(tmp_path):
    """The multi-node mechanism without a shared filesystem (torchrun with two --nnodes agents
    takes over a minute on 2 loaded cores, so the 'nodes' are simulated): 3 ranks on 2 nodes,
    LOCAL_RANK as torchrun sets it; node 0's local rank 1 waits at the barrier and reads its
    node's cache, every node's local rank 0 builds its own in its own folder."""
    from tests.helpers import RankFailure, run_distributed

    for n in (0, 1):
        (tmp_path / f"node{n}").mkdir()
        (tmp_path / f"node{n}" / "corpus.txt").write_text("x = 1\nprint(x)\n" * 200)
    layout = [(0, 0), (0, 1), (1, 0)]
    res = run_distributed(_node_rank_fn, 3, str(tmp_path), layout, start_method="fork",
                          timeout=120)
    assert len({d for _, d in res}) == 1  # the same tokens everywhere
    for n, builder in ((0, 0), (1, 2)):
        idx = json.loads((tmp_path / f"node{n}" / "run" / "tokens.json").read_text())
        assert idx["built_by"]["pid"] == res[builder][0]  # the node's local rank 0 built it
    # a node whose copy of the corpus differs: every rank stops, nobody trains on other data
    (tmp_path / "node1" / "corpus.txt").write_text("y = 2\n" * 300)
    with pytest.raises(RankFailure, match="different tokenised corpora"):
        run_distributed(_node_rank_fn, 3, str(tmp_path), layout, start_method="fork",
                        timeout=120)
