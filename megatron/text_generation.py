"""Text generation for generate.py, with GPT-NeoX's keys, modes and output format.

    text_gen_type: unconditional   num_samples samples, each from the end-of-document token
                   input-file      one completion per prompt of sample_input_file
                                   (prompts separated by prompt_end, stripped, empty ones dropped)
                   interactive     prompts typed at the terminal ("stop" or EOF ends)

Each completion is a JSON line in sample_output_file: ``context``, ``text`` (the new
tokens, without the end-of-document token), ``length`` (new tokens), ``finished`` (the
model produced end-of-document), ``message`` (a warning, else null), ``duration_seconds``.
Decoding is greedy when temperature, top_k and top_p are all 0 (NeoX's rule), else
sampled with a generator seeded by ``seed``, so every rank draws the same token.

``logits_fn(tokens [1, s]) -> full-vocab logits [1, s, V]`` is the model: one process's
GPTNeoX or the collective function of a tensor/pipeline-parallel one
(megatron.eval.parallel). When it takes a KV cache (``logits_fn.takes_cache``: a
GPTNeoX, tensor-parallel or not) each step feeds only the new token; ``recompute: true``
and DeepSpeed pipelines feed the whole sequence every step instead.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron.errors import ConfigError, DataError
from megatron.model import KVCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 and self.top_k == 0 and self.top_p == 0.0

    @classmethod
    def from_args(cls, args) -> "Sampling":
        def check(ok: bool, key: str, rule: str):
            if not ok:
                raise ConfigError(f"{args._where(key)}: {key}={getattr(args, key)!r} {rule}")

        check(args.temperature >= 0, "temperature", "must be >= 0 (0 with top_k 0, top_p 0: greedy)")
        check(args.top_k >= 0, "top_k", "must be >= 0 (0: off)")
        check(0.0 <= args.top_p <= 1.0, "top_p", "must be in [0, 1] (0: off)")
        check(args.maximum_tokens >= 1, "maximum_tokens", "must be >= 1")
        check(args.num_samples >= 1, "num_samples", "must be >= 1")
        return cls(args.temperature, args.top_k, args.top_p)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token from one position's logits [V] (fp32, CPU)."""
    if sampling.greedy:
        return int(logits.argmax())
    if sampling.temperature > 0:
        logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p > 0:
        ordered, order = logits.sort(descending=True)
        probs = ordered.softmax(-1)
        # keep the most likely tokens until their mass reaches top_p (at least one)
        drop = (probs.cumsum(-1) - probs) > sampling.top_p
        logits = logits.index_fill(0, order[drop], float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def generate_tokens(logits_fn, prompt: list[int], *, max_new_tokens: int, eod: int,
                    max_positions: int, vocab_size: int | None = None,
                    sampling: Sampling = Sampling(), generator: torch.Generator | None = None,
                    use_cache: bool = True, stop=None) -> tuple[list[int], bool]:
    """(new tokens, finished): decode after ``prompt`` until end-of-document (not included,
    finished=True), ``stop(new_tokens)`` is true (finished=True), ``max_new_tokens``, or
    ``max_positions`` tokens in all.

    Padded vocabulary rows (ids >= ``vocab_size``) are never chosen. The KV cache is used
    when ``use_cache`` and the logits function takes one (``logits_fn.takes_cache``).
    """
    cache = KVCache() if use_cache and getattr(logits_fn, "takes_cache", False) else None
    tokens, new = list(prompt), []
    feed = tokens
    while len(new) < max_new_tokens and len(tokens) < max_positions:
        batch = torch.tensor([feed], dtype=torch.long)
        logits = logits_fn(batch, cache=cache) if cache is not None else logits_fn(batch)
        token = next_token(logits[0, -1, :vocab_size].float(), sampling, generator)
        if token == eod:
            return new, True
        new.append(token)
        tokens.append(token)
        if stop is not None and stop(new):
            return new, True
        feed = [token] if cache is not None else tokens
    return new, False


class Generator:
    """Completions of text prompts under the run's generation keys (every rank calls it)."""

    def __init__(self, logits_fn, tokenizer, args, *, max_positions: int):
        self.logits_fn, self.tokenizer = logits_fn, tokenizer
        self.max_positions, self.use_cache = max_positions, not args.recompute
        self.max_new_tokens = args.maximum_tokens
        if self.max_new_tokens >= max_positions:
            log.warning("maximum_tokens %d is beyond the model's context of %d tokens "
                        "(max_position_embeddings): completions stop when prompt + completion fill it; "
                        "lower maximum_tokens to at most %d", self.max_new_tokens, max_positions, max_positions - 1)
        self.sampling = Sampling.from_args(args)
        self.generator = torch.Generator().manual_seed(args.seed)

    def complete(self, context: str) -> dict:
        start = time.time()
        prompt = list(self.tokenizer.tokenize(context)) if context else [self.tokenizer.eod]
        message = None
        if len(prompt) >= self.max_positions:
            message = (f"context of {len(prompt)} tokens cut to its last {self.max_positions - 1} "
                       f"(max_position_embeddings {self.max_positions})")
            prompt = prompt[-(self.max_positions - 1):]
        new, finished = generate_tokens(
            self.logits_fn, prompt, max_new_tokens=self.max_new_tokens, eod=self.tokenizer.eod,
            max_positions=self.max_positions, vocab_size=self.tokenizer.vocab_size,
            sampling=self.sampling, generator=self.generator, use_cache=self.use_cache)
        if not new:
            message = message or "the first generated token was end-of-document"
        elif not finished and len(new) < self.max_new_tokens:
            message = message or (f"stopped at the context limit: prompt + completion reached "
                                  f"max_position_embeddings {self.max_positions} tokens before "
                                  f"maximum_tokens {self.max_new_tokens}")
        return {"context": context, "text": self.tokenizer.detokenize(new), "length": len(new),
                "finished": finished, "message": message,
                "duration_seconds": round(time.time() - start, 4)}


def read_prompts(path, prompt_end: str) -> list[str]:
    """NeoX's input-file rule: split on prompt_end, strip, drop empty prompts."""
    if path is None:
        raise ConfigError("text_gen_type input-file needs sample_input_file: a text file of "
                          "prompts separated by prompt_end (a newline by default)")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"sample_input_file {path}: cannot read it as UTF-8 text ({e})") from None
    prompts = [p.strip() for p in text.split(prompt_end)]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DataError(f"sample_input_file {path}: no prompts (separated by prompt_end "
                        f"{prompt_end!r})")
    return prompts


def _interactive_prompts(is_writer: bool):
    """Prompts typed on rank 0, shared with every rank; ends on 'stop' or end of input."""
    while True:
        text = None
        if is_writer:
            try:
                text = input("Context prompt (stop to exit) >>> ")
            except EOFError:
                text = "stop"
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shared = [text]
            dist.broadcast_object_list(shared, src=0)
            text = shared[0]
        if text.strip() == "stop":
            return
        yield text.strip()


def run(generator: Generator, args, *, is_writer: bool) -> list[dict]:
    """Run ``args.text_gen_type``; rank ``is_writer`` writes/prints. Returns the records."""
    mode = args.text_gen_type
    output = args.sample_output_file
    if mode == "unconditional":
        prompts = [""] * args.num_samples
    elif mode == "input-file":
        prompts = read_prompts(args.sample_input_file, args.prompt_end)
        output = output or f"{args.sample_input_file}.output.jsonl"
    else:
        prompts, output = _interactive_prompts(is_writer), None
    records = []
    sink = None
    if is_writer and output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        sink = open(output, "w", encoding="utf-8")
    try:
        for context in prompts:
            record = generator.complete(context)
            records.append(record)
            if sink is not None:  # line by line: an interrupted run keeps what it finished
                sink.write(json.dumps(record) + "\n")
                sink.flush()
            if is_writer and mode == "interactive":
                print(f"{context}{record['text']}", flush=True)
    finally:
        if sink is not None:
            sink.close()
    if is_writer and output:
        print(f"generate: {len(records)} completion(s) written to {output}", file=sys.stderr)
    return records
