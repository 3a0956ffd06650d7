"""uvicorn's HTTP/1.1 (h11) protocol with a deadline on the request headers.

uvicorn times out idle keep-alive connections (``timeout_keep_alive``) and the handler
times out a slow body (``--body-timeout``), but nothing bounds a client that opens a
connection and sends its headers a byte at a time. This protocol closes a connection
whose request headers are not complete ``header_timeout`` seconds after it opened, or after
the previous response on the same connection ended.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


def header_timeout_protocol(header_timeout: float) -> type[H11Protocol]:
    """An :class:`H11Protocol` subclass with the given header deadline (pass it as ``http=``)."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout, self._header_deadline, self.cycle)

        def _header_deadline(self, cycle) -> None:
            # Still the cycle of when the timer was armed (no new request has started) and not
            # in the middle of answering it: the headers never came.
            if self.cycle is cycle and (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                logger.info("closing %s: no complete request headers within %g s", self.client, header_timeout)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol
