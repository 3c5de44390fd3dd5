"""The gossip task: heartbeats, failure detection and cluster-state spread (DESIGN section 5).

A thin trio shell around two pure values: the member table (kvd/membership/members.py:
heartbeats and phi accrual liveness) and the cluster state (kvd/membership/cluster_state.py:
ring, statuses, staged changes).  All decisions are theirs; this module only moves bytes.

Rules:

1. Every ``interval`` seconds (on a fixed schedule with a random phase, so that nodes
   started together do not gossip in lockstep) the gossiper ticks its own heartbeat, asks
   the table for targets (``choose_gossip_targets``: a random live peer, and sometimes a
   seed or a down node besides) and makes one push-pull exchange with each, at once:
   GOSSIP carries my digest, the GOSSIP_REPLY carries the target's digest, each side merges
   what it receives.
2. One exchange is bounded by ``interval``: a round never overlaps the next, and a peer
   behind a partition costs one round, not the task.  Any failure of an exchange (refused,
   reset, timed out, malformed reply, other cluster) is logged at debug and drops that
   connection; nothing kills the task.
3. The transport is given, never chosen here: a ``request(address, kind, fields, expect)``
   callable returning the reply's fields, the node's one peer client (``PeerPool.call``,
   over TCP in the daemon and over kvd.net.memory in the simulator).  Gossip is idempotent
   (merges), so a failed exchange is simply tried again next round.
4. The cluster state travels only when it may be news.  Each message carries my state's
   digest; the full state goes in a GOSSIP when the target's last known digest differs
   from mine, and in a GOSSIP_REPLY when the request's digest differs from the receiver's
   (after merging what came in).  ``cluster_state.merge`` (a semilattice) combines states,
   so any order of exchanges converges.  A node without a state adopts the first one it
   hears (it was started with ``--seeds`` and is joining).
5. States of different ``cluster_id``s never merge, and their members do not either: the
   exchange is refused with BadRequest before anything is merged.
6. Each peer node's last told digest is kept (``without_my_state``), from its requests and
   its replies alike: a leaving node stops, and a commit is made, only once every member
   up holds this node's state (kvd/node/cluster.py Rule 4, kvd/node/staging.py Rule 4).

The wire bodies (GOSSIP and GOSSIP_REPLY are free-form maps, see kvd/proto/messages.py):
``{"node": str, "cluster": str?, "members": [MemberInfo dict + "age"], "state_digest": str?,
"state": ClusterState dict?}``.

Peer connections are authenticated by the daemon's listener (HMAC on the cluster secret);
``serve_peer_connection`` below does only the HELLO version/role/cluster check and is what
the in-memory network serves.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import trio

from kvd.errors import (
    BadRequest,
    ConnectFailed,
    KvdError,
    ProtocolError,
)
from kvd.membership import cluster_state
from kvd.membership.cluster_state import ClusterState
from kvd.membership.members import MemberInfo, MemberTable
from kvd.net.connection import FrameConnection, run_handshake
from kvd.proto import codec
from kvd.proto.handshake import ServerHandshake
from kvd.proto.messages import DEFAULT_MAX_FRAME, MsgType

__all__ = ["Gossiper", "serve_peer_connection"]

log = logging.getLogger("kvd.gossip")

# request(address, kind, fields, expect) -> the reply's fields, ERROR replies raised: what the
# gossiper needs of a peer transport (kvd.net.peer.PeerPool.call has this signature).
Request = Callable[[str, MsgType, dict[str, Any], MsgType], Awaitable[dict[str, Any]]]

# A peer that opened a connection and sends no HELLO holds a task; this frees it.  Ten
# rounds at the default interval: far beyond any live peer's delay.
HANDSHAKE_TIMEOUT = 10.0

# What one exchange may raise without being a bug on our side (rule 2).
EXCHANGE_ERRORS = (KvdError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class Gossiper:
    """This node's gossip: its member table, its cluster state, and the task that spreads them."""

    def __init__(
        self,
        table: MemberTable,
        request: Request,
        *,
        state: ClusterState | None = None,
        seeds: Iterable[str] = (),
        interval: float = 1.0,
        rng: random.Random | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        load_bytes: Callable[[], int] | None = None,
        restoring: Callable[[], bool] | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if interval <= 0:
            raise ValueError("gossip interval must be > 0")
        self.table = table
        self.node = table.me
        self.seeds = tuple(seeds)
        self.interval = interval
        self.max_frame = max_frame
        self._request: Request = request
        self._clock = clock  # kvd.clocks: the monotonic clock phi accrual reads
        self._rng = rng if rng is not None else random.Random()
        self._state = state
        self._state_changed = trio.Event()
        # Rule 4: the state digest each peer address last told us.
        self._peer_digest: dict[str, str | None] = {}
        # Rule 6: the state digest each peer node last told us, in either direction.
        self._told_by_node: dict[str, str] = {}
        self._stats = {"rounds": 0, "exchanges": 0, "failures": 0, "received": 0}
        self._load_bytes = load_bytes
        self._restoring = restoring

    # --- queries ------------------------------------------------------------------------------

    @property
    def state(self) -> ClusterState | None:
        """The cluster state as this node knows it (None until it has heard one)."""
        return self._state

    def now(self) -> float:
        """The monotonic clock this gossiper reads."""
        return self._clock()

    def is_up(self, node: str) -> bool:
        """Whether this node judges ``node`` up now."""
        return self.table.is_up(node, self._clock())

    def up_nodes(self) -> set[str]:
        """Every node this node judges up now, itself included."""
        return self.table.up_nodes(self._clock())

    def members(self) -> list[MemberInfo]:
        """Every record in the member table, sorted by node."""
        return self.table.all()

    def statistics(self) -> dict[str, int]:
        """Counters: rounds run, exchanges completed and failed, gossip received."""
        return dict(self._stats)

    def without_my_state(self, nodes: Iterable[str]) -> list[str]:
        """Those of ``nodes`` that have not told me they hold my current state (rule 6)."""
        mine = self._digest()
        return [n for n in nodes if n != self.node and self._told_by_node.get(n) != mine]

    async def wait_state(self, predicate: Callable[[ClusterState], bool]) -> ClusterState:
        """Wait until the cluster state satisfies ``predicate``; return that state."""
        while self._state is None or not predicate(self._state):
            await self._state_changed.wait()
        return self._state

    async def wait_state_version(self, version: int) -> ClusterState:
        """Wait until the cluster state's version is at least ``version``."""
        return await self.wait_state(lambda s: s.version >= version)

    # --- changing the state -------------------------------------------------------------------

    def publish(self, state: ClusterState) -> ClusterState:
        """Make ``state`` (derived from ``self.state`` by the claimant or a staging call) known.

        It is merged into the current state, so publishing something older is harmless;
        returns the resulting state, which gossip then spreads.
        """
        self._adopt(state)
        assert self._state is not None
        return self._state

    def replace_state(self, state: ClusterState) -> None:
        """Take another cluster's state as ours: only for a node that has just joined that
        cluster (its own one-node cluster held no data; the caller checked)."""
        self._state = None
        self._peer_digest.clear()
        self._told_by_node.clear()
        self._adopt(state)

    def _adopt(self, incoming: ClusterState) -> None:
        mine = self._state
        if mine is None:
            new = incoming
        else:
            new = cluster_state.merge(mine, incoming)
            if new.digest() == mine.digest():
                return
        self._state = new
        log.debug("%s: cluster state now version %d (ring %d)", self.node, new.version, new.ring.version)
        self._state_changed.set()
        self._state_changed = trio.Event()

    # --- the task -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Gossip every ``interval`` seconds until cancelled (rule 1)."""
        task_status.started()
        next_round = self._clock() + self._rng.random() * self.interval
        while True:
            await trio.sleep_until(next_round)
            await self.gossip_round()
            next_round = max(next_round + self.interval, self._clock())

    async def gossip_round(self) -> None:
        """One round: heartbeat, then an exchange with each chosen target (never raises)."""
        self._stats["rounds"] += 1
        now = self._clock()
        ring_version = None if self._state is None else self._state.ring.version
        load = None if self._load_bytes is None else self._load_bytes()
        restoring = None if self._restoring is None else self._restoring()
        self.table.tick(now, ring_version=ring_version, load_bytes=load, restoring=restoring)
        self._log_changes(self.table.check(now))
        async with trio.open_nursery() as nursery:
            for target in self.table.choose_gossip_targets(now, self._rng, self.seeds):
                nursery.start_soon(self._exchange_in_round, target)

    async def _exchange_in_round(self, target: str) -> None:
        """One exchange of a round, bounded by the interval (never raises)."""
        with trio.move_on_after(self.interval) as scope:
            try:
                await self.exchange(target)
            except EXCHANGE_ERRORS as exc:
                self._stats["failures"] += 1
                log.debug("%s: gossip with %s failed: %s", self.node, target, exc)
            except Exception:
                # Rule 2 even for a bug: log it loudly, keep gossiping.
                self._stats["failures"] += 1
                log.exception("%s: gossip with %s failed unexpectedly", self.node, target)
        if scope.cancelled_caught:
            self._stats["failures"] += 1
            log.debug("%s: gossip with %s timed out", self.node, target)

    async def exchange(self, address: str) -> None:
        """One push-pull exchange with the peer at ``address``; raises what went wrong."""
        ok = False
        try:
            mine = self._digest()
            fields = self._fields(self._clock())
            if mine is not None and self._peer_digest.get(address) != mine:
                fields["state"] = self._state.to_dict()  # type: ignore[union-attr]
            reply = await self._request(address, MsgType.GOSSIP, fields, MsgType.GOSSIP_REPLY)
            self._absorb(reply, self._clock())
            digest = reply.get("state_digest")
            self._peer_digest[address] = digest if isinstance(digest, str) else None
            self._note_told(reply)
            self._stats["exchanges"] += 1
            ok = True
        finally:
            if not ok:
                # Whatever the peer knew may have changed (restart): send the full state next time.
                self._peer_digest.pop(address, None)

    # --- the receiving side -------------------------------------------------------------------

    def check_cluster(self, cluster: object) -> None:
        """Refuse a peer of another cluster (rule 5): BadRequest."""
        if cluster is None or self._state is None:
            return
        if cluster != self._state.cluster_id:
            raise BadRequest(f"cluster id mismatch: {self._state.cluster_id} != {cluster}")

    def handle_gossip(self, fields: Mapping[str, Any], now: float) -> dict[str, Any]:
        """Merge a received GOSSIP body and return the GOSSIP_REPLY body (push-pull).

        BadRequest when the body is malformed or comes from another cluster.  A foreign or
        malformed state refuses the whole message; a malformed member record stops the
        merge at that record (the records before it are independent facts and stay).
        """
        self._absorb(fields, now)
        self._note_told(fields)
        reply = self._fields(now)
        mine = reply.get("state_digest")
        if mine is not None and fields.get("state_digest") != mine:
            reply["state"] = self._state.to_dict()  # type: ignore[union-attr]
        return reply

    def _fields(self, now: float) -> dict[str, Any]:
        fields: dict[str, Any] = {"node": self.node, "members": self.table.digest(now)}
        if self._state is not None:
            fields["cluster"] = self._state.cluster_id
            fields["state_digest"] = self._state.digest()
        return fields

    def _note_told(self, fields: Mapping[str, Any]) -> None:
        node, digest = fields.get("node"), fields.get("state_digest")
        if isinstance(node, str) and isinstance(digest, str):
            self._told_by_node[node] = digest

    def _digest(self) -> str | None:
        return None if self._state is None else self._state.digest()

    def _absorb(self, fields: Mapping[str, Any], now: float) -> None:
        """Check the cluster and the state first (rule 5), then merge members and state."""
        self.check_cluster(fields.get("cluster"))
        members = fields.get("members")
        if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
            raise BadRequest("gossip without a list of member records")
        incoming = None
        raw_state = fields.get("state")
        if raw_state is not None:
            if not isinstance(raw_state, dict):
                raise BadRequest("gossip state is not a map")
            try:
                incoming = ClusterState.from_dict(raw_state)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise BadRequest(f"malformed cluster state: {exc}") from None
            if self._state is not None and incoming.cluster_id != self._state.cluster_id:
                raise BadRequest(f"cluster id mismatch: {self._state.cluster_id} != {incoming.cluster_id}")
        self._stats["received"] += 1
        try:
            self._log_changes(self.table.merge(members, now))
        except (KeyError, TypeError, ValueError) as exc:
            # The records before the bad one were merged: each is a fact on its own.
            problem = str(exc) if isinstance(exc, ValueError) else f"malformed member record: {exc!r}"
            raise BadRequest(problem) from None
        if incoming is not None:
            self._adopt(incoming)

    def _log_changes(self, changed: list[str]) -> None:
        now = self._clock()
        for node in changed:
            log.info("%s: %s is %s", self.node, node, "up" if self.table.is_up(node, now) else "down")


async def _receive(conn: FrameConnection, address: str) -> codec.Message:
    message = await conn.receive()
    if message is None:
        raise ConnectFailed(f"{address} closed the connection")
    return message


async def serve_peer_connection(stream: trio.abc.Stream, gossiper: Gossiper) -> None:
    """Serve one accepted peer connection: HELLO, then answer GOSSIP frames until it closes.

    Errors in a request are answered with ERROR and the connection goes on; a protocol
    error or a refused HELLO closes it.  Never raises for what the peer does.
    """
    conn = FrameConnection(stream)
    machine = ServerHandshake(
        "peer", gossiper.node, max_frame=gossiper.max_frame,
        authorize=lambda hello: gossiper.check_cluster(hello.fields.get("cluster")))
    try:
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
            try:
                done = await run_handshake(stream, machine)
            except (ProtocolError, BadRequest) as exc:
                await _send_error(conn, machine.hello.request_id if machine.hello else 0, exc)
                raise ProtocolError(f"refused HELLO: {exc}") from None
        if scope.cancelled_caught:
            log.debug("%s: no HELLO within %s s", gossiper.node, HANDSHAKE_TIMEOUT)
            return
        await conn.finish_handshake(machine, done)
        conn.max_frame = gossiper.max_frame
        while True:
            message = await conn.receive()
            if message is None:
                return
            if message.type == MsgType.GOSSIP:
                try:
                    reply = gossiper.handle_gossip(message.fields, gossiper.now())
                except BadRequest as exc:
                    await _send_error(conn, message.request_id, exc)
                    continue
                await conn.send(codec.encode(MsgType.GOSSIP_REPLY, message.request_id, reply))
            else:
                refusal = BadRequest(f"{message.type.name} is not served on this connection")
                await _send_error(conn, message.request_id, refusal)
    except (ProtocolError, ConnectFailed) as exc:
        log.debug("%s: peer connection closed: %s", gossiper.node, exc)
    except Exception:
        # A bug in one connection's handling must not take the node down.
        log.exception("%s: peer connection handler failed", gossiper.node)
    finally:
        await conn.aclose()


async def _send_error(conn: FrameConnection, request_id: int, exc: KvdError) -> None:
    await conn.send(codec.encode(MsgType.ERROR, request_id, {"code": exc.code, "message": str(exc)}))
