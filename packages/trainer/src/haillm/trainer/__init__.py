"""haillm.trainer: A DeepSeek-LLM-architecture model and the full 3D-parallel training pipeline."""

__all__: list[str] = []
