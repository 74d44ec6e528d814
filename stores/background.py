"""Producer/consumer hand-off through a background thread, with a stop signal: :class:`Prefetcher`.

Used wherever the next items are slow to make and the consumer should not wait for them: the trainer's
batches (pick the hook, copy to the device, scale), harvest's tokenisation and packing. Three guarantees:

- items arrive in the source's order, at most ``depth`` made ahead of the consumer;
- an exception raised by the source (or the transform) is raised again in the consumer, at the point in
  the stream where it happened;
- nothing blocks forever once the consumer stops: ``close()`` (or leaving a ``with`` block, or dropping a
  :func:`prefetched` generator) signals the producer, which stops at its next hand-off (within 0.1 s of
  the source yielding) and closes the source there, in its own thread, so the source's ``finally`` runs.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator

_DONE = object()
_POLL_S = 0.1
"""How often a producer waiting on a full queue checks the stop signal."""
_JOIN_S = 5.0
"""How long ``close()`` waits for the producer; a source stuck inside ``next()`` cannot be interrupted."""


class Prefetcher:
    """Iterate ``source`` in a daemon thread, ``depth`` items ahead, applying ``transform`` there (e.g. picking
    the hook, copying to the GPU, scaling). ``wait_s`` is the time the consumer spent blocked in ``next()``.

    ``state_fn``, when given, is called right after each item is produced and its result travels with the
    item, so ``state_dict()`` describes the stream position after the last item the *consumer* took (the
    producer runs ahead; its own position would skip the prefetched items on resume).
    """

    def __init__(self, source: Iterable, *, transform: Callable[[Any], Any] | None = None,
                 state_fn: Callable[[], Any] | None = None, depth: int = 2, name: str = "saeforge-prefetch"):
        self._source, self._transform, self._state_fn = source, transform, state_fn
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._state = state_fn() if state_fn else None
        self.wait_s = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- producer thread -----------------------------------------------------------------------------
    def _put(self, entry: tuple) -> bool:
        """Hand one entry to the consumer; False when told to stop first."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        it = None
        try:
            it = iter(self._source)
            for item in it:
                state = self._state_fn() if self._state_fn else None
                item = self._transform(item) if self._transform else item
                if not self._put((item, state, None)):
                    return
            self._put((_DONE, None, None))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer thread
            self._put((_DONE, None, exc))
        finally:
            if self._stop.is_set() and hasattr(it, "close"):
                it.close()  # stopped early: run the source's cleanup here, in the thread that iterated it

    # --- consumer ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        t0 = time.perf_counter()
        try:
            item, state, exc = self._get()
        finally:
            self.wait_s += time.perf_counter() - t0
        if item is _DONE:
            self._finished = True
            if exc is not None:
                raise exc
            raise StopIteration
        self._state = state
        return item

    def _get(self) -> tuple:
        while True:  # poll, so that a close() from another thread also ends a wait here
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    self._finished = True
                    raise StopIteration from None

    def state_dict(self) -> Any:
        """The source's state after the last item handed to the consumer."""
        return self._state

    def is_alive(self) -> bool:
        """Whether the producer thread is still running."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the producer and drop what it made ahead; returns within a few seconds whatever the source does."""
        self._stop.set()
        self._finished = True
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=_JOIN_S)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prefetched(source: Iterable, *, depth: int = 2, name: str = "saeforge-prefetch") -> Iterator:
    """Iterate ``source`` in a background thread, ``depth`` items ahead, as a generator.

    When the consumer stops early (``break``, an exception, or the generator being dropped), the producer
    is stopped and the source closed: no thread is left blocked on a queue nobody reads.
    """
    with Prefetcher(source, depth=depth, name=name) as p:
        yield from p
