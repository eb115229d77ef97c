"""Config: presets, TOML round trip, --set overrides, errors; the LR schedule; FLOPs."""

from __future__ import annotations

import math

import pytest

from haillm.trainer import PRESETS, ConfigError, dump_toml, flops_per_token, load_config, lr_at
from haillm.trainer.model import DeepSeekLM
from haillm.trainer.parallelize import split_layers


def test_paper_presets_match_table_2():
    m7 = load_config("deepseek-7b").model
    assert (m7.n_layers, m7.hidden_size, m7.n_heads, m7.n_kv_heads, m7.vocab_size, m7.seq_len,
            m7.intermediate_size) == (30, 4096, 32, 32, 102400, 4096, 11008)
    m67 = load_config("deepseek-67b").model
    assert (m67.n_layers, m67.hidden_size, m67.n_heads, m67.n_kv_heads,
            m67.intermediate_size) == (95, 8192, 64, 8, 22016)
    # ~6.9B and ~67B parameters, as the paper's names say
    assert 6.5e9 < m7.n_params() < 7.2e9
    assert 6.5e10 < m67.n_params() < 6.9e10


@pytest.mark.parametrize("preset", ["micro", "tiny"])
def test_param_count_matches_the_reference_model(preset):
    m = load_config(preset).model
    assert m.n_params() == sum(p.numel() for p in DeepSeekLM(m).parameters())


def test_toml_round_trip_and_overrides(tmp_path):
    cfg = load_config("tiny", overrides=["train.lr=1e-3", "parallel.sequence_parallel=false",
                                         "data.corpus=a b.txt", "model.n_layers=6"])
    assert cfg.train.lr == 1e-3 and cfg.parallel.sequence_parallel is False
    f = tmp_path / "c.toml"
    f.write_text(dump_toml(cfg))
    again = load_config(file=f)
    assert again == cfg
    # later layers win: file over preset, --set over file
    assert load_config("micro", f, ["train.steps=7"]).train.steps == 7


@pytest.mark.parametrize("override, hint", [
    ("train.lrr=1", "train.lr"), ("trian.lr=1", "train"), ("parallel.tp=two", "as int"),
    ("train.lr", "section.key=value"), ("parallel.sequence_parallel=maybe", "as bool"),
])
def test_bad_overrides_are_rejected_with_the_closest_name(override, hint):
    with pytest.raises(ConfigError, match=hint):
        load_config("micro", overrides=[override])


def test_unknown_preset_and_toml_key(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        load_config("tiyn")
    f = tmp_path / "bad.toml"
    f.write_text("[model]\nhiden_size = 64\n")
    with pytest.raises(ConfigError, match="model.hidden_size"):
        load_config(file=f)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(file=tmp_path / "missing.toml")


@pytest.mark.parametrize("sets, world, msg", [
    (["parallel.dp=3"], 4, "does not match the world size"),
    (["parallel.tp=3"], 3, r"n_heads \(4\) must be divisible by tp \(3\)"),
    (["parallel.pp=8"], 8, r"n_layers \(4\) must be >= the number of pipeline"),
    (["model.vocab_size=511", "parallel.tp=2"], 2, r"vocab_size \(511\)"),
    (["train.global_batch=6"], 1, r"global_batch \(6\) must be divisible"),
    (["parallel.pipeline_schedule=zigzag"], 1, "pipeline_schedule"),
])
def test_layout_errors(sets, world, msg):
    cfg = load_config("micro", overrides=sets)
    with pytest.raises(ConfigError, match=msg):
        cfg.validate(world)
    assert set(PRESETS) >= {"tiny", "small", "deepseek-7b", "deepseek-67b"}


def test_multistep_schedule_is_the_papers():
    t = load_config("tiny", overrides=["train.steps=1000", "train.warmup_steps=100",
                                       "train.lr=1.0"]).train
    assert lr_at(0, t) == pytest.approx(0.01) and lr_at(99, t) == pytest.approx(1.0)
    assert lr_at(799, t) == 1.0 and lr_at(800, t) == pytest.approx(0.316)
    assert lr_at(899, t) == pytest.approx(0.316) and lr_at(900, t) == pytest.approx(0.1)
    t.schedule = "cosine"
    # the last step is 1/900 of the way short of the end of the cosine: 0.1 + 0.45 (1 - cos(pi/900))
    last = 0.1 + 0.45 * (1 - math.cos(math.pi / 900))
    assert lr_at(999, t) == pytest.approx(last) and lr_at(100, t) == pytest.approx(1.0)
    assert lr_at(999, t) > 0.1 and lr_at(1000, t) == pytest.approx(0.1)


def test_split_layers_even_and_flops():
    assert [len(r) for r in split_layers(30, 4)] == [8, 8, 7, 7]
    assert [r.start for r in split_layers(5, 2)] == [0, 3]
    m = load_config("deepseek-7b").model
    # the paper's 6N-style count, non-embedding, + attention at the real sequence length
    assert flops_per_token(m) == pytest.approx(
        6 * m.n_params(embedding=False) + 12 * 30 * 4096 * 4096)
