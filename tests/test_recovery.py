"""A stage can die without losing a request: chaos tests on a 3-node Ray cluster, and a stage that never comes back."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import pytest
import yaml
from helpers import http, make_gguf_checkpoint, make_hf_checkpoint, make_packed_checkpoint
from test_serve import Server

pytestmark = pytest.mark.slow

PROMPTS = [[(11 * i + j) % 390 + 3 for j in range(3 + i)] for i in range(8)]
NEW_TOKENS = 200
# Half greedy, half seeded with every sampling option: eight at once without a fault (the reference; one of them alone
# too) or through a fault, the same.
SAMPLING = [
    {"temperature": 0}
    if i % 2 == 0
    else {
        "temperature": 0.9,
        "top_k": 40,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.3,
        "seed": 100 + i,
    }
    for i in range(len(PROMPTS))
]


def stream_text(port: int, body: dict, progress: list, index: int, out: dict, key: str | None = None) -> None:
    """Reads one SSE stream to its end; progress[index] counts the chunks seen so far."""
    conn = HTTPConnection("127.0.0.1", port, timeout=300)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    conn.request("POST", "/v1/completions", json.dumps(body | {"stream": True}), headers)
    resp = conn.getresponse()
    text, events = [], []
    while line := resp.readline():
        if line.startswith(b"data: "):
            data = line[6:].decode().strip()
            events.append(data)
            if data != "[DONE]":
                payload = json.loads(data)
                if "error" in payload:
                    continue
                text.append(payload["choices"][0]["text"])
                progress[index] += 1
    out[index] = ("".join(text), events)


class StreamSet:
    """Streams read on threads, one per body; `progress` counts the pieces of text each has shown."""

    def __init__(self, port: int, bodies: list[dict], key: str | None = None) -> None:
        self.progress, self.out = [0] * len(bodies), {}
        self.threads = [
            threading.Thread(target=stream_text, args=(port, body, self.progress, i, self.out, key))
            for i, body in enumerate(bodies)
        ]
        for t in self.threads:
            t.start()

    def wait_mid_stream(self, min_chunks: int, min_running: int | None = None) -> None:
        """Until every stream has shown min_chunks pieces (a detokenizer may hold a token back: pieces <= tokens), with
        at least min_running (default: all) still running."""
        deadline = time.monotonic() + 60
        while min(self.progress) < min_chunks:
            assert time.monotonic() < deadline, self.progress
            time.sleep(0.01)
        assert sum(t.is_alive() for t in self.threads) >= (min_running or len(self.threads)), self.progress

    def texts(self) -> list[str]:
        """Each stream's text, once all have ended with [DONE] and no error event."""
        for t in self.threads:
            t.join(timeout=300)
        for i in range(len(self.threads)):
            events = self.out[i][1]
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events[-3:]
        return [self.out[i][0] for i in range(len(self.threads))]


def config_file(tmp, model, **pipeline) -> str:
    path = tmp / f"cluster-{len(list(tmp.glob('cluster-*')))}.yaml"
    # the "speculative" model: the float checkpoint served with drafts verified in every pass it can
    speculative = {"method": "ngram", "min_acceptance": 0.0, "max_running": 64, "cost_model": False}
    path.write_text(
        yaml.safe_dump(
            ({"speculative": speculative} if Path(model).name == "model-speculative" else {})
            | {
                "model": {"path": str(model)},
                # A few milliseconds per stage stretch generation out, so that a kill lands mid-stream.
                "pipeline": {
                    "num_stages": 3,
                    "gpus_per_stage": 1,
                    "placement": "strict_spread",
                    "max_batch_tokens": 16,
                    **pipeline,
                },
                "testing": {"stage_delay_ms": [3.0, 3.0, 3.0]},
                "cache": {"block_size": 8, "num_blocks": 512},
                "transport": {"host": "127.0.0.1"},
            }
        )
    )
    return str(path)


@pytest.fixture(scope="module", params=["safetensors"])
def model(tmp_path_factory, request):
    """A float checkpoint; or, where a test asks for "gguf" or "gptq", a GGUF file (every served type,
    helpers.make_gguf_checkpoint) or a GPTQ checkpoint (act-order) held quantized; "speculative": the float
    checkpoint served with speculative decoding on. The server and reference on the other model are then stopped
    first."""
    path = tmp_path_factory.mktemp("recovery") / ("model-speculative" if request.param == "speculative" else "model")
    if request.param == "gguf":
        make_gguf_checkpoint(path, num_hidden_layers=3, max_position_embeddings=1024, vocab_size=512)
    elif request.param == "gptq":
        make_packed_checkpoint(path, "gptq", num_hidden_layers=3, packing=dict(act_order=True))
    else:
        make_hf_checkpoint(path, num_hidden_layers=3, max_position_embeddings=1024)
    return path


@pytest.fixture(scope="module")
def server(model, ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recovery_server")
    s = Server(["--config", config_file(tmp, model), "--ray-address", ray_cluster.address], tmp / "server.log")
    s.wait_ready()
    yield s
    s.stop()


def complete(port: int, i: int) -> str:
    """PROMPTS[i]'s text with SAMPLING[i], NEW_TOKENS tokens, in one request."""
    body = {"prompt": PROMPTS[i], "max_tokens": NEW_TOKENS, "ignore_eos": True} | SAMPLING[i]
    return http(port, "/v1/completions", body, key=None)[1]["choices"][0]["text"]


def complete_at_once(port: int, count: int) -> list[str]:
    """The first `count` prompts' texts, their requests sent together."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda i: complete(port, i), range(count)))


@pytest.fixture(scope="module")
def reference(server):
    """Fault-free outputs, the eight requests at once; a seeded one alone gives the same text as among the eight."""
    texts = complete_at_once(server.port, len(PROMPTS))
    assert complete(server.port, 3) == texts[3]
    return texts


def stage_pid(port: int, index: int) -> int:
    return http(port, "/v1/stats", key=None)[1]["stages"][index]["pid"]


def run_with_kill(server, prompts, kill_stage: int, after_batches: int) -> tuple[dict, float]:
    progress, out = [0] * len(prompts), {}
    body = {"max_tokens": NEW_TOKENS, "ignore_eos": True}
    threads = [
        threading.Thread(target=stream_text, args=(server.port, body | SAMPLING[i] | {"prompt": p}, progress, i, out))
        for i, p in enumerate(prompts)
    ]
    pid = stage_pid(server.port, kill_stage)
    engine = http(server.port, "/v1/stats", key=None)[1]["engine"]
    before, start_batches = engine["recoveries"], engine["microbatches"]
    for t in threads:
        t.start()
    # Mid-stream: every sequence running and some decode steps done (chunks are no guide: the tiny
    # model's tokens beyond its tokenizer's vocabulary decode to nothing).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        engine = http(server.port, "/v1/stats", key=None)[1]["engine"]
        if engine["running"] == len(prompts) and engine["microbatches"] - start_batches >= after_batches:
            break
        time.sleep(0.01)
    assert all(t.is_alive() for t in threads)
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=300)
    engine = http(server.port, "/v1/stats", key=None)[1]["engine"]
    assert engine["recoveries"] == before + 1, engine
    return out, engine["recovery_seconds"][-1]


def test_stage_killed_during_a_long_prefill(server):
    prompt = [(7 * j) % 390 + 3 for j in range(400)]  # 25 chunks of 16 tokens
    ref = http(
        server.port,
        "/v1/completions",
        {"prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True},
        key=None,
    )[1]["choices"][0]["text"]
    progress, out = [0], {}
    t = threading.Thread(
        target=stream_text,
        args=(
            server.port,
            {"prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True},
            progress,
            0,
            out,
        ),
    )
    pid = stage_pid(server.port, 0)
    t.start()
    deadline = time.monotonic() + 10
    while http(server.port, "/v1/stats", key=None)[1]["engine"]["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert progress[0] == 0  # still prefilling
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=300)
    text, events = out[0]
    assert events[-1] == "[DONE]" and text == ref
    print(
        f"recovery during prefill: {http(server.port, '/v1/stats', key=None)[1]['engine']['recovery_seconds'][-1]:.2f} s"
    )


def test_a_prefix_cached_before_a_stage_was_replaced_gives_the_same_output(server):
    """The replaced stage holds no K/V: the recovery drops the prefix cache, and the request computes it all again."""
    prompt = [
        (29 * j) % 390 + 3 for j in range(45)
    ]  # 5 full blocks of 8 are reused (the last token is always computed)
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}

    def complete() -> tuple[str, int]:
        status, reply, _ = http(server.port, "/v1/completions", body, key=None)
        assert status == 200, reply
        return reply["choices"][0]["text"], reply["usage"]["prompt_tokens_details"]["cached_tokens"]

    first, cached = complete()
    assert cached == 0 and complete() == (first, 40)  # the second hit the cache
    engine = http(server.port, "/v1/stats", key=None)[1]["engine"]
    os.kill(stage_pid(server.port, 1), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while (
        http(server.port, "/v1/stats", key=None)[1]["engine"]["recoveries"] == engine["recoveries"]
        or http(server.port, "/health", key=None)[0] != 200
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert http(server.port, "/v1/stats", key=None)[1]["engine"]["prefix_cache"]["cached_blocks"] == 0
    assert complete() == (first, 0)  # computed again on the new stage
    assert complete() == (first, 40)  # and cached again


# Last in the module: its gguf case replaces the module's server with one on a GGUF model.
@pytest.mark.parametrize(
    "model, kill_stage",
    [("safetensors", 1), ("safetensors", 2), ("gguf", 1), ("gptq", 1), ("speculative", 2)],
    ids=["middle stage", "last stage", "gguf, middle stage", "gptq, middle stage", "speculative, last stage"],
    indirect=["model"],
)
def test_streams_survive_a_stage_killed_mid_stream(server, reference, kill_stage):
    out, took = run_with_kill(server, PROMPTS, kill_stage, after_batches=30)
    print(f"recovery after killing stage {kill_stage}: {took:.2f} s")
    for i, ref in enumerate(reference):
        text, events = out[i]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events[-3:]
        assert text == ref, f"request {i} differs after the recovery"
    assert http(server.port, "/health", key=None)[0] == 200
    speculative = http(server.port, "/v1/stats", key=None)[1]["engine"]["speculative"]
    assert speculative["method"] == "off" or speculative["accepted_tokens"] > 0, speculative


@pytest.mark.parametrize("model", ["speculative"], indirect=True)
def test_a_stop_string_inside_an_accepted_run_cuts_where_one_token_at_a_time_would(server):
    """A verify pass's tokens reach the stream as one update; a stop string completed by any of them but the last ends
    the text there, as one token at a time would (the later tokens are neither shown nor counted)."""
    # this model's answer is whole characters ("333z#U3z#wz3333…"): a token's text is its piece, nothing held back
    body = {"prompt": [100, 101, 102, 103] * 6, "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    out = {}
    stream_text(server.port, body | {"logprobs": 0}, [0], 0, out)
    text, events = out[0]
    updates = [json.loads(e)["choices"][0]["logprobs"]["tokens"] for e in events if e != "[DONE]"]
    assert "".join("".join(u) for u in updates) == text and "\ufffd" not in text
    # the first token that ends a new stretch of text and has another token after it in its update (a verify pass's)
    offset, seen, cut = 0, 0, None
    for pieces in updates:
        for j, piece in enumerate(pieces):
            offset, seen = offset + len(piece), seen + 1
            if cut is None and piece and j < len(pieces) - 1:
                cut = next(s for s in range(offset - 1, -1, -1) if text.find(text[s:offset]) == s)
                stop, num_tokens = text[cut:offset], seen
    assert cut is not None, f"no update of several tokens (no draft accepted): {updates}"
    for stream in (False, True):
        if stream:
            got = {}
            stream_text(server.port, body | {"stop": [stop]}, [0], 0, got)
            events = [json.loads(e) for e in got[0][1] if e != "[DONE]"]
            got_text, reason = got[0][0], events[-1]["choices"][0]["finish_reason"]
        else:
            response = http(server.port, "/v1/completions", body | {"stop": [stop]}, key=None)[1]
            got_text, reason = response["choices"][0]["text"], response["choices"][0]["finish_reason"]
            assert response["usage"]["completion_tokens"] == num_tokens
        assert (got_text, reason) == (text[:cut], "stop"), (stop, stream)
