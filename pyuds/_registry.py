"""The client registry: which ClientHandle is in which slot (for the loop) and under which id
(for Server.clients); admitting, refusing and closing clients, with the application's hooks
(authorize, on_connect, on_disconnect); the logging of why clients go; and what a failed
handler costs (its own client, never the server).

It implements the Registry protocol of pyuds._core, whose loop calls it on the loop's thread.
"""
from __future__ import annotations

import logging
import os
import time
import types
import weakref
from typing import Any, Callable, Mapping

from ._config import ServerConfig
from ._core import Core
from ._endpoint import parse_inet_name
from ._errors import ClientClosedError
from ._handle import ClientHandle, CloseReason, InetPeer, Owner

log = logging.getLogger("pyuds")

Hook = Callable[[ClientHandle], object]


class Registry:
    """The clients of one server. Loop thread only, but for the read-only view of clients."""

    def __init__(self, core: Core, owner: Owner, config: ServerConfig, authorize: Hook | None,
                 on_connect: Hook | None,
                 on_disconnect: Callable[[ClientHandle, CloseReason], object] | None) -> None:
        self._core = core
        # What the handles made here ask to send, close, look up: the server, which holds this
        # registry. Weak, so that a server dropped without shutdown() is still freed (and
        # cleans up) as soon as nothing refers to it; the handles hold it strongly.
        self._owner = weakref.ref(owner)
        self._config = config
        self._authorize = authorize
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self.handles: list[ClientHandle | None] = []  # by slot, for the loop: never replaced
        self._clients: dict[int, ClientHandle] = {}   # admitted clients, by id
        self.clients: Mapping[int, ClientHandle] = types.MappingProxyType(self._clients)
        self.handler_errors = 0
        #: Told when a client is closed or gone, so that work still in flight for it stops
        #: (pyuds._aio's dispatcher sets it); None: nobody is.
        self.on_gone: Callable[[ClientHandle], None] | None = None
        # Clients refused before they became clients, not yet logged, by reason (the uid/gid
        # policy, a missing PROXY header), and when each reason was last logged (monotonic).
        self._refusals: dict[CloseReason, int] = {}
        self._refusal_logged: dict[CloseReason, float] = {}

    def _server(self) -> Owner:
        """The owner, which is alive while its loop runs: the loop is what calls here."""
        owner = self._owner()
        assert owner is not None
        return owner

    def connected(self, slot: int, cid: int, pid: int, uid: int, gid: int) -> None:
        client = ClientHandle(self._server(), slot, cid, pid, uid, gid, *self._core.counters(slot, cid))
        handles = self.handles
        if slot >= len(handles):
            handles.extend([None] * (slot + 1 - len(handles)))
        handles[slot] = client
        if self._core.inet:
            name = self._core.peer_address(slot, cid)
            client._inet = client._address = InetPeer(*parse_inet_name(name)) if name else InetPeer("", 0)
        if self._authorize is not None and not self._passes(client, self._authorize, "authorize",
                                                            CloseReason.UNAUTHORIZED):
            return
        if self._on_connect is not None and not self._passes(client, self._on_connect, "on_connect",
                                                             CloseReason.REJECTED):
            return
        client._admitted = True
        self._clients[cid] = client
        if self._config.kind == "datagram":
            client._address = self._core.peer_address(slot, cid)
        log.debug("client %d connected (%s)", cid, client._describe())

    def _passes(self, client: ClientHandle, hook: Hook, name: str, reason: CloseReason) -> bool:
        """Runs authorize or on_connect; False (and the client closed) if it refused the client
        or raised."""
        try:
            verdict = hook(client)
            # authorize fails closed: only a true value admits (a hook that forgot to return
            # refuses); on_connect refuses only with an explicit False.
            if (verdict if name == "authorize" else verdict is not False):
                return True
            log.log(logging.WARNING if name == "authorize" else logging.DEBUG,
                    "client %d (%s) refused by %s()", client.id, client._describe(), name)
        except Exception:
            log.exception("%s raised for client %d (%s); refusing it", name, client.id, client._describe())
            self.handler_errors += 1
            reason = CloseReason.HANDLER_ERROR
        self.close(client, reason)
        return False

    def close(self, client: ClientHandle, reason: CloseReason) -> None:
        """Closes client: no more of its messages reach the handler; it goes once the replies
        queued for it are sent."""
        client._closed = True
        self._core.close(client._slot, client.id, reason)
        if self.on_gone is not None:
            self.on_gone(client)

    def disconnected(self, slot: int, reason: CloseReason, err: int, discarded: int) -> None:
        client = self.handles[slot]
        self.handles[slot] = None
        assert client is not None
        client._closed = True
        client.close_reason = reason
        if self.on_gone is not None:
            self.on_gone(client)
        self._log_close(client, reason, err, discarded)
        if not client._admitted:
            return
        del self._clients[client.id]
        log.debug("client %d disconnected (%s)", client.id, reason)
        if self._on_disconnect is not None:
            try:
                self._on_disconnect(client, reason)
            except Exception:
                log.exception("on_disconnect raised for client %d", client.id)

    def _log_close(self, client: ClientHandle, reason: CloseReason, err: int, discarded: int) -> None:
        """Says why a client went, where that is worth saying, and what output it left unsent."""
        config = self._config
        if reason is CloseReason.TOO_LARGE:
            log.error("client %d sent a message larger than max_message_size (%d bytes); disconnected it",
                      client.id, config.max_message_size)
        elif reason is CloseReason.ERROR:
            log.warning("client %d: socket error: %s", client.id, os.strerror(err) if err else "unknown")
        elif reason is CloseReason.SLOW_CONSUMER:
            log.warning("client %d disconnected as a slow consumer: it does not read, and its unsent output "
                        "passed max_output_buffer (%d bytes)", client.id, config.max_output_buffer)
        elif reason is CloseReason.FRAME_TIMEOUT:
            log.warning("client %d disconnected: it began a message and did not finish it within %gs",
                        client.id, config.frame_timeout)
        elif reason is CloseReason.TOO_MANY_FDS:
            log.error("client %d passed more file descriptors with a message than max_fds (%d) allows; "
                      "disconnected it", client.id, config.max_fds)
        elif reason is CloseReason.IDLE_TIMEOUT:
            log.debug("client %d closed after %gs idle", client.id, config.idle_timeout)
        if discarded and reason in (CloseReason.PEER, CloseReason.ERROR):
            log.debug("client %d went away with %d bytes of output unsent", client.id, discarded)
        elif discarded and reason is not CloseReason.SLOW_CONSUMER:
            log.warning("client %d: %d bytes of output given up at close (not read within %gs)",
                        client.id, discarded, config.flush_timeout)

    def anonymous(self, pid: int, uid: int, gid: int) -> ClientHandle:
        """A handle for one datagram from a sender with no address: never in the registry,
        and nothing sent to it can arrive."""
        client = ClientHandle(self._server(), -1, 0, pid, uid, gid, None, 0)
        client._address = None
        return client

    def refused(self, reason: CloseReason, pid: int, uid: int, gid: int) -> None:
        """A client refused before it became one: by the uid/gid policy at accept, or for want
        of a valid PROXY header. Logged at most once a second for each reason, so that a flood
        of them cannot flood the log."""
        count = self._refusals[reason] = self._refusals.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._refusal_logged.get(reason, 0.0) < 1.0:
            return
        more = f" (and {count - 1} more since the last report)" if count > 1 else ""
        if reason is CloseReason.PROXY_HEADER:
            log.warning("closed a connection that sent no valid PROXY protocol header (proxy_protocol is on): "
                        "it sent something else, ended before its header did, or took longer than %s%s",
                        f"{self._config.frame_timeout:g}s" if self._config.frame_timeout else "10s", more)
        else:
            log.warning("refused a client (pid %d, uid %d, gid %d): not in allow_uid / allow_gid%s",
                        pid, uid, gid, more)
        self._refusals[reason] = 0
        self._refusal_logged[reason] = now

    def handler_failed(self, client: ClientHandle, exc: Exception) -> None:
        self.handler_errors += 1
        log.error("handler raised on a message from client %d (%s); closing that client",
                  client.id, client._describe(), exc_info=exc)
        self.close(client, CloseReason.HANDLER_ERROR)

    def reply_failed(self, client: ClientHandle, exc: Exception) -> None:
        if isinstance(exc, ClientClosedError):
            return  # the client vanished: nobody to reply to
        self.handler_failed(client, exc)

    def abandon(self) -> None:
        """Forgets every client, marked closed: the C server is gone without closing them (after
        a failure; normally every client was closed by then)."""
        for client in self._clients.values():
            client._closed = True
        self._clients.clear()
