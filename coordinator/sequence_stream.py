"""One sequence's stream to its client: detokenising, stop strings (never emitted), time to first token and between tokens."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from stagecoach.coordinator.server_metrics import Metrics
from stagecoach.coordinator.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class Choice:
    """What one choice of a response holds so far."""

    index: int
    seq_id: int = -1
    pieces: list[str] = field(default_factory=list)  # the text emitted so far, delta by delta (joined once, at the end)
    finish_reason: str | None = None
    num_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    cached_tokens: int = 0  # of its prompt, found in the prefix cache

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class SequenceStream:
    """Turns one sequence's TokenUpdates into text deltas; abort(seq_id) is called when a stop string ends it."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        metrics: Metrics,
        choice: Choice,
        stop: list[str],
        updates: asyncio.Queue,
        started: float,
        abort,
    ) -> None:
        self.metrics, self.choice, self.stop, self.updates, self.abort = metrics, choice, stop, updates, abort
        self.detok = IncrementalDetokenizer(tokenizer)
        # Decoded text not emitted yet: the last `hold` characters, where a stop string may still be forming, and
        # whatever this update added. Only this short tail is searched and cut, so a token costs the same at any length.
        self.pending = ""
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.started = started
        self.last_token_at: float | None = None

    def _find_stop(self, start: int) -> int:
        hits = [i for s in self.stop if (i := self.pending.find(s, start)) >= 0]
        return min(hits) if hits else -1

    def _observe(self, num_tokens: int) -> None:
        now, m = time.monotonic(), self.metrics
        if self.last_token_at is None:
            m.ttft.observe(now - self.started)
            m.ttft_window.append((now - self.started) * 1e3)
        else:
            gap = (now - self.last_token_at) / num_tokens
            for _ in range(num_tokens):
                m.itl.observe(gap)
                m.itl_window.append(gap * 1e3)
        self.last_token_at = now
        m.output_tokens.add(num_tokens, now)

    def _take(self, update) -> bool:
        """Appends the update's tokens; True when a stop string ended the text."""
        for i, token in enumerate(update.token_ids):
            search_from = max(0, len(self.pending) - self.hold)
            self.pending += self.detok.add(token)
            self.choice.token_ids.append(token)
            self.choice.logprobs.append(update.logprobs[i])
            self.choice.top_logprobs.append(update.top_logprobs[i])
            self.choice.num_tokens += 1
            if self.stop and (at := self._find_stop(search_from)) >= 0:
                self.pending = self.pending[:at]
                return True
        return False

    async def next_delta(self) -> tuple[str, int] | None:
        """(text delta, number of new tokens), or None when the sequence has finished and all is out.

        Raises the update's error (a StagecoachError) when the request cannot finish.
        """
        if self.choice.finish_reason is not None:
            return None
        update = await self.updates.get()
        if update.error is not None:
            raise update.error
        self.choice.cached_tokens = update.cached_tokens
        if update.token_ids:
            self._observe(len(update.token_ids))
        before = self.choice.num_tokens
        stopped = self._take(update)
        new_tokens = self.choice.num_tokens - before
        self.metrics.generation_tokens.inc(new_tokens)
        if stopped:
            self.abort(self.choice.seq_id)
            self.choice.finish_reason = "stop"
        elif update.finished:
            self.pending += self.detok.flush()
            if self.stop and (at := self._find_stop(max(0, len(self.pending) - self.hold - 8))) >= 0:
                self.pending = self.pending[:at]
            self.choice.finish_reason = "length" if update.finish_reason == "length" else "stop"
        end = len(self.pending) if self.choice.finish_reason else max(0, len(self.pending) - self.hold)
        delta, self.pending = self.pending[:end], self.pending[end:]
        if delta:
            self.choice.pieces.append(delta)
        return delta, new_tokens
