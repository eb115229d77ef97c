"""Hugging Face Llama folders in and out (haillm.trainer.hf), checked against `transformers`.

* export -> `LlamaForCausalLM.from_pretrained` -> the same logits as haillm's (both fp32, to
  the low-precision rule against haillm in float64),
  for the micro preset (GQA 4/2) and the tiny one with 8 query heads on 2 KV heads, trained in
  bf16 (whose export must still be the fp32 masters, bit for bit);
* `--init-from` a `save_pretrained` folder of a random `LlamaForCausalLM` into the layouts
  (1,1,1), (1,2,2) and (2,2,2), one step at lr 0, then export again: every tensor identical;
* greedy generation from the HF folder equals transformers' `generate`;
* the exported tokenizer through `AutoTokenizer` (eos/bos/pad set, same ids);
* the conversion table of the tutorial is the one the shard plan renders.

Nothing is downloaded: every model and tokenizer is built here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from haillm.trainer import Config, train  # noqa: E402
from haillm.trainer.cli import export_main, generate_main, train_main  # noqa: E402
from haillm.trainer.config import ConfigError, ModelConfig, apply_dict, load_config  # noqa: E402
from haillm.trainer.generate import load_model  # noqa: E402
from haillm.trainer.hf import (  # noqa: E402
    HFReader,
    conversion_table,
    export_hf,
    hf_config,
    model_config_from_hf,
)
from haillm.trainer.shard_plan import param_specs  # noqa: E402
from tests.helpers import assert_lowp_close, run_distributed  # noqa: E402

DOCS = [f"def f{i}(x):\n    return x * {i} + {i * i}  # the line number {i}\n" for i in range(200)]
ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, corpus: str, preset: str = "micro", extra=()) -> Config:
    """One fp32 training step of `preset` on `corpus` into `out` (no eval, no sample)."""
    cfg = load_config(preset, overrides=[
        f"data.corpus={corpus}", "data.val_fraction=0", f"run.out={out}", "train.steps=1",
        "train.precision=fp32", "train.eval_every=0", "run.sample_tokens=0",
        "run.tensorboard=false", "parallel.microbatches=1", "train.global_batch=2", *extra])
    train(cfg)
    return cfg


def _hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    m = LlamaForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    assert next(m.parameters()).dtype == torch.float32
    with torch.no_grad():
        return m(tokens).logits


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory) -> str:
    f = tmp_path_factory.mktemp("corpus") / "code.txt"
    f.write_text("".join(DOCS), encoding="utf-8")
    return str(f)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, text_corpus) -> Path:
    """A micro run with its trained BPE (eos `<|endoftext|>`)."""
    out = tmp_path_factory.mktemp("micro") / "run"
    _run(out, text_corpus)
    return out


def _token_corpus(path: Path, vocab: int) -> str:
    rng = np.random.default_rng(0)
    np.asarray(np.cumsum(rng.integers(-3, 4, 6000)) % vocab, dtype=np.uint16).tofile(path)
    return str(path)


# ------------------------------------------------------------------------------ export
@pytest.mark.parametrize("what", ["micro", "tiny-gqa4-bf16"])
def test_export_logits_equal_transformers(what, micro_run, tmp_path):
    """micro: 4 query heads on 2 KV heads; tiny's width and vocabulary with 8 query heads on
    2 KV heads, trained in bf16 (the export must still be the fp32 masters)."""
    torch.set_num_threads(1)  # tiny GEMMs: threads only contend on a shared CI machine
    if what == "micro":
        run = micro_run
    else:
        run = tmp_path / "run"
        _run(run, _token_corpus(tmp_path / "t.bin", 4096), "tiny",
             ["model.seq_len=32", "model.n_layers=2", "model.n_heads=8", "model.n_kv_heads=2",
              "train.precision=bf16"])
    hf = tmp_path / "hf"
    assert export_main(["--checkpoint", str(run), "--hf", str(hf), "--max-shard-size",
                        "40KB"]) == 0
    config = json.loads((hf / "config.json").read_text())
    ours, cfg, _ = load_model(run)
    m = cfg.model
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"],
            config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"],
            config["max_position_embeddings"], config["rms_norm_eps"], config["rope_theta"],
            config["tie_word_embeddings"]) == (
        m.n_heads, m.n_kv_heads, m.hidden_size, m.intermediate_size, m.n_layers, m.vocab_size,
        m.seq_len, m.norm_eps, m.rope_theta, False)
    # shards of at most 40 kB (but a larger tensor alone), and the index names every one
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in hf.glob("model-*.safetensors"))
    for f in files:
        t = load_file(str(hf / f))
        size = sum(v.numel() * v.element_size() for v in t.values())
        assert size <= 40_000 or len({n.rsplit(".", 2)[0] for n in t}) == 1, (f, size)
    # every tensor is the checkpoint's fp32 master, exactly (under bf16 training too)
    from haillm.trainer.checkpoint import load_logical

    masters, _ = load_logical(run)
    # ... and so is the run's own final model (one final model per run)
    from safetensors import safe_open

    final = load_file(str(run / "model.safetensors"))
    assert sorted(final) == sorted(masters)
    assert all(torch.equal(final[k], v) for k, v in masters.items())
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        assert f.metadata()["haillm_weights"] == "fp32 master weights"
    hf_state = {k: v for f in files for k, v in load_file(str(hf / f)).items()}
    for name, spec in param_specs(m).items():
        rows = [r for _, r in spec.parts] or [spec.shape[0]]
        for h, part in zip(spec.hf, masters[name].split(rows)):
            assert hf_state[h].dtype == torch.float32 and torch.equal(hf_state[h], part), h
    tokens = torch.randint(0, m.vocab_size, (2, m.seq_len), generator=torch.Generator()
                           .manual_seed(0))
    # The low-precision rule: transformers' fp32 logits are within 2x haillm's fp32 error of
    # haillm's float64 logits (the maths on the same weights), plus one rounding of the
    # largest logit. (Not float64 on both sides: transformers' RMSNorm always computes in fp32.)
    with torch.no_grad():
        want = ours.float()(tokens)
        truth = copy.deepcopy(ours).double()(tokens)
    got = _hf_logits(hf, tokens)
    assert got.dtype == want.dtype == torch.float32 and truth.dtype == torch.float64
    err = (got - want).abs().max().item()
    print(f"{what}: max |logits(transformers) - logits(haillm)| = {err:.2e}")
    assert_lowp_close(got, want, truth, name="transformers' logits")


def test_hf_config_both_ways_and_refusals():
    m = load_config("micro").model
    hf = hf_config(m, eos_token_id=3)
    assert model_config_from_hf(hf) == dataclasses.replace(ModelConfig(), **{
        k: getattr(m, k) for k in ("vocab_size", "hidden_size", "n_layers", "n_heads",
                                   "n_kv_heads", "intermediate_size", "rope_theta", "norm_eps")})
    for change, word in [({"attention_bias": True}, "attention_bias"),
                         ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                          "rope_scaling of type 'linear'"),
                         ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
                         ({"head_dim": 16}, "head_dim 16"),
                         ({"model_type": "gpt2"}, "model_type 'gpt2'")]:
        with pytest.raises(ConfigError, match=word):
            model_config_from_hf({**hf, **change})
    with pytest.raises(ConfigError, match="missing intermediate_size"):
        model_config_from_hf({k: v for k, v in hf.items() if k != "intermediate_size"})


def test_export_bf16_and_errors(micro_run, tmp_path, capsys):
    hf = tmp_path / "hf"
    assert export_main(["--checkpoint", str(micro_run), "--hf", str(hf), "--dtype",
                        "bf16"]) == 0
    config = json.loads((hf / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    state = load_file(str(hf / "model-00001-of-00001.safetensors"))
    ours, _, _ = load_model(micro_run)
    emb = state["model.embed_tokens.weight"]
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, ours.embed.weight.to(torch.bfloat16))
    # an earlier export is replaced whole; anything else in the folder is refused
    assert export_main(["--checkpoint", str(micro_run), "--hf", str(hf)]) == 0
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "float32"
    capsys.readouterr()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for argv, what in [(["--hf", str(tmp_path / "other")], "--hf"),
                       (["--hf", str(tmp_path / "x"), "--max-shard-size", "big"],
                        "--max-shard-size"),
                       (["--hf", str(tmp_path / "y"), "--max-shard-size", "0"],
                        "--max-shard-size")]:
        assert export_main(["--checkpoint", str(micro_run), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("haillm-export: error: ") and what in err[0]
    assert export_main(["--checkpoint", str(tmp_path / "nope"), "--hf", str(tmp_path / "z")]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_tokenizer_round_trip_through_autotokenizer(micro_run, tmp_path):
    from tokenizers import Tokenizer

    hf = export_hf(micro_run, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(str(hf))
    ours = Tokenizer.from_file(str(micro_run / "tokenizer.json"))
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    eos = ours.token_to_id("<|endoftext|>")
    config = json.loads((hf / "config.json").read_text())
    assert tok.eos_token_id == config["eos_token_id"] == eos
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == eos
    text = DOCS[7] + "unseen text: ünïcödé 123"
    ids = tok(text)["input_ids"]
    assert ids == ours.encode(text).ids  # no BOS added: the trainer never trained with one
    assert tok.decode(ids) == text


# ------------------------------------------------------------------------------ import
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, text_corpus) -> Path:
    """`save_pretrained` of a random GQA LlamaForCausalLM and of an HF tokenizer whose EOS
    is `</s>` (not the trainer's `<|endoftext|>`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("hf") / "llama"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(DOCS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert bpe.get_vocab_size() == 320
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5,
        max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False))
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def _original(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(str(f)).items()}


def test_reader_reads_only_the_rank_slices(hf_folder):
    reader = HFReader(hf_folder)
    for name, spec in reader.specs.items():
        full = reader(name)
        for rank in range(2):
            before = reader.bytes_read
            mine = reader.local(name, spec, rank, 2)
            assert torch.equal(mine, spec.shard.local(full, rank, 2)), name
            assert reader.bytes_read - before == mine.numel() * 4
            assert tuple(mine.shape) == spec.shard.local_shape(spec.shape, 2)


def _train_rank(cfg_dict: dict):
    torch.set_num_threads(1)
    train(apply_dict(Config(), cfg_dict, source="test"))


def _init_args(hf_folder: Path, corpus: str, out: Path) -> list[str]:
    return ["--preset", "micro", "--init-from", str(hf_folder), "--out", str(out),
            "--steps", "1", "--precision", "fp32", "--microbatches", "2",
            "--set", f"data.corpus={corpus}", "--set", "train.lr=0",
            "--set", "data.val_fraction=0", "--set", "train.eval_every=0",
            "--set", "run.sample_tokens=0", "--set", "run.tensorboard=false"]


def test_init_from_any_layout_then_export_is_identical(hf_folder, text_corpus, tmp_path):
    """lr 0: the weights that come back out must be the very tensors that went in."""
    from haillm.trainer.cli import build_config, train_parser

    original = _original(hf_folder)
    # (1,1,1) through the command line, in this process, training in bf16: the fp32 masters
    # must still be the folder's own weights (not the bf16 copy's)
    bf16 = [a if a != "fp32" else "bf16" for a in _init_args(hf_folder, text_corpus,
                                                               tmp_path / "111")]
    assert train_main(bf16) == 0
    runs = [tmp_path / "111"]
    for dp, tp, pp in [(1, 2, 2), (2, 2, 2)]:
        out = tmp_path / f"{dp}{tp}{pp}"
        args = train_parser().parse_args(_init_args(hf_folder, text_corpus, out) + [
            "--dp", str(dp), "--tp", str(tp), "--pp", str(pp)])
        cfg = build_config(args)
        assert (cfg.model.hidden_size, cfg.model.n_kv_heads, cfg.model.vocab_size) == (32, 2, 320)
        assert cfg.data.tokenizer == str(hf_folder / "tokenizer.json")
        run_distributed(_train_rank, dp * tp * pp, cfg.to_dict(), timeout=300,
                        start_method="fork")
        runs.append(out)
    for run in runs:
        hf = export_hf(run, tmp_path / f"hf-{run.name}")
        again = _original(hf)
        assert sorted(again) == sorted(original), run.name
        for k, v in original.items():
            assert again[k].dtype == v.dtype and torch.equal(again[k], v), (run.name, k)
        # the HF tokenizer came along, and with it its own EOS
        assert AutoTokenizer.from_pretrained(str(hf)).eos_token == "</s>"
        assert json.loads((hf / "config.json").read_text())["eos_token_id"] == 1


def test_init_from_refuses_an_explicit_clash(hf_folder, text_corpus, tmp_path, capsys):
    args = _init_args(hf_folder, text_corpus, tmp_path / "x") + ["--set", "model.hidden_size=64"]
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("haillm-train: error: --init-from ")
    assert "model.hidden_size = 64" in err[0] and "32" in err[0]
    assert train_main(["--init-from", str(tmp_path / "none"), "--out", str(tmp_path / "y")]) == 2
    assert "no such folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------ generate
def test_greedy_generation_from_hf_folder_equals_transformers(hf_folder, capsys):
    model = LlamaForCausalLM.from_pretrained(str(hf_folder), attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(str(hf_folder))
    prompt = "def f12(x):\n    return"
    ids = torch.tensor([tok(prompt)["input_ids"]])
    n = 24
    want = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=1)
    ours, cfg, _ = load_model(hf_folder)
    assert cfg.model.seq_len == 64
    got = ours.generate(ids, n, temperature=0.0)
    # transformers stops at EOS (`</s>`), haillm does not: compare what transformers produced
    assert want.shape[1] > ids.shape[1] + 4
    assert torch.equal(got[:, :want.shape[1]], want), (got, want)
    assert generate_main(["--checkpoint", str(hf_folder), "--prompt", prompt,
                          "--max-new-tokens", str(want.shape[1] - ids.shape[1]),
                          "--temperature", "0"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(want[0], skip_special_tokens=True)


# ------------------------------------------------------------------------------ docs
def test_tutorial_table_is_the_shard_plan():
    page = (ROOT / "docs" / "tutorials" / "your-own-model-and-data.md").read_text()
    table = conversion_table()
    assert table in page
    assert "`model.layers.{i}.self_attn.k_proj.weight` | `layers.{i}.attn.wqkv.weight` " \
           "| 8192:9216 | [1024, 8192] | column (dim 0), each part split in tp |" in table
