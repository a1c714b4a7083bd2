"""Training: DeepSpeed engine setup, the loop, optimizer/schedule, checkpoints, logging."""
from megatron.training.loop import evaluate, pretrain, train_step

__all__ = ["pretrain", "train_step", "evaluate"]
