"""Evaluation through lm-eval (>= 0.4.13) over a logits function, on one rank or many.

eval/ knows models only as logits functions; building one from a checkpoint across
ranks is training's job (megatron.training.inference), so this package imports nothing
from training/ and training's in-loop evaluation is the only direction between them."""
from megatron.eval.harness import evaluate_tasks, flatten_results, module_logits_fn
from megatron.eval.parallel import parallel_logits_fn, pipeline_logits_fn

__all__ = ["evaluate_tasks", "flatten_results", "module_logits_fn", "parallel_logits_fn", "pipeline_logits_fn"]
