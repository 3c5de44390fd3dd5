"""Connection budgets: who may hold a descriptor on a listening port (issue 10, holes 1, 3).

Every listener (client, peer, metrics) accepts through ``serve_admitted`` with its own
``Admission``. A connection is *pending* from accept until it has proved who it is (the
HELLO handshake; for the metrics port, a complete HTTP request), then *established*.

Invariants:

- Rule 1: at most ``limit`` connections per port are open, pending and established together
  (plus the evicted ones still closing and at most ``MAX_REFUSING`` being refused), so the
  ports' limits plus the headroom of ``descriptor_budget`` fit RLIMIT_NOFILE.
- Rule 2: pending connections have smaller budgets: ``pending`` in all, ``pending_per_host``
  per source address. When a budget is full the *oldest* pending connection is closed to make
  room for the newcomer (as HAProxy and nginx do): an idle socket is the oldest one, a real
  client finishes its handshake in a round trip, so a flood evicts itself, never the client.
  A newcomer is refused only when established connections fill the port; at most
  ``MAX_REFUSING`` refused ones per port are being told why at once, the rest are closed
  without an answer, so refusals cannot pile up descriptors either.
- Rule 3: on the peer port ``reserved`` slots are kept for the hosts of known members
  (``is_member``): other hosts may fill only ``limit - reserved``, and members' pending
  connections have a pool of ``reserved`` of their own, which no other host's newcomer evicts.
  (A flood from a member's own address competes with it by rule 2 alone.)
- Rule 4: no accept error ends the accept loop: EMFILE/ENFILE and the like back off (0.1 s
  doubling to 1 s) and are logged once per back-off, without a traceback; a handler's failure
  ends only its own connection.
- Rule 5: a connection costs little until it speaks: its handler starts only once its first
  bytes arrive, and one that sends nothing within ``silence`` seconds (the handshake timeout)
  is closed without an answer. An idle flood is accepted, evicted and closed at the cost of
  a task, so the node keeps accepting at the rate the flood reopens sockets.
"""

from __future__ import annotations

import errno
import logging
import resource
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

__all__ = ["Admission", "Ticket", "current_nofile", "descriptor_budget", "raise_nofile_limit",
           "remote_host", "serve_admitted"]

log = logging.getLogger("kvd.net.admission")

# Descriptors kept for what is not an accepted connection: LevelDB's table files (it uses at
# most half of RLIMIT_NOFILE, kvd/storage/leveldb.py), outgoing peer connections, blob files,
# worker threads, logs. A port's limit is lowered, with a warning, when the limits do not fit.
RESERVED_FOR_STORAGE = 0.5
RESERVED_OTHER = 256
BACKOFF_MIN, BACKOFF_MAX = 0.1, 1.0
MAX_REFUSING = 32  # refused connections per port being sent their ERROR at once (rule 2)


@dataclass(eq=False)
class Ticket:
    """One admitted connection. ``evict`` closes it (set by ``serve_admitted``)."""

    host: str
    member: bool
    admission: "Admission"
    pending: bool = True
    evict: Callable[[], None] = field(default=lambda: None, repr=False)

    def established(self) -> None:
        """The connection proved who it is: it no longer counts as pending (rule 2)."""
        self.admission._establish(self)


class Admission:
    """The budget of one listening port (rules 1-3). Pure bookkeeping: no I/O, no clock."""

    def __init__(self, name: str, limit: int, pending: int, pending_per_host: int,
                 reserved: int = 0, is_member: Callable[[str], bool] = lambda host: False,
                 silence: float = 5.0):
        self.name = name
        self.silence = silence  # seconds a new connection may send nothing (rule 5)
        self.limit = limit
        self.pending_limit = min(pending, limit)
        self.pending_per_host = pending_per_host
        self.reserved = min(reserved, limit // 2)
        self.is_member = is_member
        self.open = 0
        self.open_members = 0
        # Pending tickets oldest first: of non-members, of members, and per host.
        self._pending: OrderedDict[Ticket, None] = OrderedDict()
        self._pending_members: OrderedDict[Ticket, None] = OrderedDict()
        self._by_host: dict[str, OrderedDict[Ticket, None]] = {}
        self.evicted = 0
        self.refused = 0
        self.refusing = 0  # refused connections whose handler is still telling them why
        self.peak = 0

    def __repr__(self) -> str:
        return f"Admission({self.name}: {self.statistics()})"

    def statistics(self) -> dict:
        return {"open": self.open, "pending": len(self._pending) + len(self._pending_members),
                "limit": self.limit, "evicted": self.evicted, "refused": self.refused,
                "peak": self.peak}

    def admit(self, host: str) -> tuple[Ticket | None, list[Ticket]]:
        """(ticket, or None when refused; the pending tickets to close to make room)."""
        member = bool(self.reserved) and self.is_member(host)
        evicted: list[Ticket] = []
        pool = self._pending_members if member else self._pending
        same_host = self._by_host.get(host)
        if same_host and len(same_host) >= self.pending_per_host:
            evicted.append(self._drop(next(iter(same_host))))
        elif len(pool) >= (self.reserved if member else self.pending_limit):
            evicted.append(self._drop(next(iter(pool))))
        if member:
            room, used = self.limit, self.open
        else:  # members beyond their reserve take from the shared room too
            room = self.limit - self.reserved
            used = self.open - min(self.open_members, self.reserved)
        if used >= room:
            if not pool:
                self.refused += 1
                return None, evicted
            evicted.append(self._drop(next(iter(pool))))
        ticket = Ticket(host, member, self)
        self.open += 1
        self.open_members += member
        self.peak = max(self.peak, self.open)
        pool[ticket] = None
        self._by_host.setdefault(host, OrderedDict())[ticket] = None
        return ticket, evicted

    def release(self, ticket: Ticket) -> None:
        """The connection is closed. Idempotent (an evicted ticket is already released)."""
        if ticket.admission is not self:
            return
        self._unpend(ticket)
        ticket.admission = _RELEASED
        self.open -= 1
        self.open_members -= ticket.member

    def _drop(self, ticket: Ticket) -> Ticket:
        self.evicted += 1
        self.release(ticket)
        return ticket

    def _establish(self, ticket: Ticket) -> None:
        if ticket.admission is self:
            self._unpend(ticket)

    def _unpend(self, ticket: Ticket) -> None:
        if not ticket.pending:
            return
        ticket.pending = False
        (self._pending_members if ticket.member else self._pending).pop(ticket, None)
        same_host = self._by_host[ticket.host]
        same_host.pop(ticket, None)
        if not same_host:
            del self._by_host[ticket.host]


class _Released(Admission):
    def _establish(self, ticket: Ticket) -> None:
        pass


_RELEASED = _Released("released", 1, 1, 1)


def descriptor_budget(nofile: int, wanted: dict[str, int]) -> dict[str, int]:
    """Each port's connection limit, lowered proportionally when ``wanted`` does not fit in
    the descriptors left after storage and everything else (rule 1)."""
    room = max(int(nofile * (1 - RESERVED_FOR_STORAGE)) - RESERVED_OTHER, 3 * 8)
    total = sum(wanted.values())
    if total <= room:
        return dict(wanted)
    return {name: max(8, want * room // total) for name, want in wanted.items()}


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (as systemd's default does for
    services) and return it; the connection budgets are computed from it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # keep the soft limit; the budgets follow it
    return current_nofile()


def current_nofile() -> int:
    """RLIMIT_NOFILE's soft limit (a large number when unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def remote_host(stream) -> str:
    """The remote IP of a (possibly TLS-wrapped) trio socket stream, or "" if unknown."""
    while not hasattr(stream, "socket") and hasattr(stream, "transport_stream"):
        stream = stream.transport_stream
    if isinstance(getattr(stream, "remote", None), str):  # kvd.net.memory: "HOST:PORT"
        return stream.remote.rpartition(":")[0]
    try:
        return str(stream.socket.getpeername()[0])
    except (AttributeError, OSError, IndexError, TypeError):
        return ""


Handler = Callable[[object, "Ticket | None"], Awaitable[None]]

# accept(2) errors that mean "out of a resource": wait for it to come back (rule 4).
CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


async def serve_admitted(handler: Handler, listeners: list, admission: Admission, *,
                         task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept on ``listeners`` until cancelled; run ``handler(stream, ticket)`` for each
    connection, ``ticket`` None when the port is full (the handler says why and closes)."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, handler, admission, nursery)
        task_status.started()


async def _accept_loop(listener, handler: Handler, admission: Admission, nursery) -> None:
    backoff = BACKOFF_MIN
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                known = exc.errno in CAPACITY_ERRNOS
                log.error("%s port: accept failed: %s; retrying in %.1f s%s", admission.name,
                          exc.strerror or exc, backoff,
                          " (out of descriptors or memory)" if known else "")
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            ticket, evicted = admission.admit(remote_host(stream))
            for old in evicted:
                old.evict()
            nursery.start_soon(_run, stream, ticket, handler, admission)


async def _run(stream, ticket: Ticket | None, handler: Handler, admission: Admission) -> None:
    with trio.CancelScope() as scope:
        if ticket is not None:
            ticket.evict = scope.cancel
        refusing = ticket is None and admission.refusing < MAX_REFUSING
        admission.refusing += refusing
        try:
            if refusing or (ticket is not None
                            and await _wait_first_bytes(stream, admission.silence)):
                await handler(stream, ticket)
        except Exception:  # one connection's bug must not end the accept loop (rule 4)
            log.exception("%s port: connection handler failed", admission.name)
        finally:
            admission.refusing -= refusing
            if ticket is not None:
                admission.release(ticket)
            sock = _raw_socket(stream)
            if sock is not None:
                sock.close()  # synchronous: no checkpoint, no cancel scope (rule 5)
            else:
                await trio.aclose_forcefully(stream)


async def _wait_first_bytes(stream, timeout: float) -> bool:
    """Whether the peer sent something within ``timeout`` (rule 5). Streams without a
    socket (the simulator's) go straight to the handler, whose own deadlines apply."""
    sock = _raw_socket(stream)
    if sock is None:
        return True
    with trio.move_on_after(timeout):
        await trio.lowlevel.wait_readable(sock)
        return True
    return False


def _raw_socket(stream):
    while not hasattr(stream, "socket") and hasattr(stream, "transport_stream"):
        stream = stream.transport_stream  # TLS: the ClientHello arrives on the socket first
    return getattr(stream, "socket", None)
