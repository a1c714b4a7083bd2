"""lm-eval adapter: score lm-eval requests with our model.

The adapter subclasses lm-eval's ``TemplateLM``, so the request -> token logic
(context/continuation split, trailing-space handling, empty-context prefix token)
is lm-eval's own, the same code path ``lm_eval --model hf`` takes. What we supply is
the tokenizer and a *logits function*: ``logits_fn(tokens [b, s]) -> logits [b, s, V]``.
Under tensor or pipeline parallelism that function is collective: every rank runs
the harness on the same requests in the same order and calls it together; rank 0
writes the results.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

log = logging.getLogger(__name__)


class NeoXEvalLM(TemplateLM):
    """lm-eval model over ``logits_fn`` and one of our tokenizers (tokenize/detokenize/eod)."""

    def __init__(self, logits_fn, tokenizer, *, max_length: int, batch_size: int = 8,
                 max_gen_toks: int = 256):
        super().__init__()
        self.logits_fn = logits_fn
        self.neox_tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks

    @property
    def eot_token_id(self) -> int:
        return self.neox_tokenizer.eod

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return list(self.neox_tokenizer.tokenize(string))

    def tok_decode(self, tokens) -> str:
        return self.neox_tokenizer.detokenize(list(tokens))

    # ---- scoring -------------------------------------------------------------------

    def _continuation_logprobs(self, sequences: list[tuple[list[int], list[int]]]):
        """(log P(continuation | context), greedy?) for each (context, continuation) pair.

        The model sees the last ``max_length`` tokens of context+continuation minus the
        final token (as HF's lm-eval model does); rows are right-padded, which leaves
        the real positions untouched under a causal mask.
        """
        inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for ctx, cont in sequences]
        width = max(len(x) for x in inputs)
        tokens = torch.zeros(len(inputs), width, dtype=torch.long)
        for row, x in enumerate(inputs):
            tokens[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        logprobs = F.log_softmax(self.logits_fn(tokens).float(), dim=-1)
        results = []
        for row, ((_, cont), x) in enumerate(zip(sequences, inputs)):
            picked = logprobs[row, len(x) - len(cont): len(x)]
            target = torch.tensor(cont, dtype=torch.long)
            greedy = bool((picked.argmax(dim=-1) == target).all())
            results.append((float(picked.gather(-1, target[:, None]).sum()), greedy))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        # Longest first, so a batch's padding is small; answers go back in request order.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        answers: list = [None] * len(requests)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm,
                          desc="Running loglikelihood requests"):
            chunk = order[start: start + self.batch_size]
            scored = self._continuation_logprobs([(requests[i][1], requests[i][2]) for i in chunk])
            for i, answer in zip(chunk, scored):
                answers[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm,
                              desc="Running loglikelihood_rolling requests"):
            windows = map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows],
                                                disable_tqdm=True)
            total = sum(logprob for logprob, _ in scored)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            totals.append(total)
        return totals

    # ---- generation ----------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (with the KV cache when the model takes one); stops at any of the
        request's ``until`` strings or EOD."""
        from megatron.text_generation import generate_tokens

        outputs = []
        eos_text = self.tok_decode([self.eot_token_id])
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm,
                                        desc="Running generate_until requests"):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if kwargs.get("do_sample"):
                log.warning("generate_until: sampling requested; neox-l2e decodes greedily")
            until = handle_stop_sequences(kwargs.get("until"), eos=eos_text)
            max_new = kwargs["max_gen_toks"]
            # The context keeps room for max_new tokens, so the window never has to slide.
            tokens = self.tok_encode(context)[-max(1, self.max_length - max_new):]
            generated, _ = generate_tokens(
                self.logits_fn, tokens, max_new_tokens=max_new, eod=self.eot_token_id,
                max_positions=max(self.max_length, len(tokens) + 1),
                stop=lambda new: any(stop in self.tok_decode(new) for stop in until))
            text = self.tok_decode(generated)
            for stop in until:
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            outputs.append(text)
        return outputs
