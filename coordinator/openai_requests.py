"""OpenAI request bodies → generation requests; every mistake is a RequestError naming its parameter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stagecoach.errors import RequestError
from stagecoach.proto.types import SamplingParams


def bad(param: str, message: str) -> RequestError:
    return RequestError(message, param=param)


# Parameters OpenAI defines that change what comes back and that this server does not do.
UNSUPPORTED = {
    "tools": "tool calls",
    "tool_choice": "tool calls",
    "functions": "function calls",
    "function_call": "function calls",
    "suffix": "suffixes",
    "best_of": "best_of",
    "response_format": "structured output",
    "logit_bias": "logit_bias",
}


_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "seed",
    "n",
    "logprobs",
    "stream",
    "stream_options",
    "ignore_eos",
    "user",
}
KNOWN_CHAT = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"} | set(UNSUPPORTED)
KNOWN_COMPLETION = _COMMON | {"prompt", "echo"} | set(UNSUPPORTED)


@dataclass(slots=True)
class GenerationRequest:
    prompts: list[list[int]]  # one entry per prompt (completions may batch several)
    sampling: SamplingParams  # shared by every choice (sampling.n per prompt); seeds are varied per choice
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    max_tokens_given: bool = False
    logprobs: int | None = None  # None: off; else the number of alternatives (0: only the chosen token)


def _number(body: dict, name: str, kind=float, default=None):
    """A JSON number of the right kind; its bounds are SamplingParams' (proto.types.SAMPLING_BOUNDS)."""
    if name not in body or body[name] is None:
        return default
    value = body[name]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not float(value).is_integer())
    ):
        raise bad(name, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise bad(name, f"'{name}' must be finite, got {value!r}")
    return kind(value)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise bad("stop", "'stop' must be a non-empty string or a list of up to 16 non-empty strings")
    return stop


def _check_known(body: dict, chat: bool) -> None:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - (KNOWN_CHAT if chat else KNOWN_COMPLETION))
    if unknown:
        raise bad(unknown[0], f"unrecognized request argument '{unknown[0]}'")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user", "'user' must be a string")
    for name, what in UNSUPPORTED.items():
        if body.get(name) not in (None, [], {}, 1 if name == "best_of" else None):
            raise bad(name, f"'{name}' is not supported: this server does not do {what}")
    if body.get("echo"):
        raise bad("echo", "'echo' is not supported")


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise bad(name, f"'{name}' must be true or false")
    return value


def _logprobs(body: dict, chat: bool) -> int | None:
    if not chat:
        return _number(body, "logprobs", int)
    if body.get("logprobs") not in (None, False, True):
        raise bad("logprobs", "'logprobs' must be true or false")
    if not body.get("logprobs") and body.get("top_logprobs") is not None:
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return _number(body, "top_logprobs", int, default=0) if body.get("logprobs") else None


def parse_common(body: dict, defaults: dict, chat: bool) -> GenerationRequest:
    """Everything but the prompt: sampling, n, stream, stop, logprobs."""
    _check_known(body, chat)
    max_tokens = _number(body, "max_completion_tokens", int) if chat else None
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int)
    logprobs = _logprobs(body, chat)
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", "'stream_options' must be an object")
    if options and not stream:
        raise bad("stream_options", "'stream_options' is only allowed with 'stream': true")
    values = {name: _number(body, name, kind, defaults.get(name)) for name, kind in _SAMPLING_NUMBERS.items()}
    try:
        sampling = SamplingParams(
            **{k: v for k, v in values.items() if v is not None},
            max_tokens=max_tokens if max_tokens is not None else 1,  # a placeholder: filled per prompt later
            ignore_eos=_flag(body, "ignore_eos"),
            logprobs=logprobs,
        )
    except RequestError as e:
        if chat and e.param == "logprobs":  # chat names the count top_logprobs
            raise bad("top_logprobs", str(e).replace("logprobs", "top_logprobs", 1)) from None
        raise
    return GenerationRequest(
        prompts=[],
        sampling=sampling,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        stop=_stop(body),
        max_tokens_given=max_tokens is not None,
        logprobs=logprobs,
    )


_SAMPLING_NUMBERS = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "repetition_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "seed": int,
    "n": int,
}


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
            raise bad(f"messages[{i}].role", f"messages[{i}] needs a role of system, user or assistant")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise bad(f"messages[{i}].content", f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def parse_prompt(body: dict) -> list[str | list[int]]:
    """'prompt' as text, token ids, or a list of either; texts stay texts (the caller tokenises them, off the event
    loop when they are long)."""
    prompt = body.get("prompt")

    def one(p, where: str) -> str | list[int]:
        if isinstance(p, str):
            return p
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return list(p)
        raise bad("prompt", f"{where} must be a string or a non-empty list of token ids")

    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        return [one(prompt, "'prompt'")]
    if isinstance(prompt, list) and prompt and len(prompt) <= 64:
        return [one(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    raise bad("prompt", "'prompt' must be a string, a list of token ids, or a list of up to 64 of those")
