"""Keeping an optimizer's own computation from disturbing the run: BLAS pinned to one
thread, and a private state for the legacy global numpy RNG."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

_blas_controller: Any = None
_blas_modules_seen = 0


@contextmanager
def pinned_blas() -> Iterator[None]:
    """Limit BLAS to one thread for the duration of the block.

    The client may share a 2-core machine with the model server, and a multi-threaded
    BLAS call (pycma's eigendecomposition, a big matmul) would steal the server's cores.
    This is ``threadpoolctl.threadpool_limits(1, user_api="blas")``, but through one cached
    ``ThreadpoolController``: ``threadpool_limits`` rescans every loaded shared library on
    each call (~4 ms measured on the 2-core dev box, per ask and per tell), the cached
    controller only flips the thread counts (~20 us). A BLAS library can arrive with any
    import (scipy's own copy comes with nevergrad), so the controller is rebuilt whenever
    modules have been imported since it was built: rare once a run is going.
    """
    global _blas_controller, _blas_modules_seen
    if _blas_controller is None or len(sys.modules) != _blas_modules_seen:
        from threadpoolctl import ThreadpoolController

        _blas_controller = ThreadpoolController()
        _blas_modules_seen = len(sys.modules)
    with _blas_controller.limit(limits=1, user_api="blas"):
        yield


_SANDBOX_TAG = 0x6F70_7469  # keeps the sandbox stream apart from RandomState(seed) streams


class GlobalRNGSandbox:
    """While active, the legacy global RNG (``np.random.rand`` & co.) runs on a private state.

    Some third-party optimizers (several nevergrad ones) draw from ``np.random`` directly.
    Without a private state their asks would depend on whatever else the process did with
    the global RNG, and a resumed run could not reproduce an uninterrupted one. The outer
    state is restored on exit, so the caller's global RNG is left exactly as it was.
    Not thread-safe (nothing about the global RNG is) and not re-entrant.
    """

    def __init__(self, seed: int) -> None:
        self._state = np.random.RandomState([seed, _SANDBOX_TAG]).get_state()
        self._outer: Any = None

    def __enter__(self) -> None:
        self._outer = np.random.get_state()
        np.random.set_state(self._state)

    def __exit__(self, *exc: object) -> None:
        self._state = np.random.get_state()
        np.random.set_state(self._outer)
        self._outer = None
