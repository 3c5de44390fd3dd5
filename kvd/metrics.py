"""Observability: Prometheus metrics, /health and /ready on ``metrics_listen``.

A small HTTP/1.1 server (one request per connection, GET and HEAD only) serves:

- ``/metrics``: the Prometheus text exposition format, produced by prometheus_client from a
  registry of this node's own (several nodes can run in one test process).
- ``/health``: 200 while the process runs its event loop (liveness).
- ``/ready``: 200 once the node has loaded its ring and every partition it replicates has at
  least max(R, W) reachable replicas (capped by the cluster size, as requests are); 503 with
  the reason otherwise: ring not loaded yet, restoring after a wipe, shutting down, or
  partitions without a reachable quorum. Load balancers and orchestration use it.

Where the numbers come from (rules this module keeps):

1. Request latency and outcome come from the coordinator, which reports each ``get`` and
   ``put`` to its observer (``request_finished``; kvd.node.coordinator rule 6): the histogram
   is the time to reach R or W replicas, without the time to stream a large value to the
   client.
2. Everything else is read from the node's own state at scrape time (``Counters``, the
   coordinator's read repairs, the cluster's hints and transfers, anti-entropy totals,
   storage sizes), so no other module has to know metrics exist.
3. Label values are bounded: outcomes are a fixed set, hint targets are cluster members,
   refusal reasons are kvd's own messages with client-chosen parts replaced (at most 32).
4. The endpoint never blocks the event loop on the disk: the blob directory walk runs in a
   worker thread and is cached for ``SIZE_CACHE_SECONDS``.
5. The endpoint has a connection budget of its own (kvd.net.admission): silent or slow
   connections are closed at a deadline or make room for newer ones, never queued.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from kvd import metrics_counts as counts
from kvd import versions
from kvd.config import Config
from kvd.errors import KvdError
from kvd.net.admission import Admission, current_nofile, descriptor_budget, serve_admitted

__all__ = ["NodeMetrics", "OUTCOMES", "unready_partitions"]

log = logging.getLogger("kvd.metrics")

# Request outcomes, the values of the "outcome" label: the wire error codes a client can see,
# plus ok / not_found / cancelled. Anything else is counted as "error".
OUTCOMES = ("ok", "not_found", "quorum", "unavailable", "bad_request", "too_many_siblings",
            "cancelled", "error")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)
SIBLING_BUCKETS = (1, 2, 3, 4, 5, 10, 25, 50, 100)
SIZE_CACHE_SECONDS = 10.0
MAX_REQUEST_HEAD = 8192  # bytes of request line and headers accepted
READ_TIMEOUT = 5.0  # seconds a client has to send its request
KVD_FRAME = b"KV"  # how a kvd frame starts: kvctl given this port as --host
SEND_TIMEOUT = 5.0  # seconds a client has to take the answer
# The port's budget (kvd.net.admission): scrapers and probes are few and quick. A connection
# is pending until its request head has arrived; a newcomer closes the oldest pending one, so
# silent sockets cannot keep /health from answering; beyond MAX_CONNECTIONS it is refused.
MAX_CONNECTIONS = 64
MAX_PENDING = 32


def unready_partitions(primaries: Callable[[int], list[str]], q: int, me: str,
                       up: set[str], quorum: int) -> tuple[int, int]:
    """(partitions this node replicates, how many of them have fewer than ``quorum`` replicas
    in ``up``). ``primaries(p)`` is the preference list of partition ``p``."""
    mine = short = 0
    for partition in range(q):
        replicas = primaries(partition)
        if me not in replicas:
            continue
        mine += 1
        if sum(1 for node in replicas if node in up) < quorum:
            short += 1
    return mine, short


class NodeMetrics:
    """The metrics registry of one node and the HTTP endpoint that serves it.

    Created before the node exists (so ``/health`` and ``/ready`` answer while storage and
    the ring load); ``attach(node)`` connects it once the node is built.
    """

    def __init__(self, config: Config):
        self.config = config
        self.node: Any = None
        # The Prometheus registry (kvd/metrics_export.py), built at the first scrape: a node
        # without a scraper never loads prometheus_client (a seventh of a daemon's start-up).
        self._registry: Any = None
        # Counted in plain integers, exported on scrape (kvd/metrics_counts.py).
        self.requests = counts.Histogram(
            "kvd_request_duration_seconds",
            "Time for the coordinator to answer a client request (R or W replicas reached), "
            "by operation and outcome.", ["op", "outcome"], LATENCY_BUCKETS)
        self.quorum_failures = counts.Counter(
            "kvd_quorum_failures", "Requests answered with 'quorum not reached'.", ["op"])
        self.siblings = counts.Histogram(
            "kvd_siblings", "Live siblings of each object read (found) or written.", ["op"],
            SIBLING_BUCKETS)
        self.resp_commands = counts.Histogram(
            "kvd_resp_command_duration_seconds",
            "Time to answer a command on the RESP port (resp_listen), by command and outcome "
            "(ok, or the error's first word in lower case).", ["command", "outcome"],
            LATENCY_BUCKETS)
        for op in ("get", "put", "delete"):
            self.requests.declare(op, "ok")
            self.quorum_failures.declare(op)
        for op in ("get", "put"):
            self.siblings.declare(op)
        self._blob_bytes = 0
        self._blob_bytes_at = -SIZE_CACHE_SECONDS
        self.security: Any = None  # kvd.security.Security, for the refusal counts
        self.admission: Admission | None = None  # the metrics port's own budget

    # ------------------------------------------------------------- wiring

    def attach(self, node: Any) -> None:
        """Start reporting on ``node`` (its ring is loaded) and observe its requests."""
        self.node = node
        node.coordinator.observer = self
        node.resp_observer = self

    def resp_command_finished(self, command: str, seconds: float, outcome: str) -> None:
        """kvd.node.resp_service's report of one command (its name is one it knows)."""
        self.resp_commands.observe((command, outcome[:32]), seconds)

    def request_finished(self, op: str, seconds: float, obj: versions.VersionedObject | None,
                         error: BaseException | None) -> None:
        """The coordinator's report of one request (kvd.node.coordinator.RequestObserver):
        its latency by outcome, and the live siblings of what a get found or a put wrote."""
        outcome = "ok"
        if error is None and op == "get" and (obj is None or not versions.is_found(obj)):
            outcome = "not_found"
        elif error is None and obj is not None and op in ("get", "put"):
            self.siblings.observe((op,), len(versions.live(obj)))
        elif isinstance(error, KvdError):
            outcome = error.code if error.code in OUTCOMES else "error"
        elif isinstance(error, trio.Cancelled):
            outcome = "cancelled"
        elif error is not None:
            outcome = "error"
        self.requests.observe((op, outcome), seconds)
        if outcome == "quorum":
            self.quorum_failures.inc((op,))

    # ------------------------------------------------------------- readiness

    def readiness(self) -> tuple[bool, str]:
        """(ready, one-line reason) as /ready reports it."""
        node = self.node
        if node is None:
            return False, "not ready: ring not loaded yet"
        if node.draining:
            return False, "not ready: shutting down"
        if node.storage.refusing_writes:
            return False, f"not ready: {node.storage.refusing_writes}"
        cluster = node.cluster
        if cluster.restore.restoring:
            return False, "not ready: restoring this node's replicas after a wipe"
        if cluster.restore.awaiting_join:
            return False, ("not ready: in no cluster yet, waiting for `kvctl cluster join` "
                           "(started with seeds)")
        state = cluster.state
        members = cluster.routing.member_count()
        n = min(self.config.n, members)
        quorum = min(max(self.config.r, self.config.w), n)
        up = {m for m in state.ring.nodes() if m == node.node_id or cluster.is_up(m)}
        mine, short = unready_partitions(lambda p: cluster.routing.primaries(p, n), state.ring.q,
                                         node.node_id, up, quorum)
        if short:
            return False, (f"not ready: {short} of {mine} partitions have fewer than {quorum} "
                           "reachable replicas")
        return True, (f"ready: ring version {state.ring.version}, {len(up)} of "
                      f"{len(state.ring.nodes())} nodes up, {mine} partitions replicated here")

    def describe(self) -> str:
        """The systemd STATUS= line."""
        ready, reason = self.readiness()
        return f"serving clients on {self.config.listen}; {reason}"

    # ------------------------------------------------------------- scraping

    async def refresh(self) -> None:
        """Update what must not be computed on the event loop (the blob directory walk)."""
        node = self.node
        if node is None:
            return
        now = node.clocks.monotonic()
        if now - self._blob_bytes_at >= SIZE_CACHE_SECONDS:
            self._blob_bytes_at = now
            self._blob_bytes = await trio.to_thread.run_sync(
                node.store.blobs.approximate_size, abandon_on_cancel=True)

    async def render(self) -> bytes:
        from kvd import metrics_export

        await self.refresh()
        if self._registry is None:
            self._registry = metrics_export.registry(self)
        return metrics_export.exposition(self._registry)

    # ------------------------------------------------------------- HTTP

    async def serve(self, listeners: list, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve /metrics, /health and /ready on ``listeners`` until cancelled."""
        log.info("metrics on http://%s/metrics", self.config.metrics_listen)
        limit = descriptor_budget(current_nofile(), {"metrics": MAX_CONNECTIONS})["metrics"]
        self.admission = Admission("metrics", limit, MAX_PENDING, MAX_PENDING,
                                   silence=READ_TIMEOUT)
        await serve_admitted(self._handle, listeners, self.admission, task_status=task_status)

    async def _handle(self, stream, ticket) -> None:
        if ticket is None:
            return  # full of requests being answered: closed at once, never queued
        try:
            async with stream:
                head = b""
                with trio.move_on_after(READ_TIMEOUT):
                    while b"\r\n\r\n" not in head and b"\n\n" not in head:
                        data = await stream.receive_some(4096)
                        if not data:
                            break
                        head += data
                        if len(head) > MAX_REQUEST_HEAD or head.startswith(KVD_FRAME):
                            break
                if not head:
                    return  # silent until the deadline, or closed: nothing to answer
                ticket.established()
                status, ctype, body, method = await self._respond(head)
                headers = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                           f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                           "Connection: close\r\n\r\n").encode()
                with trio.move_on_after(SEND_TIMEOUT):
                    await stream.send_all(headers + (b"" if method == "HEAD" else body))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _respond(self, head: bytes) -> tuple[str, str, bytes, str]:
        text = "text/plain; charset=utf-8"
        line = head.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split()
        if len(head) > MAX_REQUEST_HEAD:
            return "431 Request Header Fields Too Large", text, b"request too large\n", "GET"
        if head.startswith(KVD_FRAME):  # answered at once, naming the port to use instead
            return "400 Bad Request", text, (
                f"this is the metrics port (metrics_listen) of node {self.config.node_id}; "
                f"kvctl and clients use its client port {self.config.listen} (listen)\n"
            ).encode(), "GET"
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", text, b"bad request\n", "GET"
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", text, b"only GET and HEAD\n", "GET"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            from kvd.metrics_export import CONTENT_TYPE

            return "200 OK", CONTENT_TYPE, await self.render(), method
        if path == "/health":
            return "200 OK", text, b"ok\n", method
        if path == "/ready":
            ready, reason = self.readiness()
            status = "200 OK" if ready else "503 Service Unavailable"
            return status, text, (reason + "\n").encode(), method
        return "404 Not Found", text, b"not found: try /metrics, /health or /ready\n", method
