"""OpenAI request bodies → validated generation requests; every mistake names its parameter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stagecoach.errors import RequestError, StagecoachError
from stagecoach.stage.batch import SamplingParams


class ApiError(StagecoachError):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_parameter")


# Parameters OpenAI defines that change what comes back and that this server does not do.
UNSUPPORTED = {
    "tools": "tool calls", "tool_choice": "tool calls", "functions": "function calls", "function_call": "function calls",
    "suffix": "suffixes", "best_of": "best_of", "response_format": "structured output", "logit_bias": "logit_bias",
}


_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "stop", "seed", "n", "logprobs", "stream", "stream_options", "ignore_eos", "user",
}
KNOWN_CHAT = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"} | set(UNSUPPORTED)
KNOWN_COMPLETION = _COMMON | {"prompt", "echo"} | set(UNSUPPORTED)


@dataclass(slots=True)
class GenerationRequest:
    prompts: list[list[int]]  # one entry per prompt (completions may batch several)
    sampling: SamplingParams  # shared by every choice; seeds are varied per choice
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    max_tokens_given: bool = False
    logprobs: int | None = None  # None: off; else the number of alternatives (0: only the chosen token)


def _number(body: dict, name: str, kind=float, low=None, high=None, default=None):
    if name not in body or body[name] is None:
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise bad(name, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise bad(name, f"'{name}' must be finite, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        rng = f"between {low} and {high}" if low is not None and high is not None else (f">= {low}" if low is not None else f"<= {high}")
        raise bad(name, f"'{name}' must be {rng}, got {value!r}")
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


def parse_common(body: dict, defaults: dict, chat: bool) -> GenerationRequest:
    """Everything but the prompt: sampling, n, stream, stop, logprobs."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
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
    max_tokens = _number(body, "max_completion_tokens", int, low=1) if chat else None
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int, low=1)
    if chat and body.get("logprobs") not in (None, False, True):
        raise bad("logprobs", "'logprobs' must be true or false")
    if chat:
        logprobs = _number(body, "top_logprobs", int, 0, 20, default=0) if body.get("logprobs") else None
        if not body.get("logprobs") and body.get("top_logprobs") is not None:
            raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    else:
        logprobs = _number(body, "logprobs", int, 0, 20)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "'stream' must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", "'stream_options' must be an object")
    if options and not stream:
        raise bad("stream_options", "'stream_options' is only allowed with 'stream': true")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos", "'ignore_eos' must be true or false")
    seed = _number(body, "seed", int, low=0, high=2**63 - 1)
    try:
        sampling = SamplingParams(
            temperature=_number(body, "temperature", float, 0, 2, defaults.get("temperature", 1.0)),
            top_p=_number(body, "top_p", float, 0, 1, defaults.get("top_p", 1.0)),
            top_k=_number(body, "top_k", int, -1, None, defaults.get("top_k", 0)),
            repetition_penalty=_number(body, "repetition_penalty", float, 0, None, defaults.get("repetition_penalty", 1.0)),
            presence_penalty=_number(body, "presence_penalty", float, -2, 2, 0.0),
            frequency_penalty=_number(body, "frequency_penalty", float, -2, 2, 0.0),
            seed=seed,
            max_tokens=max_tokens or 1,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
        )
    except RequestError as e:
        name = str(e).split(" ", 1)[0]
        raise bad(name, str(e)) from None
    return GenerationRequest(
        prompts=[],
        sampling=sampling,
        n=_number(body, "n", int, 1, 16, 1),
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        stop=_stop(body),
        max_tokens_given=max_tokens is not None,
        logprobs=logprobs,
    )


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
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise bad(f"messages[{i}].content", f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def parse_prompt(body: dict, encode) -> list[list[int]]:
    """'prompt' as text, token ids, or a list of either."""
    prompt = body.get("prompt")

    def one(p, where: str) -> list[int]:
        if isinstance(p, str):
            return encode(p)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return list(p)
        raise bad("prompt", f"{where} must be a string or a non-empty list of token ids")

    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        return [one(prompt, "'prompt'")]
    if isinstance(prompt, list) and prompt and len(prompt) <= 64:
        return [one(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    raise bad("prompt", "'prompt' must be a string, a list of token ids, or a list of up to 64 of those")
