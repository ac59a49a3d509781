"""The OpenAI-compatible HTTP API (aiohttp): chat and text completions, streaming or not, plus health, metrics and stats.

aiohttp rather than FastAPI: it is already installed with ray[default], it is asyncio end to
end, and it cancels a handler when its client disconnects, which is how an abandoned stream
frees its sequence's KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from stagecoach.coordinator.async_engine import AsyncEngine
from stagecoach.coordinator.metrics import WINDOW, Rate, percentiles
from stagecoach.coordinator.protocol import ApiError, GenerationRequest, parse_common, parse_messages, parse_prompt
from stagecoach.coordinator.tokenizer import IncrementalDetokenizer, Tokenizer
from stagecoach.errors import RequestError, StagecoachError

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, state: ServerState) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("stagecoach_requests", "Finished HTTP generation requests by status code", ["status"], registry=r)
        self.prompt_tokens = Counter("stagecoach_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("stagecoach_generation_tokens", "Tokens generated", registry=r)
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("stagecoach_time_to_first_token_seconds", "Time from request to its first token", buckets=latency, registry=r)
        self.itl = Histogram("stagecoach_inter_token_latency_seconds", "Time between consecutive tokens of a sequence", buckets=latency, registry=r)
        fine = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
        self.stage_compute = Histogram("stagecoach_stage_compute_seconds", "A stage's compute time per microbatch", ["stage"], buckets=fine, registry=r)
        self.stage_queue = Histogram("stagecoach_stage_queue_seconds", "Time a microbatch waited in a stage's queue", ["stage"], buckets=fine, registry=r)
        self.hop = Histogram("stagecoach_hop_seconds", "Sending a microbatch onward, until the receiver acknowledged it, timed by the sender",
                             ["sender"], buckets=fine, registry=r)
        self.stage_up = Gauge("stagecoach_stage_up", "1 when the stage answers its health check", ["stage"], registry=r)
        self.recoveries = Counter("stagecoach_recoveries", "Pipeline recoveries after a stage failure", registry=r)
        self.recovery_seconds = Histogram("stagecoach_recovery_seconds", "How long each recovery took", buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300), registry=r)
        # Rolling views for /v1/stats and the terminal UI.
        self.ttft_window: deque = deque(maxlen=WINDOW)
        self.itl_window: deque = deque(maxlen=WINDOW)
        self.input_tokens = Rate()
        self.output_tokens = Rate()
        self.requests_rate = Rate()

        def stat(key):
            return lambda: state.engine.stats(with_timings=False).get(key, 0) if state.engine else 0

        for name, key, doc in (
            ("stagecoach_requests_running", "running", "Sequences holding KV blocks"),
            ("stagecoach_requests_waiting", "waiting", "Sequences waiting for KV blocks or a slot"),
            ("stagecoach_kv_blocks_used", "kv_blocks_used", "KV cache blocks in use (per stage; every stage has the same layout)"),
            ("stagecoach_kv_blocks_total", "kv_blocks_total", "KV cache blocks per stage"),
            ("stagecoach_microbatches_inflight", "inflight", "Microbatches in the pipeline now"),
        ):
            Gauge(name, doc, registry=r).set_function(stat(key))

    def observe_timing(self, kind: str, label: str, seconds: float) -> None:
        """TimingStats' observer: every stage record lands in the labelled histograms."""
        if kind == "compute":
            self.stage_compute.labels(label).observe(seconds)
        elif kind == "queue":
            self.stage_queue.labels(label).observe(seconds)
        else:
            self.hop.labels(label).observe(seconds)


@dataclass
class ServerState:
    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    sampling_defaults: dict
    api_key: str | None = None
    max_active: int | None = None  # requests running + queued; beyond this: 429
    request_timeout_s: float = 600.0  # a generation request taking longer ends with 408
    engine: AsyncEngine | None = None  # set once every stage is ready
    stages: list = field(default_factory=list)
    draining: bool = False
    active: int = 0
    startup_error: str | None = None
    metrics: Metrics | None = None
    stage_states: list[str] = field(default_factory=list)  # per stage: ready | failed (recovering comes with recovery)
    started_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self)


def _json_error(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    """The one place where errors become HTTP statuses with OpenAI's error body."""
    try:
        return await handler(request)
    except ApiError as e:
        return _json_error(e)
    except RequestError as e:
        return _json_error(ApiError(400, str(e)))
    except StagecoachError as e:
        return _json_error(ApiError(500, str(e), "server_error"))
    except web.HTTPException as e:
        return _json_error(ApiError(e.status, e.reason or "error", "invalid_request_error"))


def _check_auth(request: web.Request, state: ServerState) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("Authorization", "")
    if header != f"Bearer {state.api_key}":
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error", code="invalid_api_key")


def _check_ready(state: ServerState) -> AsyncEngine:
    if state.draining:
        raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
    if state.engine is None or state.engine.fatal_error:
        reason = state.startup_error or (state.engine.fatal_error if state.engine else "the pipeline's stages are still starting")
        raise ApiError(503, f"not ready: {reason}", "server_error", code="not_ready", headers={"Retry-After": "5"})
    return state.engine


MAX_BODY_BYTES = 8 * 2**20  # larger requests get 413


async def _read_json(request: web.Request) -> dict:
    if request.content_type != "application/json":
        raise ApiError(415, f"send the body as application/json, not {request.content_type or 'no content type'}", code="unsupported_media_type")
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _check_model(body: dict, state: ServerState) -> None:
    model = body.get("model")
    if model is not None and model != state.model_name:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{state.model_name}'", code="model_not_found", param="model")


def _token_piece(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


@dataclass
class _Choice:
    index: int
    seq_id: int = -1
    text: str = ""  # everything emitted so far
    finish_reason: str | None = None
    num_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)


class _SequenceStream:
    """Detokenizes one sequence's updates, catches stop strings (never emitted), and yields text deltas."""

    def __init__(self, state: ServerState, engine: AsyncEngine, choice: _Choice, req: GenerationRequest, updates: asyncio.Queue, started: float) -> None:
        self.state, self.engine, self.choice, self.req, self.updates = state, engine, choice, req, updates
        self.detok = IncrementalDetokenizer(state.tokenizer)
        self.full = ""
        self.hold = max((len(s) for s in req.stop), default=1) - 1  # a stop string may still be forming
        self.started = started
        self.last_token_at: float | None = None

    def _find_stop(self, start: int) -> int:
        hits = [i for s in self.req.stop if (i := self.full.find(s, start)) >= 0]
        return min(hits) if hits else -1

    async def next_delta(self) -> tuple[str, int] | None:
        """(text delta, number of new tokens), or None when the sequence has finished and all is out."""
        if self.choice.finish_reason is not None:
            return None
        update = await self.updates.get()
        if update.error:
            raise ApiError(503, update.error, "server_error", code="pipeline_failed")
        now = time.monotonic()
        metrics = self.state.metrics
        if update.token_ids:
            if self.last_token_at is None:
                metrics.ttft.observe(now - self.started)
                metrics.ttft_window.append((now - self.started) * 1e3)
            else:
                gap = (now - self.last_token_at) / len(update.token_ids)
                for _ in update.token_ids:
                    metrics.itl.observe(gap)
                    metrics.itl_window.append(gap * 1e3)
            self.last_token_at = now
            metrics.output_tokens.add(len(update.token_ids), now)
        stopped = False
        new_tokens = 0
        for i, token in enumerate(update.token_ids):
            search_from = max(0, len(self.full) - self.hold)
            self.full += self.detok.add(token)
            new_tokens += 1
            self.choice.token_ids.append(token)
            self.choice.logprobs.append(update.logprobs[i])
            self.choice.top_logprobs.append(update.top_logprobs[i])
            if self.req.stop and (at := self._find_stop(search_from)) >= 0:
                self.full = self.full[:at]
                stopped = True
                break
        self.choice.num_tokens += new_tokens
        metrics.generation_tokens.inc(new_tokens)
        if stopped:
            self.engine.abort(self.choice.seq_id)
            self.choice.finish_reason = "stop"
        elif update.finished:
            self.full += self.detok.flush()
            if self.req.stop and (at := self._find_stop(max(0, len(self.full) - self.hold - 8))) >= 0:
                self.full = self.full[:at]
            self.choice.finish_reason = "length" if update.finish_reason == "length" else "stop"
        end = len(self.full) if self.choice.finish_reason else max(len(self.choice.text), len(self.full) - self.hold)
        delta = self.full[len(self.choice.text) : end]
        self.choice.text += delta
        return delta, new_tokens


def _usage(prompts: list[list[int]], n: int, choices: list[_Choice]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(c.num_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _chat_logprobs(state: ServerState, choice: _Choice, start: int, end: int) -> dict:
    def entry(token_id, logprob):
        piece = _token_piece(state.tokenizer, token_id)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    content = []
    for i in range(start, end):
        item = entry(choice.token_ids[i], choice.logprobs[i])
        item["top_logprobs"] = [entry(t, lp) for t, lp in (choice.top_logprobs[i] or [])]
        content.append(item)
    return {"content": content}


def _completion_logprobs(state: ServerState, choice: _Choice, start: int, end: int) -> dict:
    pieces = [_token_piece(state.tokenizer, t) for t in choice.token_ids[start:end]]
    return {
        "tokens": pieces,
        "token_logprobs": choice.logprobs[start:end],
        "top_logprobs": [{_token_piece(state.tokenizer, t): lp for t, lp in (tops or [])} for tops in choice.top_logprobs[start:end]],
    }


async def _generate(request: web.Request, state: ServerState, req: GenerationRequest, chat: bool):
    engine = _check_ready(state)
    for i, prompt in enumerate(req.prompts):
        room = state.max_model_len - len(prompt)
        if room < 1 or (req.max_tokens_given and req.sampling.max_tokens > room):
            raise ApiError(
                400,
                f"this model's maximum context length is {state.max_model_len} tokens; the prompt has {len(prompt)} tokens"
                + (f" and max_tokens asks for {req.sampling.max_tokens}" if req.max_tokens_given else "")
                + "; shorten the prompt or lower max_tokens",
                param="max_tokens" if req.max_tokens_given and room >= 1 else ("messages" if chat else "prompt"),
                code="context_length_exceeded",
            )
        bad = next((t for t in prompt if not 0 <= t < state.tokenizer.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary of {state.tokenizer.vocab_size}", param="prompt")
    if state.max_active is not None and state.active >= state.max_active:
        raise ApiError(429, f"the server is at capacity ({state.active} requests running or queued); retry shortly", "rate_limit_exceeded", code="queue_full", headers={"Retry-After": "1"})

    state.active += 1
    started = time.monotonic()
    streams: list[_SequenceStream] = []
    try:
        choices = []
        for p_index, prompt in enumerate(req.prompts):
            for k in range(req.n):
                sampling = _copy_sampling(req, state, prompt, k)
                seq, updates = await engine.add_request(prompt, sampling)
                choice = _Choice(index=p_index * req.n + k, seq_id=seq.seq_id)
                choices.append(choice)
                streams.append(_SequenceStream(state, engine, choice, req, updates, started))
        state.metrics.prompt_tokens.inc(sum(len(p) for p in req.prompts) * req.n)
        state.metrics.input_tokens.add(sum(len(p) for p in req.prompts) * req.n)
        state.metrics.requests_rate.add()
        deadline = started + state.request_timeout_s
        if req.stream:
            return await _stream(request, state, req, chat, streams, choices, deadline)
        while any(c.finish_reason is None for c in choices):
            try:
                await asyncio.wait_for(asyncio.gather(*(s.next_delta() for s in streams if s.choice.finish_reason is None)),
                                       max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise _timed_out(state) from None
        state.metrics.requests.labels("200").inc()
        return web.json_response(_full_response(state, req, chat, choices))
    except ApiError as e:
        state.metrics.requests.labels(str(e.status)).inc()
        raise
    finally:
        state.active -= 1
        for s in streams:
            if s.choice.finish_reason is None:  # the client went away, or an error: free its blocks
                engine.abort(s.choice.seq_id)


def _copy_sampling(req: GenerationRequest, state: ServerState, prompt: list[int], k: int):
    from dataclasses import replace

    max_tokens = req.sampling.max_tokens if req.max_tokens_given else state.max_model_len - len(prompt)
    seed = None if req.sampling.seed is None else (req.sampling.seed + k) % 2**63
    return replace(req.sampling, max_tokens=max_tokens, seed=seed, stop_token_ids=[])


def _full_response(state: ServerState, req: GenerationRequest, chat: bool, choices: list[_Choice]) -> dict:
    created = int(time.time())
    out_choices = []
    for c in choices:
        if chat:
            item = {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None, "finish_reason": c.finish_reason}
            if req.logprobs is not None:
                item["logprobs"] = _chat_logprobs(state, c, 0, len(c.token_ids))
        else:
            item = {"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
            if req.logprobs is not None:
                item["logprobs"] = _completion_logprobs(state, c, 0, len(c.token_ids))
        out_choices.append(item)
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": state.model_name,
        "choices": out_choices,
        "usage": _usage(req.prompts, req.n, choices),
    }


def _timed_out(state: ServerState) -> ApiError:
    return ApiError(408, f"the request took longer than {state.request_timeout_s:g} s (--request-timeout)", code="request_timeout")


async def _stream(request: web.Request, state: ServerState, req: GenerationRequest, chat: bool, streams: list[_SequenceStream], choices: list[_Choice], deadline: float):
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)

    async def send(payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        await resp.write(f"data: {data}\n\n".encode())

    def chunk(choice_items: list[dict]) -> dict:
        return {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": choice_items}

    if chat:
        await send(chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None} for c in choices]))
    pending = {asyncio.ensure_future(s.next_delta()): s for s in streams}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise _timed_out(state)
            for task in done:
                s = pending.pop(task)
                result = task.result()
                if result is None:
                    continue
                delta, num_new = result
                c = s.choice
                start = len(c.token_ids) - num_new
                if delta or c.finish_reason:
                    if chat:
                        item = {"index": c.index, "delta": {"content": delta} if delta else {}, "logprobs": None, "finish_reason": c.finish_reason}
                        if req.logprobs is not None and num_new:
                            item["logprobs"] = _chat_logprobs(state, c, start, len(c.token_ids))
                    else:
                        item = {"index": c.index, "text": delta, "logprobs": None, "finish_reason": c.finish_reason}
                        if req.logprobs is not None and num_new:
                            item["logprobs"] = _completion_logprobs(state, c, start, len(c.token_ids))
                    await send(chunk([item]))
                if c.finish_reason is None:
                    pending[asyncio.ensure_future(s.next_delta())] = s
        if req.include_usage:
            await send(chunk([]) | {"usage": _usage(req.prompts, req.n, choices)})
        state.metrics.requests.labels("200").inc()
    except ApiError as e:  # the stream has started: report in-band, then end it properly
        state.metrics.requests.labels(str(e.status)).inc()
        await send({"error": {"message": e.message, "type": e.type, "param": None, "code": e.status}})
    finally:
        for task in pending:
            task.cancel()
    await send("[DONE]")
    await resp.write_eof()
    return resp


def stats_document(state: ServerState) -> dict:
    """The /v1/stats document (schema in docs/stats.md; the terminal UI reads it)."""
    m = state.metrics
    engine_stats = state.engine.stats() if state.engine else {}
    timings = {row["stage"]: row for row in engine_stats.pop("timings", [])}
    coordinator_hop = engine_stats.pop("coordinator_hop_ms", None)
    stages = []
    for i, s in enumerate(state.stages):
        t = timings.get(s.index, {})
        stages.append({
            "index": s.index,
            "state": "recovering" if engine_stats.get("recovering") else (state.stage_states[i] if i < len(state.stage_states) else "ready"),
            "layers": list(s.layers),
            "node_id": s.node_id,
            "address": s.address,
            "pid": s.pid,
            "device": s.device,
            "weight_bytes": s.weight_bytes,
            "memory_used_bytes": s.memory_used_bytes,
            "memory_total_bytes": s.memory_total_bytes,
            "kv_blocks_total": s.num_kv_blocks,
            "kv_blocks_used": engine_stats.get("kv_blocks_used", 0),
            "microbatches": t.get("microbatches", 0),
            "microbatches_per_s": t.get("microbatches_per_s", 0.0),
            "utilisation": t.get("utilisation", 0.0),
            "compute_seconds_total": t.get("compute_seconds_total", 0.0),
            "compute_ms": t.get("compute_ms"),
            "queue_ms": t.get("queue_ms"),
            "hop_ms": t.get("hop_ms"),
            "errors": s.errors,
        })
    busy = [s["utilisation"] for s in stages]
    return {
        "model": state.model_name,
        "ready": state.engine is not None and not state.engine.fatal_error,
        "draining": state.draining,
        "uptime_s": round(time.monotonic() - state.started_at, 3),
        "active_requests": state.active,
        "throughput": {
            "input_tokens_per_s": round(m.input_tokens.per_second(), 3),
            "output_tokens_per_s": round(m.output_tokens.per_second(), 3),
            "requests_per_s": round(m.requests_rate.per_second(), 3),
        },
        "latency": {"ttft_ms": percentiles(m.ttft_window), "itl_ms": percentiles(m.itl_window), "coordinator_hop_ms": coordinator_hop},
        "pipeline_utilisation": round(sum(busy) / len(busy), 3) if busy else 0.0,
        "engine": engine_stats,
        "stages": stages,
    }


def build_app(state: ServerState) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY_BYTES)
    routes = web.RouteTableDef()

    async def parse(request: web.Request, chat: bool) -> tuple[dict, GenerationRequest]:
        _check_auth(request, state)
        body = await _read_json(request)
        _check_model(body, state)
        return body, parse_common(body, state.sampling_defaults, chat=chat)

    @routes.post("/v1/chat/completions")
    async def chat_completions(request: web.Request):
        body, req = await parse(request, chat=True)
        messages = parse_messages(body)
        req.prompts = [state.tokenizer.encode_chat(messages, add_generation_prompt=True)]
        return await _generate(request, state, req, chat=True)

    @routes.post("/v1/completions")
    async def completions(request: web.Request):
        body, req = await parse(request, chat=False)
        if not req.max_tokens_given:
            req.sampling.max_tokens = 16  # OpenAI's default for text completions
            req.max_tokens_given = True
        req.prompts = parse_prompt(body, state.tokenizer.encode)
        return await _generate(request, state, req, chat=False)

    @routes.get("/v1/models")
    async def models(request: web.Request):
        _check_auth(request, state)
        return web.json_response(
            {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "stagecoach", "max_model_len": state.max_model_len}]}
        )

    @routes.get("/health")
    async def health(request: web.Request):
        ready = state.engine is not None and not state.engine.fatal_error and not state.draining
        status = "ok" if ready else ("draining" if state.draining else "starting")
        if state.startup_error or (state.engine and state.engine.fatal_error):
            status = "failed"
        return web.json_response({"status": status, "stages": len(state.stages)}, status=200 if ready else 503)

    @routes.get("/live")
    async def live(request: web.Request):
        # Liveness: the process answers, also while stages load or recover (minutes for a 32B
        # stage), when /health is 503; only a hung or dead server should be restarted.
        return web.json_response({"status": "alive"})

    @routes.get("/metrics")
    async def metrics(request: web.Request):
        return web.Response(body=generate_latest(state.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @routes.get("/v1/stats")
    async def stats(request: web.Request):
        _check_auth(request, state)
        return web.json_response(stats_document(state))

    app.add_routes(routes)
    return app
