"""The board: the shared memory through which the engine hands products to compute workers.

A round is one or more products the engine needs at the same time (q, k and v; an expert's
gate and up; ...). The engine writes each job's input activations into the board's data
area and its description into the job table, bumps the round number, and wakes every worker
(an eventfd each). Each product is split into `stripes` stripes of output rows, starting on
multiples of 4 rows as the kernels' own thread split does; worker w of W computes the
stripes s with s % W == w, writes its rows of the output, and marks stripe s done with the
round number; then it signals the engine (one shared eventfd). Rows are computed whole by
whoever computes them, so the result is bit-identical for any number of workers or stripes,
and a stripe a dead worker left undone is computed by the engine itself.

Layout (int64 words, then the data area):

    header   [magic, round, n_jobs, worker mask, data_bytes, _, _, _]
    slots    MAX_WORKERS x [pid, ready, ns]   each worker's registration, and the time (ns)
                                              its stripes of the last round took
    jobs     MAX_JOBS x JOB_WORDS             see `Job`
    flags    MAX_JOBS x MAX_STRIPES           the round that finished each stripe
    data     float32 activations, bump-allocated per round
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mer.errors import MerError
from mer.io import shm

MAGIC = 0x4D4552424F415244  # "MERBOARD"
MAX_WORKERS = 64
MAX_JOBS = 256
MAX_STRIPES = 64
JOB_WORDS = 12
_HEADER = 8
_SLOTS = _HEADER
_SLOT_WORDS = 3
_JOBS = _SLOTS + _SLOT_WORDS * MAX_WORKERS
_FLAGS = _JOBS + JOB_WORDS * MAX_JOBS
_DATA = (_FLAGS + MAX_JOBS * MAX_STRIPES) * 8
DATA_ALIGN = 64

# job kinds
PRODUCT = 0  # out[n, rows] = x[n, cols] @ W.T, W a dense weight (by index)
EXPERT_UP = 1  # h[n, I] = silu(x @ gate.T) * (x @ up.T), rows of I striped
EXPERT_DOWN = 2  # out[n, D] = h @ down.T, rows of D striped


@dataclass(frozen=True)
class Job:
    """One product of a round. `weight`: the dense weight's index in the weight table, or
    for experts the expert's layer; `expert` and `slot` (-1: resident) name the expert."""

    kind: int
    weight: int
    expert: int
    slot: int
    n: int  # tokens
    rows: int
    cols: int
    x_at: int  # byte offsets into the data area
    out_at: int
    stripes: int
    h_at: int = 0  # EXPERT_DOWN reads h here; EXPERT_UP writes it

    def words(self) -> list[int]:
        return [
            self.kind,
            self.weight,
            self.expert,
            self.slot,
            self.n,
            self.rows,
            self.cols,
            self.x_at,
            self.out_at,
            self.stripes,
            self.h_at,
            0,
        ]

    @classmethod
    def from_words(cls, w: np.ndarray) -> Job:
        return cls(*(int(v) for v in w[:11]))


def stripe_rows(rows: int, stripes: int, s: int) -> tuple[int, int]:
    """Rows of stripe s of `stripes`, starting on multiples of 4 (as `chunk_bounds`)."""
    quads = (rows + 3) // 4
    a, b = 4 * (quads * s // stripes), 4 * (quads * (s + 1) // stripes)
    return min(a, rows), min(b, rows)


class Board:
    """The shared segment (module docstring); `create` in the engine, `attach` in workers."""

    def __init__(self, segment, owner: bool) -> None:
        self._shm = segment
        self.owner = owner
        self.words = np.ndarray((_DATA // 8,), np.int64, buffer=segment.buf)
        self.data = np.ndarray((segment.size - _DATA,), np.uint8, buffer=segment.buf, offset=_DATA)
        self.name = segment.name

    @classmethod
    def create(cls, data_bytes: int, owner: shm.Owner | None = None) -> Board:
        size = _DATA + data_bytes
        try:
            segment = shm.create(shm.segment_name("board", owner), size)
        except OSError as err:
            raise MerError(
                f"cannot create the compute board ({size} bytes): {err.strerror}"
            ) from err
        board = cls(segment, owner=True)
        board.words[:] = 0
        board.words[0], board.words[4] = MAGIC, data_bytes
        return board

    @classmethod
    def attach(cls, name: str) -> Board:
        board = cls(shm.attach(name), owner=False)
        if int(board.words[0]) != MAGIC:
            board.close()
            raise MerError(f"shared memory {name!r} is not a compute board")
        return board

    # -- the header and the workers' slots ------------------------------------------------------
    @property
    def round(self) -> int:
        return int(self.words[1])

    def slot(self, i: int) -> tuple[int, bool]:
        at = _SLOTS + _SLOT_WORDS * i
        return int(self.words[at]), bool(self.words[at + 1])

    def register(self, i: int, pid: int, ready: bool) -> None:
        at = _SLOTS + _SLOT_WORDS * i
        self.words[at], self.words[at + 1] = pid, int(ready)

    def busy_ns(self, i: int) -> int:
        """How long worker i's stripes of its last round took."""
        return int(self.words[_SLOTS + _SLOT_WORDS * i + 2])

    def set_busy_ns(self, i: int, ns: int) -> None:
        self.words[_SLOTS + _SLOT_WORDS * i + 2] = ns

    # -- rounds -----------------------------------------------------------------------------
    def post(self, jobs: list[Job], workers: int) -> int:
        """Write a round's jobs (inputs already in the data area) for the workers of mask
        `workers` (bit i: slot i); its round number."""
        if len(jobs) > MAX_JOBS or any(j.stripes > MAX_STRIPES for j in jobs):
            raise ValueError("too many jobs or stripes for the board")
        for i, job in enumerate(jobs):
            self.words[_JOBS + JOB_WORDS * i : _JOBS + JOB_WORDS * (i + 1)] = job.words()
        self.words[2], self.words[3] = len(jobs), workers
        self.words[1] += 1  # last: a worker reads the round, then the jobs
        return int(self.words[1])

    def jobs(self) -> tuple[int, int, list[Job]]:
        """(round, worker mask, jobs) as posted."""
        n = int(self.words[2])
        table = self.words[_JOBS : _JOBS + JOB_WORDS * n].reshape(n, JOB_WORDS)
        return int(self.words[1]), int(self.words[3]), [Job.from_words(w) for w in table]

    def flags(self, job: int) -> np.ndarray:
        return self.words[_FLAGS + MAX_STRIPES * job : _FLAGS + MAX_STRIPES * (job + 1)]

    def floats(self, at: int, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array of the data area at byte offset `at` (no copy)."""
        count = int(np.prod(shape))
        return (
            np.ndarray(shape, np.float32, buffer=self.data, offset=at)
            if count
            else (np.zeros(shape, np.float32))
        )

    def close(self) -> None:
        del self.words, self.data
        self._shm.close()
        if self.owner:
            shm.unlink(self.name)


class Allocator:
    """Bump allocation of the data area for one round."""

    def __init__(self, board: Board) -> None:
        self.board = board
        self.at = 0

    def put(self, array: np.ndarray | None, shape: tuple[int, ...]) -> int:
        size = int(np.prod(shape)) * 4
        at = self.at
        end = -(-(at + size) // DATA_ALIGN) * DATA_ALIGN
        if end > self.board.data.shape[0]:
            raise MerError(
                "the compute board is too small for this batch (raise compute's "
                "board size or lower engine.max_batch_tokens)"
            )
        self.at = end
        if array is not None:
            self.board.floats(at, shape)[...] = array
        return at
