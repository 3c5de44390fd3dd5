"""Connection budgets: who may hold a descriptor on a listening port (issue 10, holes 1, 3).

Every listener (client, peer, RESP, metrics) accepts through ``serve_admitted`` with its own
``Admission``. A connection is *pending* from accept until it has proved who it is (the
HELLO handshake; for the metrics port, a complete HTTP request), then *established*.

Invariants:

- Rule 1: at most ``limit`` connections per port are open, pending and established together
  (plus the evicted ones still closing and at most ``MAX_REFUSING`` being refused), so the
  ports' limits plus the headroom of ``descriptor_budget`` fit RLIMIT_NOFILE.
- Rule 2: pending connections have smaller budgets: ``pending`` in all, ``pending_per_host``
  per source address. When a budget is full the oldest *silent* pending connection (no byte
  yet) is closed to make room for the newcomer (as HAProxy and nginx evict the oldest): an
  idle flood evicts itself, never a client, which speaks at once. Pending connections that
  have spoken are evicted only when the port itself is full, oldest first; until then the
  handshake timeout bounds them, so a burst of clients from one host (redis-benchmark's 50)
  does not evict its own members before their handshakes run.
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
- Rule 5: a connection costs little until it speaks. Listening sockets are accepted in
  batches; a connection that has sent nothing yet waits in the port's one epoll set (one
  task, one deadline: the oldest's), and one that sends nothing within ``silence`` seconds
  (the handshake timeout) is closed without an answer. Its handler task starts only once
  bytes arrive. An idle flood is accepted, evicted and closed with no task, no cancel scope
  and no timer of its own, so the node keeps accepting at the rate the flood reopens sockets.
- Rule 6: most idle sockets never reach the node: TCP_DEFER_ACCEPT (Linux) keeps a
  connection in the kernel until it sends bytes, or for ``silence`` seconds. They wait in
  the SYN queue, which holds the listen backlog (``net.core.somaxconn``); past it, SYN
  cookies let connections through at once, and rule 5 deals with them. The option is set as
  the port opens (``defer_accept``), not when it is first served.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
import resource
import select
import socket
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import trio

__all__ = ["Admission", "Ticket", "current_nofile", "defer_accept", "descriptor_budget",
           "raise_nofile_limit", "remote_host", "serve_admitted"]

log = logging.getLogger("kvd.net.admission")

# Descriptors kept for what is not an accepted connection: LevelDB's table files (it uses at
# most half of RLIMIT_NOFILE, kvd/storage/leveldb.py), outgoing peer connections, blob files,
# worker threads, logs. A port's limit is lowered, with a warning, when the limits do not fit.
RESERVED_FOR_STORAGE = 0.5
RESERVED_OTHER = 256
BACKOFF_MIN, BACKOFF_MAX = 0.1, 1.0
MAX_REFUSING = 32  # refused connections per port being sent their ERROR at once (rule 2)
ACCEPT_BATCH = 256  # connections accepted (or parked ones woken) per wake-up of the loop


@dataclass(eq=False)
class Ticket:
    """One admitted connection. ``evict`` closes it (set by ``serve_admitted``)."""

    host: str
    member: bool
    admission: "Admission"
    pending: bool = True
    evict: Callable[[], None] = field(default=lambda: None, repr=False)

    def spoke(self) -> None:
        """Its first bytes arrived: evicted only after every silent pending one (rule 2)."""
        self.admission._speak(self)

    def established(self) -> None:
        """The connection proved who it is: it no longer counts as pending (rule 2)."""
        self.admission._establish(self)


class _Queue:
    """Pending tickets, oldest first, the silent ones (no byte yet) before the others."""

    def __init__(self) -> None:
        self.silent: OrderedDict[Ticket, None] = OrderedDict()
        self.spoke: OrderedDict[Ticket, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.silent) + len(self.spoke)

    def oldest(self) -> Ticket:
        return next(iter(self.silent or self.spoke))

    def speak(self, ticket: Ticket) -> None:
        if self.silent.pop(ticket, False) is None:
            self.spoke[ticket] = None

    def remove(self, ticket: Ticket) -> None:
        self.silent.pop(ticket, None)
        self.spoke.pop(ticket, None)


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
        # Pending tickets: of non-members, of members, and per host.
        self._pending = _Queue()
        self._pending_members = _Queue()
        self._by_host: dict[str, _Queue] = {}
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
        if same_host and same_host.silent and len(same_host) >= self.pending_per_host:
            evicted.append(self._drop(same_host.oldest()))
        elif pool.silent and len(pool) >= (self.reserved if member else self.pending_limit):
            evicted.append(self._drop(pool.oldest()))
        if member:
            room, used = self.limit, self.open
        else:  # members beyond their reserve take from the shared room too
            room = self.limit - self.reserved
            used = self.open - min(self.open_members, self.reserved)
        if used >= room:
            if not pool:
                self.refused += 1
                return None, evicted
            evicted.append(self._drop(pool.oldest()))
        ticket = Ticket(host, member, self)
        self.open += 1
        self.open_members += member
        self.peak = max(self.peak, self.open)
        pool.silent[ticket] = None
        self._by_host.setdefault(host, _Queue()).silent[ticket] = None
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

    def _speak(self, ticket: Ticket) -> None:
        if ticket.admission is self and ticket.pending:
            (self._pending_members if ticket.member else self._pending).speak(ticket)
            self._by_host[ticket.host].speak(ticket)

    def _establish(self, ticket: Ticket) -> None:
        if ticket.admission is self:
            self._unpend(ticket)

    def _unpend(self, ticket: Ticket) -> None:
        if not ticket.pending:
            return
        ticket.pending = False
        (self._pending_members if ticket.member else self._pending).remove(ticket)
        same_host = self._by_host[ticket.host]
        same_host.remove(ticket)
        if not same_host:
            del self._by_host[ticket.host]


class _Released(Admission):
    def _speak(self, ticket: Ticket) -> None:
        pass

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


async def serve_admitted(handler: Handler, listeners: list, admission: Admission,
                         tls: ssl.SSLContext | None = None, *,
                         task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept on ``listeners`` until cancelled; run ``handler(stream, ticket)`` for each
    connection, ``ticket`` None when the port is full (the handler says why and closes).
    ``tls``: the handler gets a server-side trio.SSLStream over each socket."""
    async with trio.open_nursery() as nursery:
        parking = None
        if hasattr(select, "epoll"):  # Linux, kvd's platform; elsewhere a task per connection
            parking = _Parking(admission, handler, tls, nursery)
            nursery.start_soon(parking.run)
        for listener in listeners:
            sock = getattr(listener, "socket", None)
            if parking is not None and isinstance(sock, trio.socket.SocketType):
                nursery.start_soon(_accept_batches, listener, parking)
            else:  # the simulator's in-memory listeners (or a test's)
                served = trio.SSLListener(listener, tls) if tls is not None else listener
                nursery.start_soon(_accept_loop, served, handler, admission, nursery)
        task_status.started()


def defer_accept(sock, seconds: float) -> None:
    """Rule 6: the kernel hands over a connection only once it has sent bytes (TCP_DEFER_ACCEPT,
    as nginx's `deferred`); idle ones wait in its SYN queue, up to the listen backlog. Set by
    whoever opens the listening socket, at once: before it, the kernel queues every connection."""
    if hasattr(socket, "TCP_DEFER_ACCEPT"):  # Linux
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, max(1, math.ceil(seconds)))


async def _accept_batches(listener, parking: "_Parking") -> None:
    """Accept everything waiting, then wait: one wake-up per batch, not two per connection,
    and no stream object for a connection that is evicted before it speaks."""
    backoff = BACKOFF_MIN
    # The same listening socket under a second descriptor, for plain non-blocking accept(2);
    # readiness and closing stay with the listener's own (closing it ends this loop).
    with socket.socket(fileno=os.dup(listener.socket.fileno())) as raw:
        raw.setblocking(False)
        async with listener:
            while True:
                await trio.lowlevel.wait_readable(listener.socket)
                for _ in range(ACCEPT_BATCH):
                    try:
                        sock, address = raw.accept()
                    except BlockingIOError:
                        backoff = BACKOFF_MIN
                        break
                    except OSError as exc:
                        await _back_off(parking.admission, exc, backoff)
                        backoff = min(backoff * 2, BACKOFF_MAX)
                        break
                    parking.arrived(sock, address[0] if isinstance(address, tuple) else "")


class _Parking:
    """Accepted connections that have not sent a byte yet (rule 5), in one epoll set watched
    by one task, oldest first, instead of a task, a cancel scope and a timer each."""

    def __init__(self, admission: Admission, handler: Handler, tls, nursery):
        self.admission, self.handler, self.tls, self.nursery = admission, handler, tls, nursery
        self.epoll = select.epoll()
        self.parked: dict[int, tuple[socket.socket, Ticket, float]] = {}  # oldest first
        self.scope = trio.CancelScope()

    def arrived(self, sock: socket.socket, host: str) -> None:
        if self.parked:  # those that spoke since are no longer the silent ones to evict
            self._wake()
        ticket, evicted = self.admission.admit(host)
        for old in evicted:
            old.evict()
        sock.setblocking(False)
        if ticket is not None and not self._speaking(sock):
            if sock.fileno() == -1:  # closed by its peer already
                self.admission.release(ticket)
                return
            fd = sock.fileno()
            try:
                self.epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
            except OSError:  # out of epoll watches (ENOSPC) or memory: dropped, as on EMFILE
                sock.close()
                self.admission.release(ticket)
                return
            if not self.parked:
                self.scope.deadline = trio.current_time() + self.admission.silence
            self.parked[fd] = (sock, ticket, trio.current_time() + self.admission.silence)
            ticket.evict = partial(self._close, fd)
            return
        self._start(sock, ticket)

    @staticmethod
    def _speaking(sock: socket.socket) -> bool:
        """Whether bytes wait on ``sock``; a connection its peer closed is closed here."""
        try:
            if sock.recv(1, socket.MSG_PEEK):
                return True
        except BlockingIOError:
            return False
        except OSError:
            pass
        sock.close()  # EOF or reset before a byte: nothing to answer
        return False

    def _start(self, sock: socket.socket, ticket: Ticket | None) -> None:
        if ticket is not None:
            ticket.spoke()
        stream: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        if self.tls is not None:
            stream = trio.SSLStream(stream, self.tls, server_side=True)
        _serve_one(self.nursery, stream, ticket, self.handler, self.admission, wait=False)

    def _close(self, fd: int) -> None:
        """Evicted, or silent for ``silence`` seconds: closed without an answer."""
        sock, ticket, _ = self.parked.pop(fd)
        self.epoll.unregister(fd)
        sock.close()
        self.admission.release(ticket)

    def _wake(self) -> None:
        """Start the parked connections that have spoken; close those their peer closed."""
        for fd, _ in self.epoll.poll(0, ACCEPT_BATCH):
            sock, ticket, _ = self.parked.pop(fd)
            self.epoll.unregister(fd)
            if self._speaking(sock):
                self._start(sock, ticket)
            else:
                sock.close()  # closed by its peer (or woken by an error): nothing to answer
                self.admission.release(ticket)

    async def run(self) -> None:
        try:
            while True:
                self.scope = trio.CancelScope(deadline=next(
                    (deadline for _, _, deadline in self.parked.values()), math.inf))
                with self.scope:
                    await trio.lowlevel.wait_readable(self.epoll.fileno())
                self._wake()
                now = trio.current_time()
                for fd, (_, _, deadline) in list(itertools.islice(self.parked.items(), 1024)):
                    if deadline > now:
                        break
                    self._close(fd)
        finally:
            for sock, _, _ in self.parked.values():
                sock.close()
            self.epoll.close()


async def _back_off(admission: Admission, exc: OSError, backoff: float) -> None:
    known = exc.errno in CAPACITY_ERRNOS
    log.error("%s port: accept failed: %s; retrying in %.1f s%s", admission.name,
              exc.strerror or exc, backoff, " (out of descriptors or memory)" if known else "")
    await trio.sleep(backoff)


async def _accept_loop(listener, handler: Handler, admission: Admission, nursery) -> None:
    backoff = BACKOFF_MIN
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                await _back_off(admission, exc, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            ticket, evicted = admission.admit(remote_host(stream))
            for old in evicted:
                old.evict()
            _serve_one(nursery, stream, ticket, handler, admission, wait=True)


def _serve_one(nursery, stream, ticket: Ticket | None, handler: Handler, admission: Admission,
               wait: bool) -> None:
    """Start the connection's task; evicting the ticket cancels it, even before it runs."""
    scope = trio.CancelScope()
    if ticket is not None:
        ticket.evict = scope.cancel
    nursery.start_soon(_run, stream, ticket, handler, admission, wait, scope)


async def _run(stream, ticket: Ticket | None, handler: Handler, admission: Admission,
               wait: bool, scope: trio.CancelScope) -> None:
    with scope:
        refusing = ticket is None and admission.refusing < MAX_REFUSING
        admission.refusing += refusing
        try:
            if ticket is None:
                serve = refusing
            else:
                serve = not wait or await _wait_first_bytes(stream, ticket, admission.silence)
            if serve:
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


async def _wait_first_bytes(stream, ticket: Ticket, timeout: float) -> bool:
    """Whether the peer sent something within ``timeout`` (rule 5). Streams without a
    socket (the simulator's) go straight to the handler, whose own deadlines apply."""
    sock = _raw_socket(stream)
    if sock is not None:
        with trio.move_on_after(timeout) as scope:
            await trio.lowlevel.wait_readable(sock)
        if scope.cancelled_caught:
            return False
    ticket.spoke()
    return True


def _raw_socket(stream):
    while not hasattr(stream, "socket") and hasattr(stream, "transport_stream"):
        stream = stream.transport_stream  # TLS: the ClientHello arrives on the socket first
    return getattr(stream, "socket", None)
