"""`stagecoach serve`: the OpenAI-compatible API on a tiny model, over the Ray pipeline, with the official client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import free_port, http, make_hf_checkpoint

from stagecoach.coordinator.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
KEY = "test-key-123"  # the helpers' http() sends it by default
LINK_TOKEN = "test-link-token-456"  # for servers configured with transport.token_env: STAGECOACH_TEST_LINK_TOKEN
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


class Server:
    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log = log
        env = os.environ | {"STAGECOACH_TEST_KEY": KEY, "STAGECOACH_TEST_LINK_TOKEN": LINK_TOKEN} | (env or {})
        if os.environ.get("STAGECOACH_TEST_COMPILE") and "--compile" not in args:  # pytest --compile on|off|auto
            args = [*args, "--compile", os.environ["STAGECOACH_TEST_COMPILE"]]
            if os.environ.get("STAGECOACH_TEST_COMPILE_BATCH_SIZES"):
                args += ["--compile-batch-sizes", os.environ["STAGECOACH_TEST_COMPILE_BATCH_SIZES"]]
        self.proc = subprocess.Popen(
            [str(BIN / "stagecoach"), "serve", "--port", str(self.port), *args],
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.first_health = None
        self.live_while_starting = None  # /live's status while /health was still 503

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.log.read_text()[-3000:]}"
            try:
                status, _, _ = http(self.port, "/health", key=None, timeout=5)
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
                continue
            self.first_health = self.first_health or status
            if status == 503 and self.live_while_starting is None:
                self.live_while_starting = http(self.port, "/live", key=None, timeout=5)[0]
            if status == 200:
                return
            time.sleep(0.2)
        raise TimeoutError(f"server not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_model")
    make_hf_checkpoint(path, num_hidden_layers=4, max_position_embeddings=512)
    return path


@pytest.fixture(scope="module")
def server(tiny, ray_cluster, tmp_path_factory):
    s = Server(
        [
            "--model",
            str(tiny),
            "--stages",
            "2",
            "--ray-address",
            ray_cluster.address,
            "--grpc-host",
            "127.0.0.1",
            "--gpus-per-stage",
            "0",
            "--placement",
            "pack",
            "--api-key-env",
            "STAGECOACH_TEST_KEY",
            "--kv-blocks",
            "256",
            "--block-size",
            "8",
        ],
        tmp_path_factory.mktemp("logs") / "server.log",
    )
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY)


def test_health_was_503_until_the_stages_were_ready_while_live_was_200(server):
    assert server.first_health == 503 and server.live_while_starting == 200
    assert http(server.port, "/live", key=None)[0] == 200
    assert http(server.port, "/health", key=None)[0] == 200


def test_chat_streaming_equals_non_streaming_equals_generate(client, server, tiny):
    full = client.chat.completions.create(
        model=tiny.name, messages=MESSAGES, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    chunks = list(
        client.chat.completions.create(
            model=tiny.name,
            messages=MESSAGES,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert full.choices[0].finish_reason == "length" and chunks[-2].choices[0].finish_reason == "length"
    prompt_ids = Tokenizer(tiny).encode_chat(MESSAGES)
    assert (
        full.usage.prompt_tokens == len(prompt_ids)
        and full.usage.completion_tokens == 20
        and full.usage.total_tokens == len(prompt_ids) + 20
    )
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].choices == []
    gen = subprocess.run(
        [
            str(BIN / "stagecoach"),
            "generate",
            "--backend",
            "local",
            "--model",
            str(tiny),
            "--chat",
            "--prompt",
            MESSAGES[0]["content"],
            "--temperature",
            "0",
            "--max-new-tokens",
            "20",
            "--ignore-eos",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(gen.stdout)["text"] == full.choices[0].message.content


def test_text_completion_streaming_and_not(client, tiny):
    args = dict(
        model=tiny.name, prompt=[5, 9, 200, 31, 77], max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.completions.create(**args)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stream=True))
    assert streamed == full.choices[0].text
    assert full.usage.prompt_tokens == 5 and full.usage.completion_tokens == 12
    text_prompt = client.completions.create(model=tiny.name, prompt="Hello there", max_tokens=4, temperature=0)
    assert text_prompt.usage.prompt_tokens == len(Tokenizer(tiny).encode("Hello there"))


def test_thirty_two_concurrent_streams_equal_their_single_outputs(server, tiny):
    from openai import AsyncOpenAI

    prompts = [[(7 * i + j) % 390 + 3 for j in range(2 + (5 * i) % 17)] for i in range(32)]
    alone = [
        http(server.port, "/v1/completions", {"prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": True})[1][
            "choices"
        ][0]["text"]
        for p in prompts
    ]

    async def run_all():
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY)

        async def one(p):
            stream = await client.completions.create(
                model=tiny.name, prompt=p, max_tokens=10, temperature=0, stream=True, extra_body={"ignore_eos": True}
            )
            return "".join([c.choices[0].text async for c in stream])

        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(run_all()) == alone


def test_sampling_parameters_logprobs_n_and_seed(server, tiny):
    body = {
        "prompt": [5, 9, 200],
        "max_tokens": 6,
        "temperature": 0.9,
        "top_p": 0.9,
        "top_k": 50,
        "seed": 7,
        "n": 3,
        "logprobs": 2,
        "ignore_eos": True,
    }
    status, first, _ = http(server.port, "/v1/completions", body)
    assert (
        status == 200
        and [c["index"] for c in first["choices"]] == [0, 1, 2]
        and first["usage"]["completion_tokens"] == 18
    )
    # Seeded draws depend on seed, position and logits; a lone sequence sees the same logits each time.
    alone = body | {"n": 1}
    assert (
        http(server.port, "/v1/completions", alone)[1]["choices"]
        == http(server.port, "/v1/completions", alone)[1]["choices"]
    )
    lp = first["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 6 and len(lp["token_logprobs"]) == 6 and all(len(t) <= 2 for t in lp["top_logprobs"])
    chat = http(
        server.port,
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 2},
    )[1]
    content = chat["choices"][0]["logprobs"]["content"]
    assert 1 <= len(content) <= 3 and all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)


def test_stop_string_spanning_two_tokens_is_caught_and_not_emitted(server, tiny):
    body = {"prompt": [11, 23, 5, 300], "max_tokens": 24, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    pieces = http(server.port, "/v1/completions", body)[1]["choices"][0]["logprobs"]["tokens"]
    text = "".join(pieces)
    # A stop string made of the end of one token and the start of the next.
    i = next(
        i
        for i in range(3, len(pieces) - 1)
        if pieces[i]
        and pieces[i + 1]
        and "\ufffd" not in pieces[i] + pieces[i + 1]
        and text.find(pieces[i][-1] + pieces[i + 1][0]) == len("".join(pieces[: i + 1])) - 1
    )
    stop = pieces[i][-1] + pieces[i + 1][0]
    cut = len("".join(pieces[: i + 1])) - 1
    for stream in (False, True):
        if stream:
            from openai import OpenAI

            client = OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY)
            chunks = list(
                client.completions.create(
                    model=tiny.name,
                    prompt=body["prompt"],
                    max_tokens=24,
                    temperature=0,
                    stop=[stop],
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
            )
            got, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            choice = http(server.port, "/v1/completions", body | {"stop": stop})[1]["choices"][0]
            got, reason = choice["text"], choice["finish_reason"]
        assert got == text[:cut] and stop not in got and reason == "stop"


@pytest.mark.parametrize(
    "path, body, key, status, param",
    [
        ("/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, KEY, 400, "temperature"),
        ("/v1/chat/completions", {"messages": "hi"}, KEY, 400, "messages"),
        ("/v1/completions", {"prompt": [1, 2], "max_tokens": 0}, KEY, 400, "max_tokens"),
        ("/v1/completions", {"prompt": [1, 2], "top_p": 2}, KEY, 400, "top_p"),
        ("/v1/completions", {"prompt": [1, 2], "tools": [{}]}, KEY, 400, "tools"),
        ("/v1/completions", {"prompt": [1, 2], "max_tokens": 4}, None, 401, None),
        ("/v1/completions", {"prompt": [1, 2], "max_tokens": 4}, "wrong", 401, None),
        ("/v1/completions", {"model": "gpt-4", "prompt": [1, 2]}, KEY, 404, "model"),
        ("/v1/completions", {"prompt": [1, 2], "max_tokens": 5000}, KEY, 400, "max_tokens"),
        ("/v1/completions", {"prompt": [3] * 600}, KEY, 400, "prompt"),
    ],
)
def test_errors_have_openai_shape_and_the_server_keeps_serving(server, path, body, key, status, param):
    got, payload, _ = http(server.port, path, body, key=key)
    assert got == status, payload
    assert set(payload["error"]) >= {"message", "type", "param", "code"} and payload["error"]["message"]
    if param:
        assert payload["error"]["param"] == param
    assert http(server.port, "/v1/completions", {"prompt": [1, 2], "max_tokens": 2, "temperature": 0})[0] == 200


def test_context_error_names_the_numbers(server):
    payload = http(server.port, "/v1/completions", {"prompt": [1, 2], "max_tokens": 5000})[1]
    assert (
        "maximum context length is 512 tokens" in payload["error"]["message"] and "5000" in payload["error"]["message"]
    )


def test_disconnect_mid_stream_frees_the_blocks(server):
    from http.client import HTTPConnection

    conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"prompt": [4, 5, 6], "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    resp = conn.getresponse()
    resp.fp.readline()  # the first event: the sequence is running
    stats = http(server.port, "/v1/stats")[1]
    assert stats["engine"]["kv_blocks_used"] > 0 and stats["engine"]["running"] == 1
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        engine = http(server.port, "/v1/stats")[1]["engine"]
        if engine["kv_blocks_used"] == 0 and engine["running"] == 0:
            break
        time.sleep(0.1)
    assert engine["kv_blocks_used"] == 0 and engine["running"] == 0


def test_models_metrics_and_stats(server, tiny):
    assert http(server.port, "/v1/models")[1]["data"][0]["id"] == tiny.name
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as resp:
        text = resp.read().decode()
    for name in (
        "stagecoach_requests_total",
        "stagecoach_prompt_tokens_total",
        "stagecoach_generation_tokens_total",
        "stagecoach_time_to_first_token_seconds_bucket",
        "stagecoach_inter_token_latency_seconds_bucket",
        "stagecoach_requests_running",
        "stagecoach_requests_waiting",
        "stagecoach_kv_blocks_used",
    ):
        assert name in text, name
    stats = http(server.port, "/v1/stats")[1]
    assert [s["index"] for s in stats["stages"]] == [0, 1]
    assert all(
        s["address"].startswith("127.0.0.1:") and s["microbatches"] > 0 and s["compute_ms"]["p50"] > 0
        for s in stats["stages"]
    )


def test_queue_full_draining_and_not_ready(tiny, tmp_path):
    """A one-slot server (local backend): 429 with Retry-After when full; 503 once SIGTERM starts draining,
    while the request in flight still completes."""
    s = Server(
        ["--model", str(tiny), "--backend", "local", "--max-running", "1", "--max-queue", "0", "--kv-blocks", "64"],
        tmp_path / "small.log",
    )
    try:
        s.wait_ready()
        import threading

        results = {}

        def long_request():
            results["long"] = http(
                s.port,
                "/v1/completions",
                {"prompt": [4, 5], "max_tokens": 300, "temperature": 0, "ignore_eos": True},
                key=None,
            )

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.monotonic() + 10
        while http(s.port, "/v1/stats", key=None)[1]["active_requests"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        status, payload, headers = http(s.port, "/v1/completions", {"prompt": [1], "max_tokens": 2}, key=None)
        assert status == 429 and headers.get("Retry-After") == "1" and payload["error"]["code"] == "queue_full"
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, payload, _ = http(s.port, "/v1/completions", {"prompt": [1], "max_tokens": 2}, key=None)
        assert (
            status == 503 and http(s.port, "/health", key=None)[0] == 503 and http(s.port, "/live", key=None)[0] == 200
        )
        t.join(timeout=60)
        assert results["long"][0] == 200 and results["long"][1]["usage"]["completion_tokens"] == 300
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.stop()


def test_sigkill_of_serve_leaves_no_actors_or_placement_groups(tiny, ray_cluster, tmp_path):
    import ray
    from ray.util.state import list_actors

    def alive_actors() -> set[str]:
        return {a.actor_id for a in list_actors(filters=[("class_name", "=", "StageActor"), ("state", "=", "ALIVE")])}

    def live_groups() -> set[str]:
        return {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}

    before_actors, before_groups = alive_actors(), live_groups()  # the module's other server may be up
    s = Server(
        [
            "--model",
            str(tiny),
            "--stages",
            "2",
            "--ray-address",
            ray_cluster.address,
            "--grpc-host",
            "127.0.0.1",
            "--gpus-per-stage",
            "0",
            "--placement",
            "pack",
        ],
        tmp_path / "killed.log",
    )
    s.wait_ready()
    ours_actors, ours_groups = alive_actors() - before_actors, live_groups() - before_groups
    assert len(ours_actors) == 2 and len(ours_groups) == 1
    s.proc.kill()
    s.proc.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (alive_actors() & ours_actors or live_groups() & ours_groups):
        time.sleep(1)
    assert alive_actors() & ours_actors == set() and live_groups() & ours_groups == set()
