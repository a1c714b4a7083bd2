"""Training: the loop and what runs it.

Owns DeepSpeed engine set-up, the step, optimizer and schedule, logging and the run
summary, robustness (non-finite steps, preemption, the peer watchdog), preflight checks,
validating a saved checkpoint by a forward pass, and building a trained model for
eval.py/generate.py. It is the top of megatron/: it may import every package below
(config, data, model, parallel, l2e, checkpoint, eval), and none of them imports it."""
from megatron.training.loop import evaluate, pretrain, train_step

__all__ = ["pretrain", "train_step", "evaluate"]
