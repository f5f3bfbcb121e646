"""Calls released together from threads of their own, as concurrent requests arrive."""

from __future__ import annotations

import threading
from typing import Callable


def released_together(calls: list[Callable[[], object]]) -> list:
    """Each call run from its own thread, all released at once by a barrier -> their
    results, in order (None where a call raised)."""
    results = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(index: int) -> None:
        start.wait()
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results
