"""The one validation of a generation request's prompt and length, used by the scheduler, HTTP and the CLI, and the one
expansion of a request into its choices (n per prompt, seeds, the default max_tokens).

Sampling parameters validate themselves (proto.types.SAMPLING_BOUNDS); this checks what needs
the model and the cache: a prompt's tokens, its length, and prompt plus max_tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from stagecoach.errors import ContextLengthError, RequestError
from stagecoach.proto.types import SamplingParams


@dataclass(slots=True, frozen=True)
class RequestLimits:
    max_model_len: int  # prompt + generated tokens of one sequence at most
    vocab_size: int | None = None  # token ids must be below this (None: not known here)
    kv_capacity: int | None = None  # token slots of the KV cache (None: not started yet)
    max_position_embeddings: int | None = None  # the model's own limit, named in messages when known


def check_request(
    prompt: list[int], sampling: SamplingParams | None, limits: RequestLimits, param: str = "prompt"
) -> None:
    """Raises RequestError (ContextLengthError for lengths) naming `param` or max_tokens, with the numbers."""
    n, limit = len(prompt), limits.max_model_len
    if n == 0:
        raise RequestError("the prompt is empty: give at least one token", param=param)
    if limits.vocab_size is not None:
        bad = next((t for t in prompt if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary of {limits.vocab_size}", param=param)
    positions = (
        f"; max_position_embeddings is {limits.max_position_embeddings}" if limits.max_position_embeddings else ""
    )
    if n >= limit:
        raise ContextLengthError(
            f"this model's maximum context length is {limit} tokens (the limit is {limit} including at least one generated "
            f"token{positions}); the prompt has {n} tokens; shorten the prompt",
            param=param,
        )
    if sampling is None:
        return
    if n + sampling.max_tokens > limit:
        raise ContextLengthError(
            f"this model's maximum context length is {limit} tokens; the prompt has {n} tokens and max_tokens asks for "
            f"{sampling.max_tokens}; shorten the prompt or lower max_tokens",
            param="max_tokens",
        )
    if limits.kv_capacity is not None and min(n + sampling.max_tokens, limit) > limits.kv_capacity:
        raise ContextLengthError(
            f"prompt ({n} tokens) + max_tokens ({sampling.max_tokens}) exceeds the KV cache's {limits.kv_capacity} token slots; "
            f"lower max_tokens or give the cache more blocks",
            param="max_tokens",
        )


def sampling_defaults(model_dir: str | Path) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json (HF semantics: do_sample false → greedy)."""
    path = Path(model_dir) / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if gen.get(k) is not None}
    if not gen.get("do_sample", False):
        defaults["temperature"] = 0.0
    return defaults


def expand_choices(
    prompts: list[list[int]],
    sampling: SamplingParams,
    max_model_len: int,
    max_tokens_given: bool,
    default_cap: int | None = None,
) -> list[tuple[list[int], SamplingParams]]:
    """(prompt, sampling) of every choice, as HTTP and the CLI both build them: `n` per prompt, seeded seed, seed + 1, …
    (unseeded ones stay unseeded: the engine gives each its own); without a given max_tokens, what the prompt's context
    leaves, at most default_cap (None: no cap)."""
    out = []
    for prompt in prompts:
        max_tokens = sampling.max_tokens
        if not max_tokens_given:
            max_tokens = max(1, max_model_len - len(prompt))
            max_tokens = min(max_tokens, default_cap) if default_cap is not None else max_tokens
        for k in range(sampling.n):
            seed = None if sampling.seed is None else (sampling.seed + k) % 2**63
            out.append((prompt, replace(sampling, max_tokens=max_tokens, seed=seed)))
    return out
