"""Run any batch iterator in a background thread and count how long the consumer waited on it."""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator

_DONE = object()


class Prefetcher:
    """Iterate `source` in a daemon thread, `depth` items ahead, applying `transform` there (e.g. picking the
    hook, copying to the GPU, scaling). `wait_s` is the time the consumer spent blocked in `next()`.

    `state_fn`, when given, is called right after each item is produced and its result travels with the item,
    so `state_dict()` describes the stream position after the last item the *consumer* took (the producer runs
    ahead; its own position would skip the prefetched items on resume)."""

    def __init__(self, source: Iterable, *, transform: Callable[[Any], Any] | None = None,
                 state_fn: Callable[[], Any] | None = None, depth: int = 2):
        self._source, self._transform, self._state_fn = source, transform, state_fn
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._state = state_fn() if state_fn else None
        self.wait_s = 0.0
        self._thread = threading.Thread(target=self._run, name="saeforge-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                state = self._state_fn() if self._state_fn else None
                item = self._transform(item) if self._transform else item
                while not self._stop.is_set():
                    try:
                        self._queue.put((item, state, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put((_DONE, None, None))
        except BaseException as exc:  # re-raised in the consumer thread
            self._queue.put((_DONE, None, exc))

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        t0 = time.perf_counter()
        item, state, exc = self._queue.get()
        self.wait_s += time.perf_counter() - t0
        if exc is not None:
            raise exc
        if item is _DONE:
            self._queue.put((_DONE, None, None))
            raise StopIteration
        self._state = state
        return item

    def state_dict(self) -> Any:
        """The source's state after the last item handed to the consumer."""
        return self._state

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)
