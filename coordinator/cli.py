"""The `stagecoach` command line: generate text with the model split into stages."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from stagecoach.errors import ConfigError, RequestError, StagecoachError


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagecoach", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from one or more prompts")
    add_cluster_flags(gen)
    gen.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for several prompts)")
    gen.add_argument("--prompt-ids", action="append", type=_int_list, default=[], help="prompt token ids, e.g. 1,2,3")
    gen.add_argument("--chat", action="store_true", help="wrap each --prompt as a user message in the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: generation_config.json)")
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=None)
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the checkpoint's stop tokens")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt (a list for several)")

    srv = sub.add_parser("serve", help="serve the model behind an OpenAI-compatible HTTP API")
    add_cluster_flags(srv)
    srv.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key-env", default=None, help="environment variable holding the API key; when set, requests need 'Authorization: Bearer <key>'")
    srv.add_argument("--max-running", type=int, default=None, help="sequences admitted at once (default: as many as the KV cache holds)")
    srv.add_argument("--max-queue", type=int, default=None, help="requests waiting beyond --max-running before 429 (default: unlimited)")
    srv.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens at most (default: the model's, capped by the KV cache)")
    srv.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the checkpoint folder's name)")
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get to finish on SIGTERM")
    srv.add_argument("--request-timeout", type=float, default=600.0, help="seconds a generation request may take before it ends with 408")

    top = sub.add_parser("top", help="a live terminal view of a serving pipeline (per-stage and per-hop latency)")
    top.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="print one frame and exit (for scripts)")
    top.add_argument("--api-key-env", default=None, help="environment variable holding the server's API key")

    submit = sub.add_parser("submit", help="run a command (usually `stagecoach serve`) as a Ray job and follow it; used by the Helm chart")
    submit.add_argument("--address", default="http://127.0.0.1:8265", help="Ray's job API (the dashboard address)")
    submit.add_argument("--name", default="stagecoach-serve", help="jobs of this name left unfinished by an earlier submitter are stopped first")
    submit.add_argument("--wait", type=float, default=600.0, help="seconds to wait for Ray's job API to answer")
    submit.add_argument("--stop-timeout", type=float, default=60.0, help="seconds a stopped job gets to end (its drain)")
    submit.add_argument("job", nargs=argparse.REMAINDER, help="-- and the command to run")

    fetch = sub.add_parser("fetch-demo-model", help="download (hash-pinned) and convert the demo model, Qwen2.5-Coder-0.5B-Instruct")
    fetch.add_argument("--dir", default=None, help="where the converted checkpoint goes (default ~/.cache/stagecoach/qwen2.5-coder-0.5b-instruct)")
    fetch.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")

    rnd = sub.add_parser("make-random-model", help="write a small random Qwen2 checkpoint folder (for trying things out)")
    rnd.add_argument("--dir", required=True)
    rnd.add_argument("--layers", type=int, default=4)
    rnd.add_argument("--hidden-size", type=int, default=64)
    rnd.add_argument("--seed", type=int, default=0)
    return parser


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by generate and serve: what to load, how to split it, where stages run."""
    parser.add_argument("--config", default=None, help="a cluster YAML (configs/*.yaml); flags override it")
    parser.add_argument("--model", default=None, help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--stages", type=int, default=None, help="number of pipeline stages (default 1)")
    split.add_argument("--layers", type=_int_list, default=None, help="explicit layer counts per stage, e.g. 3,1,1")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default float32 (or the config's)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="where stages run (default auto)")
    parser.add_argument("--backend", choices=["ray", "local"], default="ray", help="ray: stages as Ray actors over gRPC; local: all in this process")
    parser.add_argument("--ray-address", default=None, help="'local' starts a new Ray, 'auto' or host:port joins one (default: a running one, else a new local one)")
    parser.add_argument("--placement", choices=["auto", "strict_spread", "spread", "pack"], default=None)
    parser.add_argument("--gpus-per-stage", type=float, default=None, help="default 1 when the Ray cluster has GPUs, else 0")
    parser.add_argument("--max-inflight", type=int, default=None, help="microbatches in flight (default: the number of stages)")
    parser.add_argument("--grpc-host", default=None, help="address the stage and coordinator gRPC servers bind (default: the node's)")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per KV cache block")
    parser.add_argument("--kv-blocks", type=int, default=None, help="KV cache blocks per stage on CPU (default: from cache.max_tokens)")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="token budget of one microbatch (chunked prefill)")
    parser.add_argument("--memory-limit-mb", type=int, default=None, help="per-stage memory budget (default: the device's)")


def config_from_args(args: argparse.Namespace):
    """The YAML config (if any) with every given flag laid over it."""
    from stagecoach.cluster.config import ClusterConfig

    config = ClusterConfig.from_yaml(args.config) if args.config else ClusterConfig()
    overrides = [
        (config.model, "path", args.model),
        (config.model, "dtype", args.dtype),
        (config.pipeline, "num_stages", args.stages),
        (config.pipeline, "layers", args.layers),
        (config.pipeline, "device", args.device),
        (config.pipeline, "placement", args.placement),
        (config.pipeline, "gpus_per_stage", args.gpus_per_stage),
        (config.pipeline, "max_inflight", args.max_inflight),
        (config.pipeline, "max_batch_tokens", args.max_batch_tokens),
        (config.pipeline, "memory_limit_mb", args.memory_limit_mb),
        (config.cache, "block_size", args.block_size),
        (config.cache, "num_blocks", args.kv_blocks),
        (config.transport, "host", args.grpc_host),
    ]
    for section, name, value in overrides:
        if value is not None:
            setattr(section, name, value)
    if args.stages is not None:
        config.pipeline.layers = None
    for section in (config.model, config.pipeline, config.cache):
        section.__post_init__()  # re-validate with the flags applied
    if not config.model.path:
        raise ConfigError("no model: give --model DIR or model.path in --config")
    return config


def build_pipeline(config, backend: str, ray_address: str | None = None):
    """Partitions the layers and starts the stages: in this process, or as Ray actors."""
    from stagecoach.coordinator.partition import partition_layers
    from stagecoach.stage.model import ModelConfig

    model = ModelConfig.from_pretrained(config.model.path)
    lm_head_cost = model.vocab_size * model.hidden_size / model.layer_num_params()
    p, c = config.pipeline, config.cache
    ranges = partition_layers(model.num_hidden_layers, p.num_stages, last_stage_extra=lm_head_cost, layer_counts=p.layers)
    if backend == "local":
        from stagecoach.coordinator.pipeline import LocalPipeline

        device = "cpu" if p.device == "auto" else p.device
        num_blocks = c.num_blocks or -(-c.max_tokens // c.block_size)
        return LocalPipeline.load(config.model.path, ranges, config.model.dtype, device, num_blocks, c.block_size), model
    from stagecoach.cluster.launch import RayPipeline, connect_ray

    # A new local Ray gets enough logical CPUs for one share per stage, even on a small machine.
    connect_ray(ray_address, num_cpus=max(os.cpu_count() or 1, int(p.num_stages * p.cpus_per_stage)), host=config.transport.host)
    return RayPipeline(config, ranges), model


def build_engine(pipeline, config, backend: str, stop_token_ids: list[int], max_model_len: int, max_running: int | None = None):
    """The engine over a started pipeline, sized from the config: one microbatch in flight per stage by default."""
    from stagecoach.coordinator.engine import Engine
    from stagecoach.coordinator.scheduler import SchedulerConfig

    p = config.pipeline
    scheduler = SchedulerConfig(
        num_blocks=pipeline.num_blocks,
        block_size=pipeline.block_size,
        max_num_batched_tokens=p.max_batch_tokens,
        max_num_seqs=p.max_num_seqs,
        max_model_len=max_model_len,
        max_running=max_running,
    )
    # In-process stages run one after another: a second microbatch in flight would only wait.
    return Engine(
        pipeline, scheduler, stop_token_ids,
        max_inflight=1 if backend == "local" else (p.max_inflight or len(pipeline.stages)),
        heartbeat_interval_s=p.heartbeat_interval_s,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from stagecoach.coordinator.engine import sampling_defaults
    from stagecoach.coordinator.tokenizer import IncrementalDetokenizer, Tokenizer
    from stagecoach.stage.batch import SamplingParams
    from stagecoach.stage.model import ModelConfig

    if not args.prompt and not args.prompt_ids:
        raise ConfigError("give a prompt: --prompt TEXT or --prompt-ids 1,2,3")
    if args.chat and args.prompt_ids:
        raise ConfigError("--chat applies to --prompt text, not to --prompt-ids")
    config = config_from_args(args)
    model_dir = Path(config.model.path)
    model = ModelConfig.from_pretrained(model_dir)
    tokenizer = Tokenizer(model_dir)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": p}]) if args.chat else tokenizer.encode(p) for p in args.prompt]
    prompts += args.prompt_ids
    for i, p in enumerate(prompts):
        if len(p) >= model.max_position_embeddings:
            raise RequestError(f"prompt {i} has {len(p)} tokens; the model's max_position_embeddings is {model.max_position_embeddings}")
        bad = [t for t in p if not 0 <= t < model.vocab_size]
        if bad:
            raise RequestError(f"prompt {i}: token id {bad[0]} is outside the vocabulary of {model.vocab_size}")
    defaults = sampling_defaults(model_dir)
    overrides = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "repetition_penalty": args.repetition_penalty}
    params = defaults | {k: v for k, v in overrides.items() if v is not None}
    sampling = [
        SamplingParams(
            **params,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            seed=args.seed,
            max_tokens=args.max_new_tokens,
            ignore_eos=args.ignore_eos,
        )
        for _ in prompts
    ]

    pipeline, model = build_pipeline(config, args.backend, args.ray_address)
    try:
        engine = build_engine(pipeline, config, args.backend, tokenizer.stop_token_ids, model.max_position_embeddings)
        seqs = engine.generate(prompts, sampling)
    finally:
        pipeline.shutdown()

    stages = [s.as_json() for s in pipeline.stages]
    timing_rows = engine.timings.rows()
    results = []
    for seq in seqs:
        detok = IncrementalDetokenizer(tokenizer)
        text = "".join(detok.add(t) for t in seq.output_token_ids) + detok.flush()
        results.append(
            {
                "prompt_token_ids": seq.prompt_token_ids,
                "token_ids": seq.output_token_ids,
                "text": text,
                "finish_reason": seq.finish_reason,
                "stages": stages,
                "timings": timing_rows,
            }
        )
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results))
    else:
        for r in results:
            print(r["text"])
        print_stage_table(stages, timing_rows)
    return 0


def print_stage_table(stages: list[dict], timing_rows: list[dict]) -> None:
    """Per stage: where it ran, its layers, and its compute, queueing and onward-hop latency."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="per-stage latency, ms (p50 / p99 over this run's microbatches)")
    for col in ("stage", "layers", "address", "batches", "compute", "queued", "hop onward"):
        table.add_column(col, justify="right", no_wrap=True)
    by_stage = {row["stage"]: row for row in timing_rows}
    for s in stages:
        row = by_stage.get(s["index"], {})

        def ms(key):
            p = row.get(key)
            return "-" if not p else f"{p['p50']:.2f} / {p['p99']:.2f}"

        table.add_row(
            str(s["index"]), f"[{s['layers'][0]}, {s['layers'][1]})", s.get("address", "in-process"),
            str(row.get("microbatches", 0)), ms("compute_ms"), ms("queue_ms"), ms("hop_ms"),
        )
    Console(width=max(100, shutil.get_terminal_size().columns)).print(table)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from stagecoach.coordinator.serve import ServeOptions, serve

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    config = config_from_args(args)
    options = ServeOptions(
        host=args.host, port=args.port, backend=args.backend, ray_address=args.ray_address, api_key_env=args.api_key_env,
        max_running=args.max_running, max_queue=args.max_queue, max_model_len=args.max_model_len,
        served_model_name=args.served_model_name, drain_timeout_s=args.drain_timeout, request_timeout_s=args.request_timeout,
    )
    return asyncio.run(serve(config, options))


def cmd_top(args: argparse.Namespace) -> int:
    from stagecoach.cluster.top import run_top

    if args.interval <= 0:
        raise ConfigError(f"--interval must be positive, got {args.interval}")
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    return run_top(args.url, args.interval, args.once, key)


def cmd_submit(args: argparse.Namespace) -> int:
    from stagecoach.cluster.submit import run_submitter

    command = args.job[1:] if args.job[:1] == ["--"] else args.job
    return run_submitter(args.address, args.name, command, wait_s=args.wait, stop_timeout_s=args.stop_timeout)


def cmd_fetch_demo_model(args: argparse.Namespace) -> int:
    from stagecoach.coordinator.demo_model import fetch_demo_model

    path = fetch_demo_model(args.dir, dtype=args.dtype, log=lambda msg: print(msg, file=sys.stderr))
    print(path)
    return 0


def cmd_make_random_model(args: argparse.Namespace) -> int:
    from stagecoach.coordinator.random_checkpoint import write_random_checkpoint

    path = write_random_checkpoint(args.dir, num_hidden_layers=args.layers, hidden_size=args.hidden_size, seed=args.seed)
    print(f"wrote a random Qwen2 checkpoint ({args.layers} layers, hidden {args.hidden_size}) to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"generate": cmd_generate, "serve": cmd_serve, "top": cmd_top, "submit": cmd_submit, "fetch-demo-model": cmd_fetch_demo_model, "make-random-model": cmd_make_random_model}
    try:
        return handlers[args.command](args)
    except StagecoachError as e:
        print(f"stagecoach: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
