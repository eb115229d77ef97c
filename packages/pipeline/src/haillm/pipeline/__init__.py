"""haillm.pipeline: Pipeline parallelism: GPipe, 1F1B and interleaved 1F1B schedules with a P2P executor."""

__all__: list[str] = []
