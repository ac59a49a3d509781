"""The `stagecoach` command line: generate text with the model split into stages."""

from __future__ import annotations

import argparse
import json
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
    gen.add_argument("--model", required=True, help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    split = gen.add_mutually_exclusive_group()
    split.add_argument("--stages", type=int, default=None, help="number of pipeline stages (default 1)")
    split.add_argument("--layers", type=_int_list, default=None, help="explicit layer counts per stage, e.g. 3,1,1")
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
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    gen.add_argument("--device", default="cpu", help="cpu or cuda")
    gen.add_argument("--backend", choices=["local"], default="local", help="local: all stages in this process")
    gen.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    gen.add_argument("--kv-blocks", type=int, default=None, help="KV cache blocks per stage (default: enough for the prompts)")
    gen.add_argument("--max-batch-tokens", type=int, default=512, help="token budget of one microbatch (chunked prefill)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")

    rnd = sub.add_parser("make-random-model", help="write a small random Qwen2 checkpoint folder (for trying things out)")
    rnd.add_argument("--dir", required=True)
    rnd.add_argument("--layers", type=int, default=4)
    rnd.add_argument("--hidden-size", type=int, default=64)
    rnd.add_argument("--seed", type=int, default=0)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from stagecoach.coordinator.engine import Engine, LocalPipeline, sampling_defaults
    from stagecoach.coordinator.partition import partition_layers
    from stagecoach.coordinator.scheduler import SchedulerConfig
    from stagecoach.coordinator.tokenizer import IncrementalDetokenizer, Tokenizer
    from stagecoach.stage.batch import SamplingParams
    from stagecoach.stage.model import ModelConfig

    if not args.prompt and not args.prompt_ids:
        raise ConfigError("give a prompt: --prompt TEXT or --prompt-ids 1,2,3")
    if args.chat and args.prompt_ids:
        raise ConfigError("--chat applies to --prompt text, not to --prompt-ids")
    model_dir = Path(args.model)
    config = ModelConfig.from_pretrained(model_dir)
    tokenizer = Tokenizer(model_dir)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": p}]) if args.chat else tokenizer.encode(p) for p in args.prompt]
    prompts += args.prompt_ids

    num_stages = len(args.layers) if args.layers else (args.stages or 1)
    lm_head_cost = config.vocab_size * config.hidden_size / config.layer_num_params()
    ranges = partition_layers(config.num_hidden_layers, num_stages, last_stage_extra=lm_head_cost, layer_counts=args.layers)

    defaults = sampling_defaults(model_dir)
    overrides = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
    }
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
    for i, p in enumerate(prompts):
        if len(p) >= config.max_position_embeddings:
            raise RequestError(
                f"prompt {i} has {len(p)} tokens; the model's max_position_embeddings is {config.max_position_embeddings}"
            )
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise RequestError(f"prompt {i}: token id {bad[0]} is outside the vocabulary of {config.vocab_size}")
    max_len = config.max_position_embeddings
    needed = sum(-(-min(len(p) + args.max_new_tokens, max_len) // args.block_size) for p in prompts)
    num_blocks = args.kv_blocks or needed
    pipeline = LocalPipeline.load(model_dir, ranges, args.dtype, args.device, num_blocks, args.block_size)
    engine = Engine(
        pipeline,
        SchedulerConfig(num_blocks=num_blocks, block_size=args.block_size, max_num_batched_tokens=args.max_batch_tokens, max_model_len=max_len),
        tokenizer.stop_token_ids,
    )
    seqs = engine.generate(prompts, sampling)

    stages = [{"index": s.index, "layers": list(s.layers)} for s in pipeline.stages]
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
            }
        )
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results))
    else:
        for r in results:
            print(r["text"])
        print(
            "stages: " + ", ".join(f"{s['index']}: layers [{s['layers'][0]}, {s['layers'][1]})" for s in stages),
            file=sys.stderr,
        )
    return 0


def cmd_make_random_model(args: argparse.Namespace) -> int:
    from stagecoach.coordinator.random_checkpoint import write_random_checkpoint

    path = write_random_checkpoint(args.dir, num_hidden_layers=args.layers, hidden_size=args.hidden_size, seed=args.seed)
    print(f"wrote a random Qwen2 checkpoint ({args.layers} layers, hidden {args.hidden_size}) to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"generate": cmd_generate, "make-random-model": cmd_make_random_model}
    try:
        return handlers[args.command](args)
    except StagecoachError as e:
        print(f"stagecoach: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
