"""haillm.zero: ZeRO-1 sharded optimizer, fp32 gradient accumulation and bf16/fp16 mixed precision."""

__all__: list[str] = []
