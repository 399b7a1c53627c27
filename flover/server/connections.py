"""Connections that send nothing, or half a request, are closed after a timeout.

uvicorn's keep-alive timeout starts only after a response, so a client that connects and sends
nothing, or only part of a request's headers, holds its connection (and a file descriptor)
for ever: a handful of such clients can starve the server. `IdleTimeoutH11` closes a
connection that has received no data for `timeout_keep_alive` seconds while no request is
being answered; a request in progress (a long generation, a stream) is never cut.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class IdleTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with an idle timer that also runs before the first request."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._idle: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._arm()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self.loop.call_later(self.timeout_keep_alive, self._on_idle)

    def _on_idle(self) -> None:
        self._idle = None
        if self.cycle is None or self.cycle.response_complete:
            self.timeout_keep_alive_handler()  # uvicorn's own close of an idle connection
        else:
            self._arm()  # a request is being answered: its client may well be silent
