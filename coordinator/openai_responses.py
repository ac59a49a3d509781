"""OpenAI's response shapes: completions and chat completions, their stream chunks, logprobs, usage and error bodies."""

from __future__ import annotations

import time
import uuid

from stagecoach.coordinator.openai_requests import GenerationRequest
from stagecoach.coordinator.sequence_stream import Choice
from stagecoach.coordinator.tokenizer import Tokenizer
from stagecoach.errors import ErrorKind, RequestError


def error_body(error: BaseException, kind: ErrorKind, message: str | None = None) -> dict:
    """OpenAI's error object; the same for a plain response and a stream's error event."""
    param = error.param if isinstance(error, RequestError) else None
    return {
        "error": {
            "message": message or str(error) or type(error).__name__,
            "type": kind.openai_type,
            "param": param,
            "code": kind.openai_code,
        }
    }


def _piece(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def usage(prompts: list[list[int]], n: int, choices: list[Choice]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(c.num_tokens for c in choices)
    cached = sum(
        c.cached_tokens for c in choices[::n]
    )  # each prompt's first choice (choices run prompt by prompt, n each)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def chat_logprobs(tokenizer: Tokenizer, choice: Choice, start: int, end: int) -> dict:
    def entry(token_id, logprob):
        piece = _piece(tokenizer, token_id)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    content = []
    for i in range(start, end):
        item = entry(choice.token_ids[i], choice.logprobs[i])
        item["top_logprobs"] = [entry(t, lp) for t, lp in (choice.top_logprobs[i] or [])]
        content.append(item)
    return {"content": content}


def completion_logprobs(tokenizer: Tokenizer, choice: Choice, start: int, end: int) -> dict:
    return {
        "tokens": [_piece(tokenizer, t) for t in choice.token_ids[start:end]],
        "token_logprobs": choice.logprobs[start:end],
        "top_logprobs": [
            {_piece(tokenizer, t): lp for t, lp in (tops or [])} for tops in choice.top_logprobs[start:end]
        ],
    }


def response_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def choice_item(
    tokenizer: Tokenizer, req: GenerationRequest, chat: bool, c: Choice, delta: str | None = None, start: int = 0
) -> dict:
    """One choice of a full response (delta None) or of a stream chunk (delta: its new text; start: its first new token)."""
    logprobs = None
    if req.logprobs is not None and (delta is None or len(c.token_ids) > start):
        logprobs = (chat_logprobs if chat else completion_logprobs)(tokenizer, c, start, len(c.token_ids))
    if not chat:
        body = {"text": c.text if delta is None else delta}
    elif delta is None:
        body = {"message": {"role": "assistant", "content": c.text}}
    else:
        body = {"delta": {"content": delta} if delta else {}}
    return {"index": c.index, **body, "logprobs": logprobs, "finish_reason": c.finish_reason}


def full_response(tokenizer: Tokenizer, model: str, req: GenerationRequest, chat: bool, choices: list[Choice]) -> dict:
    return {
        "id": response_id(chat),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice_item(tokenizer, req, chat, c) for c in choices],
        "usage": usage(req.prompts, req.sampling.n, choices),
    }


class ChunkMaker:
    """Stream chunks of one response: same id, object and creation time on each."""

    def __init__(self, model: str, chat: bool) -> None:
        self.head = {
            "id": response_id(chat),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

    def __call__(self, choice_items: list[dict]) -> dict:
        return self.head | {"choices": choice_items}

    @staticmethod
    def role(choices: list[Choice]) -> list[dict]:
        """A chat stream's first chunk: the assistant's role for every choice."""
        return [
            {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for c in choices
        ]
