"""One generation as the engine sees it: its tokens, how far they have been fed through the
model, how it samples, and why it ended."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from mer.models.transformer import KVCache
from mer.sampling import Sampler, SamplingParams
from mer.tokenizer import StreamDecoder, Tokenizer


class Status(Enum):
    WAITING = "waiting"  # not admitted yet: no KV cache
    RUNNING = "running"  # admitted: prefilling or decoding
    FINISHED = "finished"


# Why a sequence ended: a stop id or stop string, max_tokens, a full context, or its caller.
FINISH_REASONS = ("stop", "length", "context", "abort")


@dataclass(eq=False)
class Sequence:
    """A prompt and what has been generated after it.

    `n_fed` counts the tokens whose keys and values are in `cache`: the prompt is fed in
    chunks (prefill), then each generated token in the step after it was sampled. When every
    token has been fed, the last step's logits sample the next one. A sequence admitted with a
    cached prefix starts with `n_fed` at its length, the engine copying those keys and values
    into `cache` when it makes it; `cached_tokens` counts the prompt tokens among them."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    tokenizer: Tokenizer | None = None  # needed for stop strings and text
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # the generated text so far (stop strings cut off)
    cache: KVCache | None = None
    n_fed: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    shown: int = 0  # characters of `text` handed out so far
    logits: list = field(default_factory=list)  # what it sampled from, when the engine keeps it
    matcher: Any = None  # a mer.structured Matcher when the output follows a grammar

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.sampler = Sampler(self.params)
        self._decoder = StreamDecoder(self.tokenizer) if self.tokenizer is not None else None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def pending(self) -> int:
        """Tokens still to be fed: the rest of the prompt, or the one just sampled."""
        return len(self.prompt_ids) + len(self.output_ids) - self.n_fed

    @property
    def prefilling(self) -> bool:
        return self.n_fed < len(self.prompt_ids)

    def resume(self, ids: list[int]) -> None:
        """Take `ids` as already generated and shown (before a restart)."""
        for token in ids:
            self.output_ids.append(token)
            if self._decoder is not None:
                self.text += self._decoder.push(token)
        held = max((_overlap(self.text, stop) for stop in self.stop_strings), default=0)
        self.shown = len(self.text) - held  # as add_token left it
        self.sampler.skip(len(ids))

    def add_token(self, token: int) -> str:
        """Append a generated token; return the text now safe to show: up to a stop string
        (which ends the sequence and is not shown), holding back an ending that may be the
        start of one."""
        self.output_ids.append(token)
        if self._decoder is None:
            return ""
        before = len(self.text)
        self.text += self._decoder.push(token)
        for stop in self.stop_strings:
            # a stop string may have begun in earlier pieces: search from that far back
            at = self.text.find(stop, max(0, before - len(stop) + 1))
            if at >= 0:
                self.text = self.text[:at]
                self.finish_reason = "stop"
                return self._emit(len(self.text))
        held = max((_overlap(self.text, stop) for stop in self.stop_strings), default=0)
        return self._emit(len(self.text) - held)

    def flush_text(self) -> str:
        """Whatever is still held back, once the sequence has ended."""
        if self._decoder is not None and self.finish_reason != "stop":
            self.text += self._decoder.flush()
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        start, self.shown = self.shown, max(self.shown, end)
        return self.text[start:end] if end > start else ""


def _overlap(text: str, stop: str) -> int:
    """The length of the longest ending of `text` that begins `stop` (short of all of it)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
