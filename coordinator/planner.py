"""The rebalancing planner: contiguous layer ranges from measured per-stage speeds, each stage's memory and the work mix; pure Python."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from stagecoach.errors import PartitionError
from stagecoach.proto.microbatch import MicroBatch

TIE = 1e-9  # relative: stage times this close count as equal (float noise)


@dataclass(slots=True)
class StageSpeed:
    """One stage as measured over a window, and what it can hold.

    Times are per decoder layer (the layer part) or per stage (the fixed part: embedding on the first
    stage; final norm, lm_head and sampling on the last), for one decode microbatch or one prefill token.
    """

    decode_layer_s: float  # seconds per layer per decode microbatch
    prefill_layer_s: float  # seconds per layer per prefill token
    decode_fixed_s: float = 0.0  # seconds of fixed work per decode microbatch
    prefill_fixed_s: float = 0.0  # seconds of fixed work per prefill token
    memory_bytes: int | None = None  # budget for weights and KV cache; None: unbounded
    # weights it holds whatever its layers (embed_tokens on the first; norm and lm_head on the last)
    fixed_bytes: int = 0


@dataclass(slots=True)
class Workload:
    """The window's work, the same for every stage (each microbatch crosses every stage)."""

    decode_batches: float  # decode microbatches
    prefill_tokens: float  # prefill tokens


@dataclass(slots=True)
class Plan:
    counts: list[int]  # layers per stage
    stage_seconds: list[float]  # each stage's predicted time for the window's work
    current: list[int]  # the split it was planned from
    current_seconds: list[float]  # each stage's predicted time with the current split

    @property
    def gain(self) -> float:
        """Predicted speed-up of the pipeline's pace: the current slowest stage's time over the plan's, minus 1."""
        slowest = max(self.stage_seconds)
        return max(self.current_seconds) / slowest - 1 if slowest > 0 else 0.0

    def summary(self) -> dict:
        """What /v1/stats shows of it (its `rebalance` object, with the current split)."""
        return {"proposed": self.counts, "predicted_gain": round(self.gain, 4), "layers_moved": self.layers_moved}

    @property
    def layers_moved(self) -> int:
        """Layers that change stage: the boundaries' moves, added up."""
        return sum(abs(sum(self.counts[:i]) - sum(self.current[:i])) for i in range(1, len(self.counts)))


def stage_seconds(speed: StageSpeed, num_layers: int, work: Workload) -> float:
    """A stage's time for the window's work with num_layers layers."""
    decode = work.decode_batches * (speed.decode_fixed_s + num_layers * speed.decode_layer_s)
    prefill = work.prefill_tokens * (speed.prefill_fixed_s + num_layers * speed.prefill_layer_s)
    return decode + prefill


def max_layers(speed: StageSpeed, layer_bytes: list[int]) -> int:
    """The most layers (weights plus the KV cache each must keep) the stage's memory could hold: the smallest ones."""
    if speed.memory_bytes is None:
        return len(layer_bytes)
    room, count = speed.memory_bytes - speed.fixed_bytes, 0
    for b in sorted(layer_bytes):
        if b > room:
            break
        room, count = room - b, count + 1
    return count


class _Memory:
    """Whether a stage holds layers [start, end): their bytes (prefix sums over the layers) plus its fixed weights."""

    def __init__(self, speeds: list[StageSpeed], layer_bytes: list[int]) -> None:
        self.speeds = speeds
        self.prefix = [0]
        for b in layer_bytes:
            self.prefix.append(self.prefix[-1] + b)

    def fits(self, stage: int, start: int, end: int) -> bool:
        sp = self.speeds[stage]
        return sp.memory_bytes is None or self.prefix[end] - self.prefix[start] + sp.fixed_bytes <= sp.memory_bytes


def plan_split(
    num_layers: int,
    speeds: list[StageSpeed],
    work: Workload,
    layer_bytes: int | list[int],
    current: list[int] | None = None,
) -> Plan:
    """Contiguous layer counts that minimise the slowest stage's time for `work`, never exceeding a stage's memory.

    layer_bytes: each layer's weights plus the KV cache it must keep (one number: every layer alike). Among the splits
    whose slowest stage is that fast, the one that moves the fewest layers from `current` (when given) wins, then the
    most even. Raises PartitionError with the numbers when a stage cannot hold one layer or no split fits the memory.
    """
    num_stages = len(speeds)
    if current is not None and (
        len(current) != num_stages or sum(current) != num_layers or min(current, default=0) < 1
    ):
        raise PartitionError(f"the current split {current} does not give {num_layers} layers to {num_stages} stages")
    per_layer = [layer_bytes] * num_layers if isinstance(layer_bytes, int) else list(layer_bytes)
    if len(per_layer) != num_layers:
        raise PartitionError(f"{len(per_layer)} layers' sizes for a model of {num_layers} layers")
    caps = [max_layers(s, per_layer) for s in speeds]
    for i, (cap, s) in enumerate(zip(caps, speeds, strict=True)):
        if cap < 1:
            raise PartitionError(
                f"stage {i} cannot hold a single layer: of its {s.memory_bytes} bytes, {s.fixed_bytes} hold fixed weights, "
                f"and one layer needs {min(per_layer)} (weights and its KV cache)"
            )
    if sum(caps) < num_layers:
        raise PartitionError(
            f"the stages hold at most {caps} layers ({sum(caps)} in all), but the model has {num_layers}"
        )
    memory = _Memory(speeds, per_layer)
    # Pass 1: the lowest possible slowest-stage time. Pass 2: among splits within it, the fewest moves, then the most even.
    fastest = _fastest(num_layers, speeds, work, memory)
    if fastest == float("inf"):
        raise PartitionError(
            f"no contiguous split of the {num_layers} layers (bytes each: {per_layer}) fits the stages' memory "
            f"({[s.memory_bytes for s in speeds]} bytes, {[s.fixed_bytes for s in speeds]} of them fixed weights)"
        )
    limit = fastest * (1 + TIE)
    boundaries = None if current is None else [sum(current[: i + 1]) for i in range(num_stages)]
    counts = _counts(num_layers, speeds, work, memory, limit, boundaries)
    current = counts if current is None else current
    return Plan(
        counts,
        [stage_seconds(sp, c, work) for sp, c in zip(speeds, counts, strict=True)],
        list(current),
        [stage_seconds(sp, c, work) for sp, c in zip(speeds, current, strict=True)],
    )


def _fastest(num_layers: int, speeds: list[StageSpeed], work: Workload, memory: _Memory) -> float:
    """The lowest slowest-stage time over every split that fits (a min-max over prefixes)."""
    num_stages, inf = len(speeds), float("inf")
    best = [0.0] + [inf] * num_layers  # best[n]: the first n layers over the stages so far
    for s in range(num_stages):
        nxt = [inf] * (num_layers + 1)
        for n in range(s + 1, num_layers - (num_stages - s - 1) + 1):
            # stage s holds layers [n - count, n); more layers never take less memory
            for count in range(1, n + 1):
                if not memory.fits(s, n - count, n):
                    break
                if best[n - count] < inf:
                    nxt[n] = min(nxt[n], max(best[n - count], stage_seconds(speeds[s], count, work)))
        best = nxt
    return best[num_layers]


def _counts(
    num_layers: int,
    speeds: list[StageSpeed],
    work: Workload,
    memory: _Memory,
    limit: float,
    boundaries: list[int] | None,
) -> list[int]:
    """Among the splits with every stage within `limit`: the fewest layers moved from `boundaries` (if any), then the least sum of squared times."""
    num_stages, inf = len(speeds), (float("inf"), float("inf"))
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    choice = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0, 0.0)
    for s in range(1, num_stages + 1):
        for n in range(s, num_layers - (num_stages - s) + 1):
            moved = 0 if boundaries is None else abs(n - boundaries[s - 1])
            for count in range(1, n - (s - 1) + 1):
                if not memory.fits(s - 1, n - count, n):
                    break
                prev, t = best[s - 1][n - count], stage_seconds(speeds[s - 1], count, work)
                if prev == inf or t > limit:
                    continue
                cand = (prev[0] + moved, prev[1] + t * t)
                if cand < best[s][n]:
                    best[s][n], choice[s][n] = cand, count
    counts, n = [], num_layers
    for s in range(num_stages, 0, -1):
        counts.append(choice[s][n])
        n -= choice[s][n]
    return counts[::-1]


class StageRates:
    """What the stages' timing records say of their speed, over the last `window` microbatches that measured it.

    A microbatch is decode work when every chunk is one token, else prefill work, counted by its tokens.
    Each record gives a stage's time in its decoder layers; the rest of its compute is its fixed work.
    """

    def __init__(self, window: int = 512) -> None:
        self._records: deque[tuple[bool, int, list[tuple[int, float, float]]]] = deque(maxlen=window)
        self._added = 0  # records ever added
        self._proposal: tuple[tuple, dict | None] = ((), None)  # (when and for what split it was planned, the proposal)

    def __len__(self) -> int:
        return len(self._records)

    def add(self, batch: MicroBatch, timings: list, layer_counts: list[int]) -> None:
        """timings: one pb.StageTiming per stage (any order); a record without layers_ns (a compiled step) is skipped."""
        by_stage = {t.stage_index: t for t in timings}
        if len(by_stage) != len(layer_counts) or any(t.layers_ns <= 0 for t in by_stage.values()):
            return
        is_decode = batch.is_decode_only
        per_stage = [
            (
                n,
                by_stage[i].layers_ns / 1e9,
                max(0, by_stage[i].compute_end_ns - by_stage[i].compute_start_ns - by_stage[i].layers_ns) / 1e9,
            )
            for i, n in enumerate(layer_counts)
        ]
        self._records.append((is_decode, 1 if is_decode else batch.num_tokens, per_stage))
        self._added += 1

    def workload(self) -> Workload:
        return Workload(
            decode_batches=sum(units for d, units, _ in self._records if d),
            prefill_tokens=sum(units for d, units, _ in self._records if not d),
        )

    def speeds(self) -> list[StageSpeed]:
        """Each stage's mean seconds per layer and fixed seconds, per decode microbatch and per prefill token."""
        if not self._records:
            return []
        out = []
        for i in range(len(self._records[0][2])):
            # per kind of work (decode or not): layer seconds, layer units, fixed seconds, units
            sums = {True: [0.0] * 4, False: [0.0] * 4}
            for is_decode, units, per_stage in self._records:
                layers, layer_s, fixed_s = per_stage[i]
                for j, v in enumerate((layer_s, layers * units, fixed_s, units)):
                    sums[is_decode][j] += v
            d, p = sums[True], sums[False]
            out.append(
                StageSpeed(
                    decode_layer_s=d[0] / d[1] if d[1] else 0.0,
                    prefill_layer_s=p[0] / p[1] if p[1] else 0.0,
                    decode_fixed_s=d[2] / d[3] if d[3] else 0.0,
                    prefill_fixed_s=p[2] / p[3] if p[3] else 0.0,
                )
            )
        return out

    def propose(self, current: list[int], memory: StageMemory | None = None, min_records: int = 32) -> Plan | None:
        """The planner's split for the window's work within each stage's memory, or None before min_records microbatches."""
        if len(self._records) < min_records or len(self._records[-1][2]) != len(current):
            return None
        speeds = self.speeds()
        if memory is not None:
            for speed, budget, fixed in zip(speeds, memory.budgets, memory.fixed_bytes, strict=False):
                speed.memory_bytes, speed.fixed_bytes = budget, fixed
        return plan_split(sum(current), speeds, self.workload(), memory.layer_bytes if memory else 1, current)

    def proposal(self, current: list[int], memory: StageMemory | None = None, every: int = 64) -> dict | None:
        """The proposal as /v1/stats shows it (its `rebalance` object), or None before enough records.

        Planned again only after `every` new records or for another split: planning 64 layers takes milliseconds,
        and the engine's stats hold its lock.
        """
        key = (self._added // every if len(self) >= 32 else -1, tuple(current))
        if key != self._proposal[0]:
            seen = {"layers": current, "window_microbatches": len(self)}
            try:
                plan = self.propose(current, memory)
            except PartitionError as e:  # the stages' memory holds no split (reported, not raised: serving goes on)
                shown = seen | {"proposed": current, "predicted_gain": 0.0, "layers_moved": 0, "refused": str(e)}
            else:
                shown = None if plan is None else seen | plan.summary()
            self._proposal = (key, shown)
        return self._proposal[1]


@dataclass(slots=True)
class StageMemory:
    """What the planner needs of the stages' memory: each one's budget (None: unbounded) and fixed weights, and the bytes
    each layer takes on any stage (its weights plus its share of a KV cache of the pipeline's block count)."""

    budgets: list[int | None]
    fixed_bytes: list[int]
    layer_bytes: list[int]  # per layer of the whole model, layer 0 first

    @classmethod
    def of(cls, stages: list, num_blocks: int) -> StageMemory | None:
        """From the stages' Info (StageSummary, in pipeline order: each reports its own layers' weight bytes); None when
        they did not report their sizes (the in-process backend)."""
        if not stages or any(
            len(s.layer_weight_bytes) != s.layers[1] - s.layers[0] or s.memory_total_bytes <= 0 for s in stages
        ):
            return None
        return cls(
            [s.memory_total_bytes for s in stages],
            [max(0, s.weight_bytes - sum(s.layer_weight_bytes)) for s in stages],
            [b + num_blocks * s.kv_block_layer_bytes for s in stages for b in s.layer_weight_bytes],
        )
