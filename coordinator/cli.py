"""The `stagecoach` command line: generate text with the model split into stages."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from stagecoach.errors import ConfigError, StagecoachError, StageComputeError, error_kind

DEFAULT_NEW_TOKENS = 64


def build_parser() -> argparse.ArgumentParser:
    from stagecoach.cluster.config import SERVE_ONLY, add_flags
    from stagecoach.cluster.testbed_cli import add_parser as add_testbed

    parser = argparse.ArgumentParser(prog="stagecoach", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    srv = sub.add_parser("serve", help="serve the model behind an OpenAI-compatible HTTP API")
    add_flags(srv, SERVE_ONLY)
    _add_tools(sub)
    add_testbed(sub)
    rnd = sub.add_parser(
        "make-random-model", help="write a small random Qwen2 checkpoint folder (for trying things out)"
    )
    rnd.add_argument("--dir", required=True)
    rnd.add_argument("--layers", type=int, default=4)
    rnd.add_argument("--hidden-size", type=int, default=64)
    rnd.add_argument("--seed", type=int, default=0)
    return parser


def _add_generate(sub) -> None:
    from stagecoach.cluster.config import add_flags
    from stagecoach.cluster.config_mapping import int_list

    gen = sub.add_parser("generate", help="generate text from one or more prompts")
    add_flags(gen, "generate")
    gen.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for several prompts)")
    gen.add_argument("--prompt-ids", action="append", type=int_list, default=[], help="prompt token ids, e.g. 1,2,3")
    gen.add_argument("--chat", action="store_true", help="wrap each --prompt as a user message in the chat template")
    gen.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"tokens to generate at most (default: {DEFAULT_NEW_TOKENS}, or what the context leaves)",
    )
    gen.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: generation_config.json)")
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=None)
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--n", type=int, default=1, help="completions per prompt (seeded seed, seed + 1, …)")
    gen.add_argument(
        "--logprobs", type=int, default=None, help="also print each token's log-probability and the top N alternatives"
    )
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the checkpoint's stop tokens")
    gen.add_argument("--json", action="store_true", help="print one JSON object per completion (a list for several)")


def _add_tools(sub) -> None:
    """The commands around serving: the terminal UI, the chart's submitter, the demo model's fetch."""
    top = sub.add_parser("top", help="a live terminal view of a serving pipeline (per-stage and per-hop latency)")
    top.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="print one frame and exit (for scripts)")
    top.add_argument("--api-key-env", default=None, help="environment variable holding the server's API key")

    submit = sub.add_parser(
        "submit", help="run a command (usually `stagecoach serve`) as a Ray job and follow it; used by the Helm chart"
    )
    submit.add_argument("--address", default="http://127.0.0.1:8265", help="Ray's job API (the dashboard address)")
    submit.add_argument(
        "--name",
        default="stagecoach-serve",
        help="jobs of this name left unfinished by an earlier submitter are stopped first",
    )
    submit.add_argument("--wait", type=float, default=600.0, help="seconds to wait for Ray's job API to answer")
    submit.add_argument(
        "--stop-timeout", type=float, default=60.0, help="seconds a stopped job gets to end (its drain)"
    )
    submit.add_argument("job", nargs=argparse.REMAINDER, help="-- and the command to run")

    fetch = sub.add_parser(
        "fetch-demo-model",
        help="download (hash-pinned) the demo model, Qwen2.5-Coder-0.5B-Instruct as a GGUF file (Q4_K_M); prints its folder",
    )
    fetch.add_argument(
        "--dequantize",
        action="store_true",
        help="convert it to a Hugging Face checkpoint in --dtype instead (the float reference the tests compare against)",
    )
    fetch.add_argument(
        "--dir",
        default=None,
        help="where the folder goes (default ~/.cache/stagecoach/qwen2.5-coder-0.5b-instruct[-gguf])",
    )
    fetch.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def load_config(args: argparse.Namespace):
    """The YAML config (if any) with every given flag laid over it."""
    from stagecoach.cluster.config import ClusterConfig

    config = ClusterConfig.load(args.config, args)
    if not config.model.path:
        raise ConfigError("no model: give --model DIR or model.path in --config")
    return config


def _sampling(args: argparse.Namespace, model_dir: Path):
    """The request's SamplingParams: generation_config.json's defaults, then the flags; refused values name their flag's parameter."""
    from stagecoach.coordinator.request_checks import sampling_defaults
    from stagecoach.proto.types import SamplingParams

    overrides = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
    }
    params = sampling_defaults(model_dir) | {k: v for k, v in overrides.items() if v is not None}
    return SamplingParams(
        **params,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        max_tokens=DEFAULT_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens,
        n=args.n,
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )


def _prompts(args: argparse.Namespace, tokenizer) -> list[list[int]]:
    if not args.prompt and not args.prompt_ids:
        raise ConfigError("give a prompt: --prompt TEXT or --prompt-ids 1,2,3")
    if args.chat and args.prompt_ids:
        raise ConfigError("--chat applies to --prompt text, not to --prompt-ids")
    prompts = [
        tokenizer.encode_chat([{"role": "user", "content": p}]) if args.chat else tokenizer.encode(p)
        for p in args.prompt
    ]
    return prompts + args.prompt_ids


def cmd_generate(args: argparse.Namespace) -> int:
    from stagecoach.cluster.backends import open_pipeline
    from stagecoach.coordinator.compose import build_engine, max_model_len
    from stagecoach.coordinator.request_checks import RequestLimits, check_request, expand_choices
    from stagecoach.coordinator.supervisor import run_engine
    from stagecoach.coordinator.tokenizer import Tokenizer
    from stagecoach.proto.model_config import ModelConfig

    config = load_config(args)
    model_dir = Path(config.model.path)
    model = ModelConfig.from_pretrained(model_dir)
    tokenizer = Tokenizer(model_dir)
    prompts, sampling = _prompts(args, tokenizer), _sampling(args, model_dir)
    limit = model.max_position_embeddings
    limits = RequestLimits(limit, model.vocab_size, None, limit)
    # Without --max-new-tokens a prompt gets what its context leaves, up to the default.
    choices = expand_choices(prompts, sampling, limit, args.max_new_tokens is not None, DEFAULT_NEW_TOKENS)
    for i in range(len(prompts)):
        prompt, own = choices[i * sampling.n]
        check_request(prompt, own, limits, param=f"prompt {i}")  # before any stage starts: a bad request costs nothing

    pipeline = open_pipeline(config)
    try:
        # As `serve` does: a request longer than the KV cache holds is refused (it could never run), not left waiting.
        limit = max_model_len(config, model, pipeline)
        engine = build_engine(pipeline, config, tokenizer.stop_token_ids, limit, model.vocab_size)
        seqs = engine.add_requests(choices)
        run_engine(engine)  # a stage that fails meanwhile is recovered, as when serving
    finally:
        pipeline.shutdown()
    _print_results(args, tokenizer, seqs, [s.as_json() for s in pipeline.stages], engine.timings.rows())
    failed = [i for i, seq in enumerate(seqs) if seq.finish_reason == "error"]
    if failed:  # the others finished: their results are printed above
        error = StageComputeError(
            f"completion(s) {', '.join(map(str, failed))} failed: a stage failed their microbatches again when "
            f"retried on their own (the log names the stage and its error)"
        )
        print(f"stagecoach: error: {error}", file=sys.stderr)
        return error_kind(error).exit_code
    return 0


def _print_results(
    args: argparse.Namespace, tokenizer, seqs: list, stages: list[dict], timing_rows: list[dict]
) -> None:
    from stagecoach.coordinator.tokenizer import IncrementalDetokenizer

    results = []
    for seq in seqs:
        detok = IncrementalDetokenizer(tokenizer)
        text = "".join(detok.add(t) for t in seq.output_token_ids) + detok.flush()
        result = {
            "prompt_token_ids": seq.prompt_token_ids,
            "token_ids": seq.output_token_ids,
            "text": text,
            "finish_reason": seq.finish_reason,
            "stages": stages,
            "timings": timing_rows,
        }
        if args.logprobs is not None:
            result |= {"logprobs": seq.output_logprobs, "top_logprobs": seq.output_top_logprobs}
        results.append(result)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results))
    else:
        for r in results:
            print(r["text"])
        print_stage_table(stages, timing_rows)


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

        def ms(key, row=row):
            p = row.get(key)
            return "-" if not p else f"{p['p50']:.2f} / {p['p99']:.2f}"

        table.add_row(
            str(s["index"]),
            f"[{s['layers'][0]}, {s['layers'][1]})",
            s.get("address", "in-process"),
            str(row.get("microbatches", 0)),
            ms("compute_ms"),
            ms("queue_ms"),
            ms("hop_ms"),
        )
    Console(width=max(100, shutil.get_terminal_size().columns)).print(table)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from stagecoach.coordinator.serve import serve

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    return asyncio.run(serve(load_config(args)))


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

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    path = fetch_demo_model(args.dir, dtype=args.dtype, log=log, dequantize=args.dequantize)
    print(path)
    return 0


def cmd_make_random_model(args: argparse.Namespace) -> int:
    from stagecoach.coordinator.random_checkpoint import write_random_checkpoint

    path = write_random_checkpoint(
        args.dir, num_hidden_layers=args.layers, hidden_size=args.hidden_size, seed=args.seed
    )
    print(f"wrote a random Qwen2 checkpoint ({args.layers} layers, hidden {args.hidden_size}) to {path}")
    return 0


def cmd_testbed(args: argparse.Namespace) -> int:
    from stagecoach.cluster.testbed_cli import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "generate": cmd_generate,
        "serve": cmd_serve,
        "top": cmd_top,
        "submit": cmd_submit,
        "fetch-demo-model": cmd_fetch_demo_model,
        "make-random-model": cmd_make_random_model,
        "testbed": cmd_testbed,
    }
    try:
        return handlers[args.command](args)
    except StagecoachError as e:
        print(f"stagecoach: error: {e}", file=sys.stderr)
        return error_kind(e).exit_code


if __name__ == "__main__":
    sys.exit(main())
