"""haillm.fusedops: Fused LayerNorm/RMSNorm, fused AdamW, in-place cross-entropy and fused GEMM epilogues."""

__all__: list[str] = []
