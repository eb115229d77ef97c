"""haillm.trainer: a DeepSeek-LLM-architecture model and the full 3D-parallel training pipeline.

* `config`: typed dataclasses, presets (`micro`, `tiny`, `small`, `deepseek-7b`, `deepseek-67b`),
  TOML and `--set` overrides.
* `data`: the embedded corpus (Python's stdlib sources), byte-level BPE, packing, sampler.
* `reference`: the plain single-process model (the spec); `model`: the TP/SP/PP stage.
* `optim`: `haillm.zero`'s ZeRO-1 AdamW wired for a 3D layout, the paper's LR schedule.
* `pipeline_exec`: a step through `haillm.pipeline`'s executor; `train`: the loop; `launch`/`cli`: the ranks.
"""

from haillm.trainer.config import (
    PRESETS,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    dump_toml,
    load_config,
)
from haillm.trainer.metrics import flops_per_token
from haillm.trainer.model import StageModel, split_layers
from haillm.trainer.optim import Optimizer, lr_at
from haillm.trainer.reference import DeepSeekLM
from haillm.trainer.train import train

__all__ = [
    "PRESETS",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSeekLM",
    "ModelConfig",
    "Optimizer",
    "ParallelConfig",
    "RunConfig",
    "StageModel",
    "TrainConfig",
    "apply_overrides",
    "dump_toml",
    "flops_per_token",
    "load_config",
    "lr_at",
    "split_layers",
    "train",
]
