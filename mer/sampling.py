"""Choosing the next token from logits: penalties, temperature, top-k, top-p, min-p, seeded draws.

Ties are always broken towards the lower token id, so greedy decoding and the kept sets of
top-k/top-p are well defined, and a given seed and logits sequence always yield the same tokens.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mer.errors import ParamError

MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs

# top-p first looks among the most likely few ids; a full sort of a 150k vocab costs ~20 ms.
_TOP_P_PROBES = (1024, 16384)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. The defaults sample from the model's plain distribution."""

    temperature: float = 1.0  # 0 => greedy (argmax; ties -> lowest id)
    top_k: int = 0  # 0 => off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI: logit -= presence * (count > 0)
    frequency_penalty: float = 0.0  # OpenAI: logit -= frequency * count
    repetition_penalty: float = 1.0  # CTRL/transformers: logit > 0 ? logit / p : logit * p
    seed: int | None = None
    # OpenAI's logit_bias: (token id, bias in [-100, 100]) pairs added to the logits
    logit_bias: tuple[tuple[int, float], ...] = ()
    # how many most likely alternatives to report beside each sampled token's log-probability
    # (0: only the sampled token's); None: no log-probabilities
    logprobs: int | None = None

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ParamError(name, f"must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ParamError(name, f"must be finite, got {value!r}")
            return float(value)

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ParamError(name, f"must be an integer, got {value!r}")
            return int(value)

        if number("temperature") < 0:
            raise ParamError("temperature", f"must be >= 0, got {self.temperature!r}")
        if integer("top_k") < 0:
            raise ParamError("top_k", f"must be >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 < number("top_p") <= 1.0:
            raise ParamError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= number("min_p") <= 1.0:
            raise ParamError("min_p", f"must be in [0, 1], got {self.min_p!r}")
        number("presence_penalty")
        number("frequency_penalty")
        if number("repetition_penalty") <= 0:
            raise ParamError("repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and integer("seed") < 0:
            raise ParamError("seed", f"must be a non-negative integer or None, got {self.seed!r}")
        if self.logprobs is not None and not 0 <= integer("logprobs") <= MAX_LOGPROBS:
            raise ParamError("logprobs", f"must be between 0 and {MAX_LOGPROBS}")
        pairs = []
        for pair in self.logit_bias:
            ok = isinstance(pair, list | tuple) and len(pair) == 2
            token, bias = pair if ok else (None, None)
            if not ok or isinstance(token, bool) or not isinstance(token, numbers.Integral):
                raise ParamError("logit_bias", "must map token ids to numbers")
            if token < 0:
                raise ParamError("logit_bias", f"names a negative token id {token}")
            if isinstance(bias, bool) or not isinstance(bias, numbers.Real):
                raise ParamError("logit_bias", f"of token {token} must be a number")
            if not -100 <= bias <= 100:
                raise ParamError("logit_bias", f"of token {token} must be in [-100, 100]")
            pairs.append((int(token), float(bias)))
        object.__setattr__(self, "logit_bias", tuple(pairs))


def apply_penalties(
    logits: np.ndarray, history: Sequence[int], params: SamplingParams
) -> np.ndarray:
    """A float64 copy of `logits` with the logit bias, then the repetition, then the
    frequency/presence penalties applied.

    `history` is every id the model has seen (prompt + generated); each distinct id is penalised
    once by the repetition penalty, and by its count for the frequency penalty.
    """
    out = np.array(logits, dtype=np.float64)  # always a copy: the caller's array is untouched
    if out.ndim != 1:
        raise ValueError(f"logits must be one-dimensional, got shape {out.shape}")
    for token, bias in params.logit_bias:
        if token >= out.shape[0]:
            raise ParamError("logit_bias", f"names token {token}, outside the vocabulary")
        out[token] += bias
    rep, freq, pres = params.repetition_penalty, params.frequency_penalty, params.presence_penalty
    if len(history) == 0 or (rep == 1.0 and freq == 0.0 and pres == 0.0):
        return out
    ids = np.asarray(history, dtype=np.int64)
    if ids.min() < 0 or ids.max() >= out.shape[0]:
        raise ValueError(f"history holds token ids outside the vocabulary of {out.shape[0]}")
    counts = np.bincount(ids, minlength=out.shape[0])
    seen = np.flatnonzero(counts)
    if rep != 1.0:
        values = out[seen]
        out[seen] = np.where(values < 0, values * rep, values / rep)
    if freq != 0.0 or pres != 0.0:
        out[seen] -= freq * counts[seen] + pres
    return out


def _top_ids(probs: np.ndarray, m: int) -> np.ndarray:
    """Positions of the `m` largest `probs`, largest first, ties by lower position."""
    n = probs.shape[0]
    if m >= n:
        candidates = np.arange(n)
    else:
        kth = np.partition(probs, n - m)[n - m]
        candidates = np.flatnonzero(probs >= kth)  # includes every tie at the boundary
    # A stable sort of ascending positions keeps ties in id order.
    order = np.argsort(-probs[candidates], kind="stable")
    return candidates[order[:m]]


def _support(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The ids that may be drawn and their renormalised probabilities."""
    if params.temperature <= 0:
        raise ValueError("sampling needs temperature > 0; temperature 0 is greedy")
    scaled = np.asarray(logits, dtype=np.float64) / params.temperature
    top = np.max(scaled)
    if not np.isfinite(top):
        raise ValueError("logits must contain a finite maximum (no NaN, not all -inf)")
    probs = np.exp(scaled - top)
    probs /= probs.sum()
    ids = np.arange(probs.shape[0])
    if 0 < params.top_k < ids.shape[0]:
        ids = _top_ids(probs, params.top_k)  # sorted, which top-p can reuse
        probs = probs[ids] / probs[ids].sum()
        if params.top_p < 1.0:
            probs, ids = _top_p(probs, ids, params.top_p, np.arange(ids.shape[0]))
    elif params.top_p < 1.0:
        # The kept set is a prefix of the ids sorted by probability: try the top few first.
        for size in (*_TOP_P_PROBES, ids.shape[0]):
            order = _top_ids(probs, min(size, ids.shape[0]))
            if order.shape[0] == ids.shape[0] or probs[order].sum() >= params.top_p:
                break
        probs, ids = _top_p(probs, ids, params.top_p, order)
    if params.min_p > 0.0:
        keep = probs >= params.min_p * probs.max()
        ids, probs = ids[keep], probs[keep] / probs[keep].sum()
    return ids, probs


def _top_p(
    probs: np.ndarray, ids: np.ndarray, top_p: float, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the shortest prefix of `order` (positions, most likely first) with mass >= top_p."""
    cumulative = np.cumsum(probs[order])
    keep = min(int(np.searchsorted(cumulative, top_p, side="left")) + 1, order.shape[0])
    kept = order[:keep]
    return probs[kept] / cumulative[keep - 1], ids[kept]


def sampling_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution sampled from: softmax(logits / T), cut by top-k, top-p, min-p, renormalised.

    `logits` should already carry the penalties. Needs temperature > 0.
    """
    ids, probs = _support(logits, params)
    out = np.zeros(np.asarray(logits).shape[0])
    out[ids] = probs
    return out


def log_probs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of `token` (log-softmax of the raw `logits`, before any
    penalty, bias or truncation, as OpenAI reports them) and the `top` most likely ids with
    theirs (most likely first, ties by lower id)."""
    x = np.asarray(logits, dtype=np.float64)
    peak = np.max(x)
    lse = peak + np.log(np.sum(np.exp(x - peak)))
    alternatives = []
    if top > 0:
        probs = np.exp(x - lse)
        alternatives = [(int(i), float(x[i] - lse)) for i in _top_ids(probs, top)]
    return float(x[token] - lse), alternatives


class Sampler:
    """Picks tokens for one sequence; owns its own seeded random generator."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def skip(self, n: int) -> None:
        """Advance as `n` samples would have (one draw each when sampling, none when greedy):
        resuming a sequence from its first n tokens then draws what it would have drawn."""
        if self.params.temperature > 0 and n > 0:
            self._rng.random(n)

    def sample(self, logits: np.ndarray, history: Sequence[int]) -> int:
        """The next token id for `logits` (float32 [vocab]) given every id seen so far."""
        penalised = apply_penalties(logits, history, self.params)
        if np.isnan(penalised).any():
            raise ValueError("logits contain NaN")
        if self.params.temperature == 0:
            return int(np.argmax(penalised))  # argmax returns the first, i.e. lowest, max id
        ids, probs = _support(penalised, self.params)
        cumulative = np.cumsum(probs)
        # Scale by the total so rounding can never push the draw past the last kept id.
        index = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
        index = min(index, probs.shape[0] - 1)
        # A draw landing exactly on a boundary must not pick a zero-probability id.
        while probs[index] == 0.0:
            index -= 1
        return int(ids[index])
