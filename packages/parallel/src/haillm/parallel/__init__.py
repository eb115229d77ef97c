"""haillm.parallel: Tensor and sequence parallel layers with GEMM/communication overlap."""

__all__: list[str] = []
