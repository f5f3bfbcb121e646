"""Taking turns at the model: one forward at a time, tenants served round robin.

Concurrent forwards would only fight over the same cores (or the same GPU memory), so the
model runs one step at a time. A step is one chunk of one request (a bucket's prefix
states, a chunk of candidates): a tenant with a huge population waits its turn between
chunks, so that another tenant's small request is not stuck behind all of it. Within a
tenant, steps go in arrival order.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

from backbone_server.errors import Cancelled

POLL_S = 0.25  # how often a waiting step checks that its caller is still there


class FairTurns:
    def __init__(self):
        self._condition = threading.Condition()
        self._busy = False
        self._waiting: dict[str, deque] = {}  # tenant -> its waiting steps' tickets, in order
        self._order: deque[str] = deque()  # tenants with waiting steps, next to serve first
        self._granted: object | None = None

    @contextmanager
    def turn(self, tenant: str, cancelled: Callable[[], bool] | None = None) -> Iterator[None]:
        """Holds the model for one step; raises Cancelled if the caller leaves while waiting."""
        self._acquire(tenant, cancelled)
        try:
            yield
        finally:
            self._release()

    def _acquire(self, tenant: str, cancelled: Callable[[], bool] | None) -> None:
        with self._condition:
            if not self._busy and not self._order:
                self._busy = True
                return
            ticket = object()
            if tenant not in self._waiting:
                self._waiting[tenant] = deque()
                self._order.append(tenant)
            self._waiting[tenant].append(ticket)
            while self._granted is not ticket:
                self._condition.wait(POLL_S)
                if self._granted is not ticket and cancelled is not None and cancelled():
                    self._withdraw(tenant, ticket)
                    raise Cancelled("the caller went away while waiting for the model")
            self._granted = None

    def _withdraw(self, tenant: str, ticket: object) -> None:
        queue = self._waiting[tenant]
        queue.remove(ticket)
        if not queue:
            del self._waiting[tenant]
            self._order.remove(tenant)

    def _release(self) -> None:
        with self._condition:
            if not self._order:
                self._busy = False
                return
            tenant = self._order.popleft()
            queue = self._waiting[tenant]
            self._granted = queue.popleft()
            if queue:
                self._order.append(tenant)  # its next step waits behind the other tenants'
            else:
                del self._waiting[tenant]
            self._condition.notify_all()  # _busy stays True: the turn passes straight on
