"""haillm.trainer: a DeepSeek-LLM-architecture model and the full 3D-parallel training pipeline.

* `config`: typed dataclasses, presets (`micro`, `tiny`, `small`, `deepseek-7b`, `deepseek-67b`),
  TOML and `--set` overrides.
* `data`: the embedded corpus (Python's stdlib sources), byte-level BPE, packing, sampler.
* `model`: `DeepSeekLM`, the one model class (plain modules; a pipeline chunk is one too);
  `shard_plan`: every parameter's shape, TP rule, merged parts and Hugging Face name.
* `parallelize`: the transforms, in order (fused ops -> TP/SP -> CP -> recompute -> pipeline
  split -> values -> ZeRO-1/DDP), that make the model one rank's share of a dp x cp x tp x pp
  run; `recompute`: activation recomputation (full or selective).
* `hf`: Hugging Face Llama folders in and out (`haillm-export --hf`, `--init-from`).
* `optim`: `haillm.zero`'s ZeRO-1 AdamW wired for a 3D layout, the paper's LR schedule.
* `train`: the loop (steps through `haillm.pipeline`'s executor); `launch`/`cli`: the ranks.
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
from haillm.trainer.model import DeepSeekLM
from haillm.trainer.optim import Optimizer, lr_at
from haillm.trainer.parallelize import parallelize, split_layers
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
    "TrainConfig",
    "apply_overrides",
    "dump_toml",
    "flops_per_token",
    "load_config",
    "lr_at",
    "parallelize",
    "split_layers",
    "train",
]
