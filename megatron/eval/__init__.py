"""Evaluation through lm-eval (>= 0.4.13) over our model."""
from megatron.eval.harness import evaluate_tasks, flatten_results, module_logits_fn

__all__ = ["evaluate_tasks", "flatten_results", "module_logits_fn"]
