"""haillm-generate: the KV-cached decode (flash_attention, seqlen_q < seqlen_k) equals the
training model's greedy decode."""

from __future__ import annotations

import pytest
import torch

from haillm.parallel import ParallelDims
from haillm.trainer import DeepSeekLM, load_config, parallelize, train
from haillm.trainer.cli import generate_main
from haillm.trainer.data import load_or_train_tokenizer
from haillm.trainer.generate import export_safetensors, generate, load_model
from haillm.trainer.model import KVCache
from tests.helpers import assert_close
from tests.trainer.ckpt_common import make_corpus, run_cfg


@pytest.mark.parametrize("impl", ["reference", "tiled"])
@pytest.mark.parametrize("prompt_len", [1, 5, 11])
def test_kv_cache_logits_match_full_forward(prompt_len, impl):
    cfg = load_config("micro").model  # GQA: 4 query heads, 2 kv heads
    model = DeepSeekLM(cfg, seed=3).eval()
    for blk in model.layers.values():
        blk.attn.impl = impl
    g = torch.Generator().manual_seed(prompt_len)
    toks = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
    with torch.no_grad():
        full = model(toks)  # (B, S, V) without cache
        cache = KVCache(cfg, 2, cfg.seq_len, torch.float32, "cpu")
        parts = [model(toks[:, :prompt_len], cache=cache)]
        for i in range(prompt_len, cfg.seq_len):  # then one token at a time
            parts.append(model(toks[:, i:i + 1], cache=cache))
    assert cache.length == cfg.seq_len
    # the same logits through another order of fp32 sums: the table's fp32 tolerance
    assert_close(torch.cat(parts, 1), full, dtype=torch.float32)


def _greedy_no_cache(chunk, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decode with the training model, no cache: the whole prefix each step."""
    toks = prompt
    for _ in range(n):
        logits = chunk(toks)  # (B, S, V)
        toks = torch.cat([toks, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return toks


def test_generate_from_checkpoint_equals_training_model_greedy(tmp_path):
    torch.set_num_threads(1)
    corpus = make_corpus(tmp_path / "tokens.bin")
    out = tmp_path / "run"
    cfg = run_cfg(corpus, out, steps=3)
    train(cfg)
    model, _, _ = load_model(out)  # the run folder: its newest complete checkpoint
    # the training model as the trainer builds it (fused ops), with the trained weights
    state = model.state_dict()
    chunk = parallelize(DeepSeekLM(cfg.model, lazy=True), ParallelDims().build(), cfg,
                        source=lambda name: state[name], data_parallel=False)[0]
    prompt = torch.tensor([[5, 17, 300, 2]])
    n = cfg.model.seq_len - prompt.shape[1]  # up to the full context
    with torch.no_grad():
        expected = _greedy_no_cache(chunk, prompt, n)
    got = generate(model, prompt, n, temperature=0)
    assert torch.equal(got, expected)
    assert torch.equal(model.generate(prompt, n, temperature=0, use_cache=False), expected)
    # past the context window: still runs (sliding window), and sampling is seeded
    g1, g2 = (torch.Generator().manual_seed(0) for _ in range(2))
    a = generate(model, prompt, 40, temperature=0.8, top_k=5, generator=g1)
    b = generate(model, prompt, 40, temperature=0.8, top_k=5, generator=g2)
    assert a.shape == (1, 44) and torch.equal(a, b)
    # the unsharded export and the run's own model.safetensors load to the same weights
    f = export_safetensors(out, tmp_path / "export.safetensors")
    exported, _, _ = load_model(f)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), exported.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    final, _, _ = load_model(out / "model.safetensors")
    torch.testing.assert_close(final.state_dict(), model.state_dict())


def test_generate_cli(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "tokens.bin")
    out = tmp_path / "run"
    train(run_cfg(corpus, out, steps=1))
    docs = ["def f(x):\n    return x + 1\n" * 20, "class A:\n    pass\n" * 20]
    load_or_train_tokenizer(docs, 512, out / "tokenizer.json")
    capsys.readouterr()
    assert generate_main(["--checkpoint", str(out), "--prompt", "def ",
                          "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert generate_main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert generate_main(["--checkpoint", str(out), "--prompt", "x", "--top-k", "-1"]) == 2
    assert "--top-k must be >= 0" in capsys.readouterr().err
    assert generate_main(["--checkpoint", str(out), "--prompt", "x",
                          "--max-new-tokens", "-3"]) == 2
    assert "--max-new-tokens must be >= 0, got -3" in capsys.readouterr().err
