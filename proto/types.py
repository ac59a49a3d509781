"""The Python types that cross the wire: sampling parameters, samples and deliveries, stage descriptions (microbatches and
their chunks: proto/microbatch.py). Plain Python, no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stagecoach.errors import RequestError

# The one table of sampling bounds: (parameter, lowest, highest, whether each end is allowed, what to say).
# HTTP, the CLI and the wire all build a SamplingParams, so all of them refuse the same values.
SAMPLING_BOUNDS: tuple[tuple[str, float | None, float | None, bool, bool, str], ...] = (
    ("temperature", 0, 2, True, True, "in [0, 2] (0 means greedy)"),
    ("top_p", 0, 1, False, True, "in (0, 1]"),
    ("top_k", -1, None, True, True, "-1, 0 (both: off) or a positive count"),
    ("repetition_penalty", 0, None, False, True, "> 0 (1 is off)"),
    ("presence_penalty", -2, 2, True, True, "in [-2, 2]"),
    ("frequency_penalty", -2, 2, True, True, "in [-2, 2]"),
    ("max_tokens", 1, None, True, True, ">= 1"),
    ("n", 1, 16, True, True, "between 1 and 16"),
    ("logprobs", 0, 20, True, True, "between 0 and 20"),
    ("seed", 0, 2**63, True, False, "in [0, 2**63)"),
)


# The same bounds with open ends as infinities, read on every SamplingParams (each stage decodes them per microbatch).
_BOUNDS = tuple(
    (name, -math.inf if low is None else low, math.inf if high is None else high, low_ok, high_ok, rule)
    for name, low, high, low_ok, high_ok, rule in SAMPLING_BOUNDS
)


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling; HF semantics for temperature/top-k/top-p/repetition penalty, OpenAI for the others."""

    temperature: float = 1.0  # 0 means greedy (penalties still apply)
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 or -1: no top-k filter
    repetition_penalty: float = 1.0  # HF: divides positive / multiplies negative logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI: subtracted once from each generated token's logit
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated tokens
    seed: int | None = None  # the coordinator fills one in when the request gives none
    max_tokens: int = 16  # new tokens to generate at most
    n: int = 1  # completions per prompt (each a sequence of its own, seeded seed + k)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's; n: also the top n

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises RequestError naming the first parameter outside SAMPLING_BOUNDS."""
        for name, low, high, low_ok, high_ok, rule in _BOUNDS:
            value = getattr(self, name)
            if value is None or (
                type(value) is not bool
                and (low < value < high or (value == low and low_ok) or (value == high and high_ok))
            ):
                continue  # (NaN fails every comparison: it is refused)
            raise RequestError(f"{name} must be {rule}, got {value!r}", param=name)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


@dataclass(slots=True)
class SampleResult:
    seq_id: int
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(slots=True)
class Delivered:
    """A microbatch back from the last stage: its samples, or the error that stopped it."""

    batch_id: int
    samples: list[SampleResult]
    timings: list = field(default_factory=list)  # pb.StageTiming per stage, each on its stage's own clock
    error: str = ""
    error_stage: int | None = None  # the stage that failed it (None: before any stage took it)
    submit_ns: int = 0  # the coordinator's send to stage 0, until stage 0 acknowledged it


LayerRange = tuple[int, int]  # [start, end)


@dataclass(slots=True)
class StageSummary:
    """What the coordinator knows of one running stage (from its Info and its latest health check)."""

    index: int
    layers: LayerRange
    node_id: str = ""
    address: str = ""
    pid: int = 0
    device: str = "cpu"
    num_kv_blocks: int = 0
    weight_bytes: int = 0
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0
    errors: int = 0  # from its latest health check
    kv_block_layer_bytes: int = 0  # one KV block of one layer
    layer_weight_bytes: list[int] = field(default_factory=list)  # each of its decoder layers' weights, in order
    weight_formats: dict[str, int] = field(default_factory=dict)  # weight_bytes by format (float32, int8/32, …)

    def as_json(self) -> dict:
        out = {"index": self.index, "layers": list(self.layers)}
        if self.address:
            out |= {"node_id": self.node_id, "address": self.address, "pid": self.pid, "device": self.device}
        return out
