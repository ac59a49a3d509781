"""One error table, one set of sampling bounds: what HTTP, the CLI and SamplingParams refuse, and how each answer is counted.

The HTTP app here is the real one (aiohttp on 127.0.0.1) over a real engine and local pipeline, in this process.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp.test_utils import TestClient, TestServer
from defaults import scheduler_config
from helpers import make_hf_checkpoint
from prometheus_client.parser import text_string_to_metric_families

from stagecoach.cluster.backends import LocalPipeline
from stagecoach.cluster.partition import ranges_from_counts
from stagecoach.coordinator import cli
from stagecoach.coordinator.api import build_app
from stagecoach.coordinator.async_engine import AsyncEngine
from stagecoach.coordinator.engine import Engine
from stagecoach.coordinator.server_state import ServerState
from stagecoach.coordinator.tokenizer import Tokenizer
from stagecoach.errors import ERROR_TABLE, RequestError, error_kind
from stagecoach.proto.types import SamplingParams

KEY = "k-123"
AUTH = {"Authorization": f"Bearer {KEY}"}

# (parameter, its CLI flag, values every entry point must refuse)
BOUNDS = [
    ("temperature", "--temperature", [-0.5, 2.5]),
    ("top_p", "--top-p", [0.0, 1.5]),
    ("top_k", "--top-k", [-2]),
    ("repetition_penalty", "--repetition-penalty", [0.0, -1.0]),
    ("presence_penalty", "--presence-penalty", [2.5, -2.5]),
    ("frequency_penalty", "--frequency-penalty", [-2.01, 3.0]),
    ("seed", "--seed", [-1, 2**63]),
    ("n", "--n", [0, 17]),
    ("logprobs", "--logprobs", [-1, 21]),
    ("max_tokens", "--max-new-tokens", [0, -3]),
]
CASES = [(name, flag, value) for name, flag, values in BOUNDS for value in values]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("bounds")
    make_hf_checkpoint(path, num_hidden_layers=2, max_position_embeddings=256)
    return path


@pytest.fixture(scope="module")
def app_state(model):
    pipeline = LocalPipeline.load(model, ranges_from_counts([1, 1], 2), num_blocks=64, block_size=8)
    engine = AsyncEngine(Engine(pipeline, scheduler_config(64, block_size=8, max_model_len=256, vocab_size=512)))
    state = ServerState(
        tokenizer=Tokenizer(model), model_name="tiny", max_model_len=256, sampling_defaults={}, api_key=KEY
    )
    state.engine = engine
    yield state
    engine.stop()
    pipeline.shutdown()


def call(state: ServerState, requests: list[tuple]) -> list[tuple[int, dict]]:
    """Each (method, path, json or text body, headers) against the real app on 127.0.0.1; (status, JSON body) each."""

    async def go():
        async with TestClient(TestServer(build_app(state), host="127.0.0.1")) as client:
            out = []
            for method, path, body, headers in requests:
                kwargs = {"data": body} if isinstance(body, str) else {"json": body}
                async with client.request(method, path, headers=headers, **kwargs) as resp:
                    out.append(
                        (
                            resp.status,
                            await resp.json() if resp.content_type == "application/json" else await resp.text(),
                        )
                    )
            return out

    return asyncio.run(go())


def counted(metrics_text: str) -> dict[tuple[str, str], float]:
    """(status, route) → count, from stagecoach_http_responses_total."""
    out = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "stagecoach_http_responses_total":
                out[(s.labels["status"], s.labels["route"])] = s.value
    return out


@pytest.mark.parametrize("name, flag, value", CASES, ids=[f"{n}={v}" for n, _, v in CASES])
def test_sampling_params_refuse_it(name, flag, value):
    with pytest.raises(RequestError, match=rf"^{name} must be") as info:
        SamplingParams(**{name: value})
    assert info.value.param == name


@pytest.mark.parametrize("name, flag, value", CASES, ids=[f"{n}={v}" for n, _, v in CASES])
def test_the_cli_refuses_it(model, name, flag, value, capsys):
    code = cli.main(["generate", "--backend", "local", "--model", str(model), "--prompt-ids", "1,2", flag, str(value)])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {name} must be" in err and "Traceback" not in err, err


def test_http_refuses_each_with_the_parameter_named(app_state):
    bodies = [{"prompt": [1, 2], "max_tokens": 2} | {name: value} for name, _, value in CASES]
    answers = call(app_state, [("POST", "/v1/completions", body, AUTH) for body in bodies])
    for (name, _, value), (status, body) in zip(CASES, answers, strict=False):
        assert status == 400, (name, value, body)
        assert body["error"]["param"] == name and body["error"]["message"].startswith(f"{name} must be"), body
    assert (
        call(app_state, [("POST", "/v1/completions", {"prompt": [1, 2], "max_tokens": 2, "temperature": 0}, AUTH)])[0][
            0
        ]
        == 200
    )


def test_chat_names_the_logprobs_count_top_logprobs(app_state):
    body = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}
    ((status, answer),) = call(app_state, [("POST", "/v1/chat/completions", body, AUTH)])
    assert status == 400 and answer["error"]["param"] == "top_logprobs"


def test_every_status_is_counted(app_state):
    ok = {"prompt": [1, 2], "max_tokens": 2, "temperature": 0}
    answers = call(
        app_state,
        [
            ("POST", "/v1/completions", ok, {}),  # 401
            ("POST", "/v1/completions", ok | {"model": "gpt-4"}, AUTH),  # 404
            ("POST", "/v1/completions", "prompt=1", AUTH | {"Content-Type": "text/plain"}),  # 415
            ("POST", "/v1/completions", ok | {"temperature": -1}, AUTH),  # 400
            ("GET", "/v1/nowhere", None, AUTH),  # aiohttp's own 404
        ],
    )
    assert [s for s, _ in answers] == [401, 404, 415, 400, 404]
    app_state.max_active = 0  # the server is full
    try:
        assert call(app_state, [("POST", "/v1/completions", ok, AUTH)])[0][0] == 429
    finally:
        app_state.max_active = None
    app_state.draining = True
    try:
        assert call(app_state, [("POST", "/v1/completions", ok, AUTH)])[0][0] == 503
    finally:
        app_state.draining = False
    ((_, text),) = call(app_state, [("GET", "/metrics", None, {})])
    got = counted(text)
    for status in ("401", "404", "415", "400", "429", "503"):
        assert got.get((status, "/v1/completions"), 0) >= 1, (status, got)
    assert got[("404", "unmatched")] >= 1


def test_an_unexpected_error_in_a_handler_is_a_500_with_the_openai_body_and_a_traceback(app_state, caplog, monkeypatch):
    def broken(text):
        raise ZeroDivisionError("a bug in the tokenizer")

    monkeypatch.setattr(app_state.tokenizer, "encode", broken)
    with caplog.at_level(logging.ERROR, logger="stagecoach.coordinator.api"):
        ((status, body), (_, text)) = call(
            app_state, [("POST", "/v1/completions", {"prompt": "some text"}, AUTH), ("GET", "/metrics", None, {})]
        )
    assert status == 500
    assert (
        body["error"]["type"] == "server_error"
        and body["error"]["code"] == "internal_error"
        and body["error"]["param"] is None
    )
    assert "ZeroDivisionError" in body["error"]["message"]
    assert counted(text)[("500", "/v1/completions")] >= 1
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records), (
        "no log line with the traceback"
    )


def test_the_table_gives_every_error_type_a_row_that_its_callers_understand():
    import grpc

    from stagecoach import errors

    types = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, errors.StagecoachError)]
    assert set(types) <= set(ERROR_TABLE), "an error type without its own row"
    for kind in ERROR_TABLE.values():
        assert grpc.StatusCode[kind.grpc_status] and 400 <= kind.http_status < 600 and kind.exit_code in (1, 2)
    assert error_kind(KeyError("x")) is ERROR_TABLE[Exception]
    assert error_kind(errors.WireError("bad")).grpc_status == "INVALID_ARGUMENT"
