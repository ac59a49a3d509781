"""Malformed HTTP requests always get a 4xx (property-based), and overload gets exactly the right number of 429s."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest
from helpers import http, make_hf_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import Server

pytestmark = pytest.mark.slow

MAX_RUNNING, MAX_QUEUE = 2, 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The local backend: the HTTP layer is what is under test here."""
    tmp = tmp_path_factory.mktemp("hardening")
    make_hf_checkpoint(tmp / "model", num_hidden_layers=2, max_position_embeddings=256)
    s = Server(
        [
            "--model",
            str(tmp / "model"),
            "--backend",
            "local",
            "--kv-blocks",
            "256",
            "--block-size",
            "8",
            "--max-running",
            str(MAX_RUNNING),
            "--max-queue",
            str(MAX_QUEUE),
        ],
        tmp / "server.log",
    )
    s.wait_ready()
    yield s
    s.stop()


def post(port: int, path: str, data: bytes, content_type: str = "application/json") -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


VALID = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0},
    "/v1/completions": {"prompt": [5, 6], "max_tokens": 2, "temperature": 0},
}
junk = st.one_of(
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.booleans(),
    st.none().map(lambda _: {"x": 1}),
)
# (field, strategy of values that are never valid for it)
BAD_FIELDS = [
    (
        "temperature",
        st.one_of(
            st.floats(min_value=2.0001, max_value=1e308),
            st.floats(max_value=-1e-9, min_value=-1e308),
            st.text(max_size=5),
            st.booleans(),
        ),
    ),
    ("top_p", st.one_of(st.floats(min_value=1.0001, max_value=1e300), st.just(-0.5), st.text(max_size=3))),
    ("top_k", st.one_of(st.integers(max_value=-2), st.floats(min_value=0.1, max_value=0.9), st.text(max_size=3))),
    (
        "max_tokens",
        st.one_of(
            st.integers(min_value=10**6, max_value=10**18),
            st.integers(max_value=0),
            st.text(max_size=3),
            st.floats(min_value=1.1, max_value=1.9),
        ),
    ),
    ("n", st.one_of(st.integers(min_value=17, max_value=10**9), st.integers(max_value=0), st.text(max_size=2))),
    ("seed", st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63, max_value=2**80), st.text(max_size=3))),
    ("stream", st.one_of(st.integers(), st.text(max_size=3))),
    (
        "stop",
        st.one_of(
            st.integers(),
            st.lists(st.integers(), min_size=1, max_size=3),
            st.just(""),
            st.lists(st.just("x"), min_size=17, max_size=20),
        ),
    ),
    ("presence_penalty", st.one_of(st.floats(min_value=2.01, max_value=1e10), st.text(max_size=3))),
    ("frequency_penalty", st.one_of(st.floats(max_value=-2.01, min_value=-1e10), st.lists(st.integers(), max_size=2))),
    ("repetition_penalty", st.one_of(st.floats(max_value=0.0, min_value=-1e10), st.text(max_size=3))),
    ("ignore_eos", st.one_of(st.integers(), st.text(max_size=3))),
    ("model", st.text(min_size=1, max_size=10).filter(lambda m: m != "model")),
]
CHAT_ONLY = [
    (
        "messages",
        st.one_of(
            st.text(max_size=5),
            st.just([]),
            st.lists(junk, min_size=1, max_size=3),
            st.lists(
                st.fixed_dictionaries(
                    {
                        "role": st.text(max_size=6).filter(
                            lambda r: r not in ("system", "user", "assistant", "tool", "developer")
                        ),
                        "content": st.text(max_size=5),
                    }
                ),
                min_size=1,
                max_size=2,
            ),
        ),
    ),
    ("logprobs", st.one_of(st.integers(min_value=2), st.text(min_size=1, max_size=3))),
]
COMPLETION_ONLY = [
    (
        "prompt",
        st.one_of(
            st.just([]),
            st.lists(st.integers(min_value=10**6), min_size=1, max_size=3),
            st.lists(st.booleans(), min_size=1, max_size=3),
            st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
            st.lists(st.floats(min_value=0.1, max_value=0.9), min_size=1, max_size=2),
        ),
    ),
    ("logprobs", st.one_of(st.integers(min_value=21, max_value=10**6), st.integers(max_value=-1))),
]


@st.composite
def malformed(draw):
    """(path, body bytes, content type) that the server must refuse with a 4xx."""
    import json

    path = draw(st.sampled_from(list(VALID)))
    body = dict(VALID[path])
    kind = draw(st.sampled_from(["field", "unknown", "utf8", "content_type", "not_object", "broken_json"]))
    content_type = "application/json"
    if kind == "field":
        name, values = draw(st.sampled_from(BAD_FIELDS + (CHAT_ONLY if "chat" in path else COMPLETION_ONLY)))
        body[name] = draw(values)
    elif kind == "unknown":
        known = {
            "model",
            "messages",
            "prompt",
            "max_tokens",
            "max_completion_tokens",
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
            "top_logprobs",
            "stream",
            "stream_options",
            "ignore_eos",
            "user",
            "echo",
            "tools",
            "tool_choice",
            "functions",
            "function_call",
            "suffix",
            "best_of",
            "response_format",
            "logit_bias",
        }
        body[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in known))] = draw(junk)
    elif kind == "utf8":
        return (
            path,
            b'{"prompt": "'
            + draw(st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xe2\x82", b"\xf0\x28\x8c\xbc"]))
            + b'"}',
            content_type,
        )
    elif kind == "content_type":
        content_type = draw(
            st.sampled_from(
                ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/xml"]
            )
        )
    elif kind == "not_object":
        return (
            path,
            json.dumps(
                draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5)))
            ).encode(),
            content_type,
        )
    else:
        return path, json.dumps(body).encode()[: draw(st.integers(min_value=0, max_value=5))], content_type
    return path, json.dumps(body, allow_nan=False).encode(), content_type


@settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(request=malformed())
def test_malformed_requests_always_get_a_4xx(server, request):
    path, data, content_type = request
    status = post(server.port, path, data, content_type)
    assert 400 <= status < 500, (status, path, data[:200], content_type)


def test_still_serving_after_the_fuzzing_and_huge_bodies_are_refused(server):
    assert post(server.port, "/v1/completions", b'{"prompt": "' + b"x" * (9 * 2**20) + b'"}') == 413
    for path, body in VALID.items():
        assert http(server.port, path, body, key=None)[0] == 200


def test_overload_gets_exactly_the_right_number_of_429s(server):
    capacity = MAX_RUNNING + MAX_QUEUE
    n = 4 * capacity
    statuses: list[int] = []
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        statuses.append(
            http(
                server.port,
                "/v1/completions",
                {"prompt": [3 + i, 4], "max_tokens": 200, "temperature": 0, "ignore_eos": True},
                key=None,
            )[0]
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(statuses) == [200] * capacity + [429] * (n - capacity)


def test_a_request_past_its_timeout_ends_with_408_streamed_or_not(tmp_path):
    make_hf_checkpoint(tmp_path / "model", num_hidden_layers=2, max_position_embeddings=1024)
    s = Server(
        [
            "--model",
            str(tmp_path / "model"),
            "--backend",
            "local",
            "--kv-blocks",
            "256",
            "--block-size",
            "8",
            "--request-timeout",
            "0.3",
        ],
        tmp_path / "server.log",
    )
    try:
        s.wait_ready()
        body = {"prompt": [5, 6], "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
        status, payload, _ = http(s.port, "/v1/completions", body, key=None)
        assert status == 408 and payload["error"]["code"] == "request_timeout"
        import json
        from http.client import HTTPConnection

        conn = HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request(
            "POST", "/v1/completions", json.dumps(body | {"stream": True}), {"Content-Type": "application/json"}
        )
        events = [line[6:].strip() for line in iter(conn.getresponse().readline, b"") if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
        assert (
            http(s.port, "/v1/completions", {"prompt": [5, 6], "max_tokens": 2, "temperature": 0}, key=None)[0] == 200
        )
        import time

        deadline = time.monotonic() + 10
        while http(s.port, "/v1/stats", key=None)[1]["engine"]["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http(s.port, "/v1/stats", key=None)[1]["engine"]["running"] == 0  # the timed-out sequences were freed
    finally:
        s.stop()
