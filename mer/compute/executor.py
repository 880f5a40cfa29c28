"""Where the transformer's products run: in this process, or striped over compute workers.

`LocalExecutor` runs every product here (numba threads). `BoardExecutor` runs products
smaller than `min_work` multiply-adds here, where a round trip would cost more than the work,
and larger ones where they measure faster: posted to the board (`mer.compute.board`) for the
compute workers, or here (a `ThreadPolicy` over the two places, per kind of work, probing the
other place now and then; `measured=False` always posts them). Both places give
bit-identical results: a product's rows are computed whole by the same kernels whoever
computes them (`compute_stripe`).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time

import numpy as np

from mer.compute.board import (
    EXPERT_DOWN,
    EXPERT_UP,
    MAX_WORKERS,
    PRODUCT,
    Allocator,
    Board,
    Job,
    stripe_rows,
)
from mer.compute.weights import WeightTable
from mer.kernels import grouped
from mer.kernels.matmul import PackedWeight, matmul, run_kernel
from mer.kernels.swiglu import activate, add_down_bias, run_expert
from mer.models.weights import ExpertWeights

HERE, BOARD = 1, 2  # where large work runs: the engine's own threads, or the compute workers


class LocalExecutor:
    """Every product in this process."""

    def products(self, pairs: list[tuple[PackedWeight, np.ndarray]]) -> list[np.ndarray]:
        if grouped.fusable(pairs):  # one integer kind and width: one call
            return grouped.run_products(pairs)
        return [matmul(w, x) for w, x in pairs]

    def expert(self, expert: ExpertWeights, x: np.ndarray, ref: tuple[int, int, int]) -> np.ndarray:
        return run_expert(expert, x)

    def experts(self, experts: list[ExpertWeights], x, starts, ends, refs) -> np.ndarray:
        """The outputs [R, D] of experts[i] for their tokens, rows starts[i]..ends[i] of x
        [R, D]: in one call where the kinds allow (mer.kernels.grouped), bit-identical to
        one by one."""
        if grouped.applies(experts):
            return grouped.run_grouped(experts, x, starts, ends)
        return _one_by_one(self, experts, x, starts, ends, refs)


def _one_by_one(executor, experts, x, starts, ends, refs) -> np.ndarray:
    y = np.empty_like(x)
    for e, a, b, ref in zip(experts, starts, ends, refs, strict=True):
        y[a:b] = executor.expert(e, x[a:b], ref)
    return y


def compute_stripe(board: Board, table: WeightTable, job: Job, s: int) -> None:
    """Stripe s of `job`: its rows of the output, written into the board."""
    a, b = stripe_rows(job.rows, job.stripes, s)
    if b <= a:
        return
    if job.kind == PRODUCT:
        w = table.dense[job.weight]
        x = board.floats(job.x_at, (job.n, job.cols))
        run_kernel(w, x, board.floats(job.out_at, (job.n, job.rows)), a, b, 0, w.cols, 0, 0)
        return
    expert = table.expert(job.weight, job.expert, job.slot)
    if job.kind == EXPERT_UP:  # rows a..b of the intermediate: silu(gate) * up
        x = board.floats(job.x_at, (job.n, job.cols))
        g = np.empty((job.n, b - a), np.float32)
        u = np.empty((job.n, b - a), np.float32)
        run_kernel(expert.gate, x, g, a, b, 0, expert.gate.cols, 0, a)
        run_kernel(expert.up, x, u, a, b, 0, expert.up.cols, 0, a)
        activate(expert, g, u, a)
        board.floats(job.h_at, (job.n, job.rows))[:, a:b] = g
    elif job.kind == EXPERT_DOWN:
        h = board.floats(job.h_at, (job.n, job.cols))
        out = board.floats(job.out_at, (job.n, job.rows))
        run_kernel(expert.down, h, out, a, b, 0, expert.down.cols, 0, 0)
        add_down_bias(expert, out[:, a:b], a)


class BoardExecutor:
    """Products striped over the compute workers registered on `board` (module docstring)."""

    def __init__(
        self,
        board: Board,
        table: WeightTable,
        go_fds: list[int],
        done_fd: int,
        stripes: int = 8,
        min_work: int = 1 << 22,
        timeout_s: float = 5.0,
        log=None,
        beat=lambda: None,
        *,
        measured: bool = True,
    ) -> None:
        from mer.kernels.threads import ThreadPolicy

        self.board, self.table = board, table
        self.go_fds, self.done_fd = go_fds, done_fd
        self.stripes, self.min_work, self.timeout_s = stripes, min_work, timeout_s
        self.local = LocalExecutor()
        self.log = log
        self.beat = beat  # called while waiting for workers: a wait is not a hang
        self.rounds = 0
        self.fallbacks = 0  # stripes the engine computed for a worker that failed
        self.round_s = 0.0  # wall time of rounds, posting to gathering
        self.worker_s = 0.0  # of which the slowest worker computed
        # Where large work runs, measured per kind of work (the shapes, the token count's
        # power of two): a round wakes other processes, and on a small machine (two hardware
        # threads of one core, say) that can cost more than the engine's own threads take.
        self.placement = ThreadPolicy(BOARD, adaptive=measured, candidates=(HERE, BOARD))

    def products(self, pairs: list[tuple[PackedWeight, np.ndarray]]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(pairs)
        big = []
        for i, (w, x) in enumerate(pairs):
            if self.table.index(w) is None or w.rows * w.cols * x.shape[0] < self.min_work:
                out[i] = matmul(w, x)
            else:
                big.append(i)
        if big:
            n = max(pairs[i][1].shape[0] for i in big)
            key = ("products", tuple((pairs[i][0].rows, pairs[i][0].cols) for i in big), n)
            work = sum(pairs[i][0].rows * pairs[i][0].cols * pairs[i][1].shape[0] for i in big)
            with self._placed(key, work) as where:
                if where == HERE:
                    for i in big:
                        out[i] = matmul(*pairs[i])
                else:
                    alloc, jobs = Allocator(self.board), []
                    for i in big:
                        w, x = pairs[i]
                        tokens = x.shape[0]  # each product its own
                        x_at = alloc.put(x, (tokens, w.cols))
                        out_at = alloc.put(None, (tokens, w.rows))
                        index = self.table.index(w)
                        jobs.append(
                            Job(
                                PRODUCT,
                                index,
                                0,
                                0,
                                tokens,
                                w.rows,
                                w.cols,
                                x_at,
                                out_at,
                                self.stripes,
                            )
                        )
                    self._round(jobs)
                    for i, job in zip(big, jobs, strict=True):
                        out[i] = self.board.floats(job.out_at, (job.n, job.rows)).copy()
        return out  # type: ignore[return-value]

    def experts(self, experts: list[ExpertWeights], x, starts, ends, refs) -> np.ndarray:
        """As LocalExecutor.experts, each expert placed on its own."""
        return _one_by_one(self, experts, x, starts, ends, refs)

    def expert(self, expert: ExpertWeights, x: np.ndarray, ref: tuple[int, int, int]) -> np.ndarray:
        layer, e, slot = ref
        n, inter, dim = x.shape[0], expert.gate.rows, expert.gate.cols
        if 3 * inter * dim * n < self.min_work:
            return self.local.expert(expert, x, ref)
        with self._placed(("expert", inter, dim, n), 3 * inter * dim * n) as where:
            if where == HERE:
                return self.local.expert(expert, x, ref)
            alloc = Allocator(self.board)
            x_at = alloc.put(x, (n, dim))
            h_at = alloc.put(None, (n, inter))
            out_at = alloc.put(None, (n, dim))
            up = Job(EXPERT_UP, layer, e, slot, n, inter, dim, x_at, 0, self.stripes, h_at)
            self._round([up])
            down = Job(EXPERT_DOWN, layer, e, slot, n, dim, inter, 0, out_at, self.stripes, h_at)
            self._round([down])
            return self.board.floats(out_at, (n, dim)).copy()

    @contextlib.contextmanager
    def _placed(self, key: tuple, work: int):
        """Where a piece of large work runs (HERE or on the BOARD), timed for the choice."""
        if not self._workers():
            yield HERE
            return
        key = (*key[:-1], int(key[-1]).bit_length())
        where = self.placement.choose(key)
        began = time.perf_counter()
        yield where
        self.placement.record(key, where, work, time.perf_counter() - began)

    # -- a round --------------------------------------------------------------------------------
    def _workers(self) -> list[int]:
        return [i for i in range(min(MAX_WORKERS, len(self.go_fds))) if self.board.slot(i)[1]]

    def _round(self, jobs: list[Job]) -> None:
        workers = self._workers()
        if not workers:
            for job in jobs:
                for s in range(job.stripes):
                    compute_stripe(self.board, self.table, job, s)
            return
        began = time.perf_counter()
        round_no = self.board.post(jobs, _mask(workers))
        self.rounds += 1
        try:
            self._wait(jobs, round_no, workers)
        finally:
            self.round_s += time.perf_counter() - began
            self.worker_s += max(self.board.busy_ns(i) for i in workers) / 1e9

    def _wait(self, jobs: list[Job], round_no: int, workers: list[int]) -> None:
        for i in workers:
            os.write(self.go_fds[i], (1).to_bytes(8, "little"))
        deadline = time.monotonic() + self.timeout_s
        while not self._finished(jobs, round_no):
            left = deadline - time.monotonic()
            if left <= 0:
                self._rescue(jobs, round_no, workers, workers)
                return
            ready, _, _ = select.select([self.done_fd], [], [], min(left, 0.05))
            if ready:
                os.read(self.done_fd, 8)
                continue
            self.beat()
            gone = [i for i in workers if not self._alive(i)]
            if gone:  # exited (retired by a reload, or killed): its stripes are ours now
                self._rescue(jobs, round_no, workers, gone)

    def _alive(self, i: int) -> bool:
        pid, registered = self.board.slot(i)
        return bool(registered) and _running(pid)

    def _finished(self, jobs: list[Job], round_no: int) -> bool:
        return all(
            (self.board.flags(i)[: job.stripes] == round_no).all() for i, job in enumerate(jobs)
        )

    def _rescue(self, jobs: list[Job], round_no: int, workers: list[int], late: list[int]) -> None:
        """Workers `late` missed the round (the deadline passed, or they are gone): stop them
        for good (the supervisor starts new ones), then compute what they left undone here."""
        for rank, i in enumerate(workers):
            if i not in late:
                continue
            missing = [
                (j, s)
                for j, job in enumerate(jobs)
                for s in range(job.stripes)
                if s % len(workers) == rank and self.board.flags(j)[s] != round_no
            ]
            if not missing:
                continue
            pid, _ = self.board.slot(i)
            self.board.register(i, pid, False)
            if pid and _running(pid):  # hung: it must not write into the board later
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self.log:
                self.log.warning(
                    "event=worker_missed_round slot=%d pid=%d stripes=%d", i, pid, len(missing)
                )
            for j, s in missing:
                compute_stripe(self.board, self.table, jobs[j], s)
                self.board.flags(j)[s] = round_no
                self.fallbacks += 1


def _running(pid: int) -> bool:
    """Process `pid` exists and is not a zombie (dead, not reaped yet)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X")


def _mask(workers: list[int]) -> int:
    mask = 0
    for i in workers:
        mask |= 1 << i
    return mask


def my_stripes(mask: int, slot: int, job: Job) -> range:
    """The stripes worker `slot` computes in a round whose workers are `mask`."""
    workers = bin(mask).count("1")
    rank = bin(mask & ((1 << slot) - 1)).count("1")
    return range(rank, job.stripes, workers)
