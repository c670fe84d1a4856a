"""The rows a training worker consumes: a seeded, resumable row stream and a prefetcher.

:class:`RowStream` turns any object with ``iter_rows()`` (a Ray Train dataset shard, or a plain
list wrapper in tests and benchmarks) into an endless stream of rows, epoch after epoch, through
a seeded local shuffle buffer. Its :class:`~geco.train.checkpoint.DataPosition` (epoch + rows
consumed in it) is what a checkpoint records: the same seed and the same row order replay the same
rows, so a resumed run skips exactly the rows consumed before.

:class:`Prefetcher` takes a step's micro-batches from a stream and decodes them (the task's
``prepare``) on a background thread, a few steps ahead; its own position is the one of the last
step *handed out*, which is what a checkpoint must record.

Random choices made while preparing a batch (which views supervise a step, ...) draw from
:func:`batch_generator`: a generator seeded from the stream's seed, the rank and the data position
of the micro-batch being prepared, on whichever thread prepares it. Not the global RNG: the
prefetch thread prepares steps ahead of the checkpoint that records the RNG state, so a resumed
run would draw differently from the uninterrupted one (measured: a reconstructor resumed at step 2
gave another step-3 loss, 0.499 instead of 0.431).

No Ray here: the Ray Train glue (``pipelines/training/worker.py``) feeds
them a dataset shard.
"""
from __future__ import annotations

import hashlib
import queue
import random
import threading
from typing import Iterator

import torch

from geco.train.checkpoint import DataPosition

__all__ = ["Prefetcher", "RowStream", "batch_generator"]

_preparing = threading.local()  # the generator of the micro-batch this thread is preparing


def batch_generator() -> torch.Generator | None:
    """The generator for random choices in a task's ``prepare`` of the micro-batch being prepared by
    a :class:`Prefetcher` (a function of seed, rank and data position: see the module docstring);
    None outside one (evaluation, tests): then the global RNG."""
    return getattr(_preparing, "generator", None)


class RowStream:
    """Rows of one worker's dataset shard, epoch after epoch, through a seeded shuffle buffer.

    ``position`` (a :class:`~geco.train.checkpoint.DataPosition`) counts the rows consumed in the
    current epoch; a stream built from a checkpoint's position skips that many rows of that epoch,
    which (same seed, same order of rows) are exactly the rows consumed before."""

    def __init__(self, shard, position, *, seed: int, rank: int, buffer: int):
        self.shard = shard
        self.position = position
        self.seed, self.rank, self.buffer = seed, rank, max(1, buffer)
        self._it = self._epoch(position.epoch)
        for _ in range(position.samples):
            if next(self._it, None) is None:  # the data shrank since the checkpoint: next epoch
                self.position.next_epoch()
                self._it = self._epoch(self.position.epoch)
                break

    def _epoch(self, epoch: int) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}:{epoch}:{self.rank}")
        buf: list[dict] = []
        for row in self.shard.iter_rows():
            buf.append(row)
            if len(buf) >= self.buffer:
                yield buf.pop(rng.randrange(len(buf)))
        while buf:
            yield buf.pop(rng.randrange(len(buf)))

    def take(self, n: int) -> list[dict]:
        rows: list[dict] = []
        fresh = 0  # rows seen since the last epoch change (guards against an empty shard)
        while len(rows) < n:
            row = next(self._it, None)
            if row is None:
                if fresh == 0 and self.position.samples == 0:
                    raise RuntimeError(f"worker {self.rank}: its train dataset shard is empty (more workers "
                                       "than objects?)")
                self.position.next_epoch()
                self._it = self._epoch(self.position.epoch)
                fresh = 0
                continue
            rows.append(row)
            fresh += 1
            self.position.advance(1)
        return rows


class Prefetcher:
    """A step's micro-batches, taken from a :class:`RowStream` and decoded by ``prepare`` on a
    background thread, ``depth`` steps ahead of the training loop (``depth=0``: on the caller's
    thread, nothing ahead).

    The stream's own position runs ahead by up to ``depth`` steps; :attr:`position` is the position
    after the last step *handed out*, which is what a checkpoint must record (the prefetched rows
    are taken again after a resume). Errors in the thread (a decode failure, an empty shard) are
    raised by :meth:`next` on the training thread."""

    _DONE = object()

    def __init__(self, stream: RowStream, prepare, *, batch_size: int, accumulation: int, depth: int):
        self._stream, self._prepare = stream, prepare
        self._batch_size, self._accumulation = batch_size, accumulation
        self.position = DataPosition(stream.position.epoch, stream.position.samples)
        self._depth = depth
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._fill, name="geco-prefetch", daemon=True)
            self._thread.start()

    def _load(self) -> tuple[list, tuple[int, int]]:
        micro = []
        for _ in range(self._accumulation):
            s = self._stream
            key = f"{s.seed}/{s.rank}/{s.position.epoch}/{s.position.samples}"
            _preparing.generator = torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))
            try:
                micro.append(self._prepare(s.take(self._batch_size)))
            finally:
                _preparing.generator = None
        return micro, (self._stream.position.epoch, self._stream.position.samples)

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._load()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread
            self._queue.put(e)

    def next(self) -> list:
        """The next step's micro-batches (each ``prepare(rows)`` of ``batch_size`` rows)."""
        if self._thread is None:
            micro, (epoch, samples) = self._load()
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            micro, (epoch, samples) = item
        self.position.epoch, self.position.samples = epoch, samples
        return micro

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=5)
