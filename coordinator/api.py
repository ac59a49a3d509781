"""The OpenAI-compatible HTTP API's routes (aiohttp): chat and text completions, streaming or not, plus health, metrics and stats.

aiohttp rather than FastAPI: it is already installed with ray[default], it is asyncio end to
end, and it cancels a handler when its client disconnects, which is how an abandoned stream
frees its sequence's KV blocks. Every error becomes its status through errors.ERROR_TABLE, in
`errors_middleware` alone.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from dataclasses import replace

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from stagecoach.coordinator.async_engine import AsyncEngine
from stagecoach.coordinator.openai_requests import GenerationRequest, parse_common, parse_messages, parse_prompt
from stagecoach.coordinator.openai_responses import ChunkMaker, choice_item, error_body, full_response, usage
from stagecoach.coordinator.request_checks import expand_choices
from stagecoach.coordinator.sequence_stream import Choice, SequenceStream
from stagecoach.coordinator.server_metrics import Metrics, stats_document
from stagecoach.coordinator.server_state import ServerState
from stagecoach.errors import (
    AuthenticationError,
    ForbiddenError,
    ModelNotFoundError,
    NotReadyError,
    QueueFullError,
    RequestError,
    RequestTimeoutError,
    ShuttingDownError,
    StagecoachError,
    UnsupportedMediaTypeError,
    error_kind,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 2**20  # larger requests get 413
CLIENT_CLOSED = "499"  # the status label of a request whose client went away before its response ended (nginx's code)
# Prompts with fewer characters are tokenised on the event loop, which then stalls for under half a millisecond, less
# than a thread's hop adds (bench/tokenizing.py: 0.06 ms inline against 0.16 on a thread at 100 characters, 0.46 against
# 0.59 at 1,000). Longer ones go to a thread: inline stays a little cheaper up to about 16,000, but blocks every other request.
INLINE_TOKENIZE_CHARS = 1000


def _json_error(error: BaseException, message: str | None = None) -> web.Response:
    kind = error_kind(error)
    headers = {"Retry-After": str(kind.retry_after_s)} if kind.retry_after_s else None
    return web.json_response(error_body(error, kind, message), status=kind.http_status, headers=headers)


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def errors_middleware(metrics: Metrics):
    @web.middleware
    async def middleware(request: web.Request, handler):
        """The one place where errors become HTTP statuses with OpenAI's error body; every response is counted."""
        try:
            response = await handler(request)
        except (ConnectionResetError, asyncio.CancelledError) as e:
            # The client went away: a stream's write found the connection reset, or aiohttp cancelled the handler. Not
            # an error of ours: one line, counted as 499; the handler's cleanup has aborted its sequences.
            log.warning(
                "%s %s: the client closed the connection before the response ended", request.method, request.path
            )
            metrics.responses.labels(CLIENT_CLOSED, _route(request)).inc()
            if isinstance(e, asyncio.CancelledError):
                raise
            return web.Response(status=int(CLIENT_CLOSED))  # aiohttp finds the connection gone and drops it quietly
        except StagecoachError as e:
            response = _json_error(e)
        except web.HTTPException as e:  # aiohttp's own: unknown route, wrong method, body too large
            reason = e.reason or "error"
            code = reason.lower().replace(" ", "_")
            body = {"error": {"message": reason, "type": "invalid_request_error", "param": None, "code": code}}
            response = web.json_response(body, status=e.status)
        except Exception as e:  # a bug of ours: the client still gets OpenAI's error body
            log.exception("unexpected error in %s %s", request.method, request.path)
            response = _json_error(e, f"internal server error ({type(e).__name__}): {e}")
        metrics.responses.labels(str(response.status), _route(request)).inc()
        return response

    return middleware


def _check_auth(request: web.Request, state: ServerState) -> None:
    if state.api_key is not None and request.headers.get("Authorization", "") != f"Bearer {state.api_key}":
        raise AuthenticationError("missing or wrong API key: send 'Authorization: Bearer <key>'")


def _check_ready(state: ServerState) -> AsyncEngine:
    if state.draining:
        raise ShuttingDownError("the server is shutting down")
    reason = state.unavailable()
    if reason is not None:
        raise NotReadyError(f"not ready: {reason}")
    return state.engine


async def _read_json(request: web.Request) -> dict:
    if request.content_type != "application/json":
        raise UnsupportedMediaTypeError(
            f"send the body as application/json, not {request.content_type or 'no content type'}"
        )
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def _check_model(body: dict, state: ServerState) -> None:
    model = body.get("model")
    if model is not None and model != state.model_name:
        raise ModelNotFoundError(
            f"the model '{model}' does not exist; this server serves '{state.model_name}'", param="model"
        )


async def _tokenize(state: ServerState, prompts: list[str | list[int]]) -> list[list[int]]:
    """Text prompts to ids. Long ones on a thread with `encode_batch`, which releases the GIL (`encode` holds it for the
    whole call: a 2 MB prompt stalled every other request for seconds), so the loop keeps serving meanwhile."""
    texts = [p for p in prompts if isinstance(p, str)]
    if sum(map(len, texts)) < INLINE_TOKENIZE_CHARS:
        ids = iter([state.tokenizer.encode(t) for t in texts])
    else:
        ids = iter(await asyncio.get_running_loop().run_in_executor(None, state.tokenizer.encode_batch, texts))
    return [next(ids) if isinstance(p, str) else p for p in prompts]


async def _tokenize_chat(state: ServerState, messages: list[dict]) -> list[int]:
    """The chat template rendered and tokenised: on a thread (the GIL released while tokenising) for long messages."""
    if sum(len(m["content"]) for m in messages) < INLINE_TOKENIZE_CHARS:  # parse_messages made every content a string
        return state.tokenizer.encode_chat(messages, add_generation_prompt=True)
    work = functools.partial(state.tokenizer.encode_chat, messages, add_generation_prompt=True, release_gil=True)
    return await asyncio.get_running_loop().run_in_executor(None, work)


def _per_choice(req: GenerationRequest, state: ServerState) -> list[tuple[list[int], object]]:
    """(prompt, sampling) of every choice; without max_tokens a choice gets what its context leaves (OpenAI's chat)."""
    sampling = replace(req.sampling, stop_token_ids=[])  # the engine gives each the checkpoint's stop ids
    return expand_choices(req.prompts, sampling, state.max_model_len, req.max_tokens_given)


async def _start(
    engine: AsyncEngine, state: ServerState, req: GenerationRequest, chat: bool, started: float
) -> list[SequenceStream]:
    try:
        added = await engine.add_requests(_per_choice(req, state))
    except RequestError as e:
        if chat and e.param == "prompt":
            e.param = "messages"
        raise
    streams = [
        SequenceStream(
            state.tokenizer, state.metrics, Choice(index=i, seq_id=seq.seq_id), req.stop, updates, started, engine.abort
        )
        for i, (seq, updates) in enumerate(added)
    ]
    num_prompt_tokens = sum(len(p) for p in req.prompts) * req.sampling.n
    state.metrics.prompt_tokens.inc(num_prompt_tokens)
    state.metrics.input_tokens.add(num_prompt_tokens)
    state.metrics.requests_rate.add()
    return streams


async def _generate(request: web.Request, state: ServerState, req: GenerationRequest, chat: bool):
    engine = _check_ready(state)
    if state.max_active is not None and state.active >= state.max_active:
        raise QueueFullError(f"the server is at capacity ({state.active} requests running or queued); retry shortly")
    state.active += 1
    started = time.monotonic()
    streams: list[SequenceStream] = []
    try:
        streams = await _start(engine, state, req, chat, started)
        deadline = started + state.request_timeout_s
        if req.stream:
            return await _stream(request, state, req, chat, streams, deadline)
        while any(s.choice.finish_reason is None for s in streams):
            pending = [s.next_delta() for s in streams if s.choice.finish_reason is None]
            try:
                await asyncio.wait_for(asyncio.gather(*pending), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise _timed_out(state) from None
        state.metrics.requests.labels("200").inc()
        return web.json_response(
            full_response(state.tokenizer, state.model_name, req, chat, [s.choice for s in streams])
        )
    except StagecoachError as e:
        state.metrics.requests.labels(str(error_kind(e).http_status)).inc()
        raise
    except (ConnectionResetError, asyncio.CancelledError):
        state.metrics.requests.labels(CLIENT_CLOSED).inc()
        raise
    finally:
        state.active -= 1
        for s in streams:
            if s.choice.finish_reason is None:  # the client went away, or an error: free its blocks
                engine.abort(s.choice.seq_id)


def _timed_out(state: ServerState) -> RequestTimeoutError:
    return RequestTimeoutError(f"the request took longer than {state.request_timeout_s:g} s (--request-timeout)")


async def _stream(
    request: web.Request,
    state: ServerState,
    req: GenerationRequest,
    chat: bool,
    streams: list[SequenceStream],
    deadline: float,
):
    chunk = ChunkMaker(state.model_name, chat)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)

    async def send(payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        await resp.write(f"data: {data}\n\n".encode())

    if chat:
        await send(chunk(ChunkMaker.role([s.choice for s in streams])))
    pending = {asyncio.ensure_future(s.next_delta()): s for s in streams}
    try:
        while pending:
            done, _ = await asyncio.wait(
                pending, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                raise _timed_out(state)
            for task in done:
                s = pending.pop(task)
                result = task.result()
                if result is None:
                    continue
                delta, num_new = result
                if (
                    delta or s.choice.finish_reason or (num_new and req.logprobs is not None)
                ):  # every token's logprobs, text or not
                    await send(
                        chunk(
                            [
                                choice_item(
                                    state.tokenizer, req, chat, s.choice, delta, len(s.choice.token_ids) - num_new
                                )
                            ]
                        )
                    )
                if s.choice.finish_reason is None:
                    pending[asyncio.ensure_future(s.next_delta())] = s
        if req.include_usage:
            await send(chunk([]) | {"usage": usage(req.prompts, req.sampling.n, [s.choice for s in streams])})
        state.metrics.requests.labels("200").inc()
    except StagecoachError as e:  # the stream has started: report in-band with the same body, then end it properly
        kind = error_kind(e)
        state.metrics.requests.labels(str(kind.http_status)).inc()
        await send(error_body(e, kind))
    finally:
        for task in pending:
            task.cancel()
    await send("[DONE]")
    await resp.write_eof()
    return resp


async def _admin_rebalance(request: web.Request, state: ServerState) -> web.Response:
    """POST /v1/admin/rebalance: the current proposal, or the body's {"layers": [...]}, applied now (README, "Rebalancing")."""
    # Moving layers pauses every stream: only a server with an API key lets anyone ask for it.
    if state.api_key is None:
        raise ForbiddenError(
            "the admin endpoints exist only when the server has an API key: start it with --api-key-env NAME "
            "(server.api_key_env) and send 'Authorization: Bearer <key>'"
        )
    _check_auth(request, state)
    engine = state.engine
    if engine is None or engine.crashed is not None or state.draining:
        _check_ready(state)  # 503; a recovery under way is the rebalancer's 409
    layers = None
    if request.can_read_body:
        layers = (await _read_json(request)).get("layers")
        if layers is None:
            raise RequestError(
                'the body may hold only {"layers": [one count per stage]}; send no body for the current proposal',
                param="layers",
            )
    record = await asyncio.wrap_future(engine.core.rebalancer.request(layers))
    return web.json_response(record | {"stages": [s.as_json() for s in state.stages]})


def build_runner(state: ServerState) -> web.AppRunner:
    """The app as `stagecoach serve` runs it: a handler is cancelled when its client disconnects (the abort path)."""
    return web.AppRunner(build_app(state), handler_cancellation=True, access_log=None)


def build_app(state: ServerState) -> web.Application:
    app = web.Application(middlewares=[errors_middleware(state.metrics)], client_max_size=MAX_BODY_BYTES)
    routes = web.RouteTableDef()
    _generation_routes(routes, state)
    _server_routes(routes, state)
    app.add_routes(routes)
    app.router.add_post("/v1/admin/rebalance", functools.partial(_admin_rebalance, state=state))
    return app


def _generation_routes(routes: web.RouteTableDef, state: ServerState) -> None:
    """The OpenAI routes that generate: chat and text completions."""

    async def parse(request: web.Request, chat: bool) -> tuple[dict, GenerationRequest]:
        _check_auth(request, state)
        body = await _read_json(request)
        _check_model(body, state)
        return body, parse_common(body, state.sampling_defaults, chat=chat)

    @routes.post("/v1/chat/completions")
    async def chat_completions(request: web.Request):
        body, req = await parse(request, chat=True)
        req.prompts = [await _tokenize_chat(state, parse_messages(body))]
        return await _generate(request, state, req, chat=True)

    @routes.post("/v1/completions")
    async def completions(request: web.Request):
        body, req = await parse(request, chat=False)
        if not req.max_tokens_given:
            req.sampling.max_tokens = 16  # OpenAI's default for text completions
            req.max_tokens_given = True
        req.prompts = await _tokenize(state, parse_prompt(body))
        return await _generate(request, state, req, chat=False)


def _server_routes(routes: web.RouteTableDef, state: ServerState) -> None:
    """What the server says of itself: the model, health and liveness, metrics and stats."""

    @routes.get("/v1/models")
    async def models(request: web.Request):
        _check_auth(request, state)
        model = {
            "id": state.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "stagecoach",
            "max_model_len": state.max_model_len,
        }
        return web.json_response({"object": "list", "data": [model]})

    @routes.get("/health")
    async def health(request: web.Request):
        reason = state.unavailable()
        ready = reason is None and not state.draining
        status = "ok" if ready else ("draining" if state.draining else "starting")
        if state.startup_error or state.gave_up or (state.engine and state.engine.crashed):
            status = "failed"
        return web.json_response({"status": status, "stages": len(state.stages)}, status=200 if ready else 503)

    @routes.get("/live")
    async def live(request: web.Request):
        # Liveness: the process answers, also while stages load or recover (minutes for a 32B
        # stage), when /health is 503; only a hung server, or one whose engine failed too often, should be restarted.
        if state.gave_up:
            return web.json_response({"status": "failed", "reason": state.gave_up}, status=503)
        return web.json_response({"status": "alive"})

    @routes.get("/metrics")
    async def metrics(request: web.Request):
        return web.Response(body=generate_latest(state.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @routes.get("/v1/stats")
    async def stats(request: web.Request):
        _check_auth(request, state)
        return web.json_response(stats_document(state))
