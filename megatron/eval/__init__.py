"""Evaluation through lm-eval (>= 0.4.13) over our model, on one rank or many."""
from megatron.eval.harness import evaluate_tasks, flatten_results, module_logits_fn
from megatron.eval.parallel import load_parallel_model, parallel_logits_fn, pipeline_logits_fn

__all__ = ["evaluate_tasks", "flatten_results", "load_parallel_model", "module_logits_fn",
           "parallel_logits_fn", "pipeline_logits_fn"]
