"""A Frugal inference package as a model of EleutherAI's lm-evaluation-harness (MMLU, GSM8K, HumanEval, or
any local task):

    lm_eval --model frugal --model_args package=PATH[,kv_cache=int8][,speculative=false][,max_gen_toks=N] \\
        --tasks mmlu --batch_size 8

`frugal` is declared under the `lm_eval.models` entry-point group (here and in a release wheel), which
lm_eval reads once its plugin discovery is released; lm_eval 0.4.13 does not read it, and there
`python -m inference.runtime.lm_eval_adapter ARGS` (from a checkout or an installed release) is
lm_eval's own CLI with `frugal` registered.

Scoring (loglikelihood, loglikelihood_rolling) runs the package's target over each whole sequence
through its KV cache, so the package's cache format (INT8, say) is part of what is scored, as it is part
of what is served. Requests are sorted by length and batched (lm_eval's --batch_size) with right
padding, which causal attention keeps out of every real position. Tokenization is lm_eval's
TemplateLM's: the continuation's tokens are those of context + continuation after the context's own
(trailing spaces of the context move to the continuation); an empty context is <|eos|>, the document
separator the model was trained with; a sequence longer than the context loses tokens from the left.

Generation (generate_until) decodes one request at a time, speculatively when the package has a draft
(lossless: greedy output is the target's own), greedily unless the request sets do_sample (sampled
draws come from torch's global generator, which lm_eval seeds). It stops at <|eos|>, after max_gen_toks
tokens, or as soon as the text holds one of the request's `until` strings, and is cut before it. The
prompt keeps its last max_seq_len - max_gen_toks tokens (less gamma when speculative; max_gen_toks is
lowered to leave at least one).

The runtime runs on the CPU, as inference.runtime.generate does: lm_eval's --device is accepted and ignored.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from inference.runtime.generate import PAD_TOKEN, SamplingConfig
from inference.runtime.package import bundled_package, load_package
from inference.runtime.speculative import SpeculativeGenerator


class FrugalLM(TemplateLM):
    """lm_eval's model interface over an inference package (see the module docstring)."""

    def __init__(
        self,
        package: str | None = None,
        kv_cache: str | None = None,
        speculative: bool | None = None,
        batch_size: int | str = 1,
        max_gen_toks: int = 256,
        device: str | None = None,
        max_batch_size: int | None = None,
    ):
        """package: the package folder (verified on load; default: the one a release wheel carries);
        kv_cache: overrides the one package.json names;
        speculative: decode with the draft (default: when the package has one); batch_size: sequences
        scored per forward pass; max_gen_toks: the generation limit when a request sets none. device and
        max_batch_size come from lm_eval's CLI and are unused (CPU runtime; no automatic batch size)."""
        super().__init__()
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise ValueError(f"batch_size must be a number, got {batch_size!r}") from None
        self.package = load_package(package or bundled_package(), kv_cache=kv_cache)
        self.target = self.package.target
        if speculative and self.package.draft is None:
            raise ValueError(f"{package}: speculative=true, but the package has no draft")
        self.speculative = self.package.draft is not None if speculative is None else speculative
        self.generator = (
            SpeculativeGenerator(self.target, self.package.draft, self.package.gamma)
            if self.speculative
            else self.target
        )
        self.tokenizer = self.target.tokenizer
        self.pad = self.tokenizer.token_to_id(PAD_TOKEN)
        self.max_gen_toks = max_gen_toks

    @property
    def eot_token_id(self) -> int:
        return self.target.eos

    @property
    def max_length(self) -> int:
        return self.target.model.config.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of `string`; the tokenizer adds no special tokens, whatever add_special_tokens says."""
        return self.tokenizer.encode(string).ids

    def get_model_info(self) -> dict:
        """What was evaluated, recorded in lm_eval's results["config"]."""
        return {
            "frugal_package": self.package.name,
            "frugal_package_version": self.package.meta.get("version"),
            "speculative": self.speculative,
        }

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        scores = self._score([(context, continuation) for _, context, continuation in requests], disable_tqdm)
        for (pair, _, _), score in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood", pair, score)
        return scores

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(sum of log p(continuation token | everything before it), whether every continuation token is
        the argmax) for each (context ids, continuation ids) pair."""
        rows = []
        for context, continuation in pairs:
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens exceeds the context {self.max_length}")
            tokens = (context + continuation)[-(self.max_length + 1) :]
            rows.append((tokens[:-1], continuation))  # the last token is only predicted, never fed
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        scores: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        model = self.target.model
        batches = range(0, len(order), self.batch_size)
        for start in tqdm(batches, desc="Scoring", disable=disable_tqdm):
            batch = order[start : start + self.batch_size]
            T = len(rows[batch[0]][0])
            tokens_BT = torch.tensor([rows[i][0] + [self.pad] * (T - len(rows[i][0])) for i in batch])
            logprobs_BTV = model(tokens_BT, 0, model.new_cache(len(batch), T)).float().log_softmax(-1)
            for b, i in enumerate(batch):
                inputs, continuation = rows[i]
                logprobs_NV = logprobs_BTV[b, len(inputs) - len(continuation) : len(inputs)]
                target_N = torch.tensor(continuation, dtype=torch.long)
                total = logprobs_NV.gather(-1, target_N[:, None]).sum()
                scores[i] = (float(total), bool((logprobs_NV.argmax(-1) == target_N).all()))
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, every token predicted once: the first window starts from
        <|eos|>, later ones condition on the full context before the tokens they predict."""
        out = []
        for request in tqdm(requests, desc="Rolling log-likelihood", disable=disable_tqdm):
            (text,) = request.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            total = sum(logprob for logprob, _ in self._score(list(map(make_disjoint_window, windows)), True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in tqdm(requests, desc="Generating", disable=disable_tqdm):
            context, gen_kwargs = request.args
            text = self._generate(context, dict(gen_kwargs))
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
        return out

    def _generate(self, context: str, gen_kwargs: dict) -> str:
        """One request's continuation (see the module docstring). gen_kwargs: until (a string or a list),
        max_gen_toks, do_sample, temperature (1 when sampling and unset), top_p, top_k."""
        until = gen_kwargs.pop("until", [])
        until = [stop for stop in ([until] if isinstance(until, str) else until) if stop]
        budget = self.max_length - (self.package.gamma if self.speculative else 0)
        max_new = min(int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks)), budget - 1)
        do_sample = bool(gen_kwargs.pop("do_sample", False))
        temperature = float(gen_kwargs.pop("temperature", 1.0))
        top_p, top_k = gen_kwargs.pop("top_p", None), gen_kwargs.pop("top_k", None)
        if gen_kwargs:
            raise ValueError(f"generation kwargs the frugal model does not support: {sorted(gen_kwargs)}")
        cfg = SamplingConfig(
            max_new_tokens=max_new,
            temperature=temperature if do_sample else 0.0,
            top_p=top_p,
            top_k=top_k,
        )
        prompt = (self.tok_encode(context) or [self.eot_token_id])[-(budget - max_new) :]
        ids: list[int] = []
        for token in self.generator.stream(prompt, cfg):
            ids.append(token)
            if until and any(stop in self.tokenizer.decode(ids) for stop in until):
                break
        text = self.tokenizer.decode(ids)
        for stop in until:
            text = text.split(stop)[0]
        return text


def main() -> None:
    """lm_eval's CLI with `frugal` registered, for lm_eval releases that do not read the entry point."""
    import lm_eval.models  # noqa: F401  (the built-in models: lm_eval adds them only to an empty registry)
    from lm_eval.__main__ import cli_evaluate

    register_model("frugal")(FrugalLM)
    cli_evaluate()


if __name__ == "__main__":
    main()
