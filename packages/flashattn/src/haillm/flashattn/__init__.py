"""haillm.flashattn: Tiled FlashAttention with recomputation (forward and backward), PyTorch and Triton."""

__all__: list[str] = []
