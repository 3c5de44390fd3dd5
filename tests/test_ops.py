"""Issue 6, "Must show": kvd as an operated service.

- sd_notify against a real AF_UNIX datagram socket: READY=1 only once the client port
  accepts, WATCHDOG=1 at half WATCHDOG_USEC, RELOADING=1/READY=1 on SIGHUP, STOPPING=1 on
  SIGTERM;
- /metrics parsed by prometheus_client's own parser, every metric moving with its source;
  /ready 503 before the ring is loaded and while a quorum is unreachable, 200 otherwise;
- SIGHUP reload of what can be reloaded, naming what cannot;
- logs: one line per event with a level journald understands, no secrets;
- systemd unit (systemd-analyze verify and security), man pages (mandoc/groff lint,
  completeness against the typer app, kvd's flags and the Config model), and the Debian
  package built by `make deb`, extracted into a throwaway root and run.

Tools come from `make ops-tools`; a test whose tool is missing is skipped with the reason.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from kvd.clocks import REAL
from kvd import metrics as kvd_metrics
from kvd import systemd as kvd_systemd
from kvd.client import SyncClient, open_client
from kvd.config import Config
from kvd.errors import ConnectFailed, QuorumFailed, Unavailable
from tests.procs import ROOT, KvdProcess, free_port, wait_port

# ----------------------------------------------------------------------------- helpers


class OpsNode(KvdProcess):
    """A kvd process with a metrics port and extra environment (NOTIFY_SOCKET, ...)."""

    def __init__(self, data_dir: Path, env: dict | None = None, **kwargs):
        super().__init__(data_dir, **kwargs)
        self.metrics_port = free_port()
        self.env = dict(env or {})

    def start(self, wait: bool = True) -> "OpsNode":
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("KVD_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC",
                                                          "WATCHDOG_PID", "JOURNAL_STREAM")}
        env.update({"PYTHONUNBUFFERED": "1",
                    "KVD_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}", **self.env})
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvd.main", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        log.close()
        if wait:
            wait_port(self.port, proc=self.proc)
        return self

    def http(self, path: str) -> tuple[int, str]:
        return http_get(self.metrics_port, path)

    def scrape(self) -> dict:
        status, text = self.http("/metrics")
        assert status == 200, text
        return samples(text)


def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict:
    """{(sample name, sorted label items): value}, parsed by prometheus_client itself."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(scraped: dict, name: str, **labels) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(what: str, check, timeout: float = 20.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        ok, last = check()
        if ok:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last seen: {last!r}")


@pytest.fixture
def nodes():
    """Every process a test starts; SIGKILLed at teardown whatever happened."""
    started: list[OpsNode] = []
    yield started
    for node in started:
        try:
            node.kill()
        except Exception:  # noqa: BLE001 - keep killing the others
            pass


# ----------------------------------------------------------------------------- sd_notify


class NotifySocket:
    """The receiving end systemd would hold: an AF_UNIX datagram socket."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, str]] = []

    def receive(self, timeout: float) -> str | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        self.messages.append((time.monotonic(), data.decode()))
        return data.decode()

    def wait(self, field: str, timeout: float = 20.0) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.receive(max(0.01, deadline - time.monotonic()))
            if message is not None and field in message.split("\n"):
                return self.messages[-1]
        raise AssertionError(f"no {field} within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_notify_ready_after_port_accepts_then_watchdog_reload_and_stopping(tmp_path, nodes):
    notify = NotifySocket(tmp_path / "notify.sock")
    watchdog_usec = 400_000  # pings expected every 0.2 s
    node = OpsNode(tmp_path / "n1" / "data", env={
        "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(watchdog_usec)})
    nodes.append(node)
    node.start(wait=False)
    try:
        # The first READY=1 must find the client port open: kvd is frozen (SIGSTOP) the
        # moment it arrives, so a READY sent before listen() would meet a refused connect.
        _, ready = notify.wait("READY=1")
        node.proc.send_signal(signal.SIGSTOP)
        try:
            assert port_accepts(node.port), "READY=1 sent before the client port accepts"
        finally:
            node.proc.send_signal(signal.SIGCONT)
        fields = dict(line.split("=", 1) for line in ready.split("\n"))
        assert fields["MAINPID"] == str(node.proc.pid)
        assert fields["STATUS"].startswith(f"serving clients on {node.address}; ready")
        assert node.http("/ready")[0] == 200

        # Watchdog: the daemon keeps pinging (the schedule itself, every WATCHDOG_USEC / 2,
        # is timed exactly on the autojump clock in test_watchdog_pings_every_half_interval).
        notify.messages.clear()
        for _ in range(3):
            notify.wait("WATCHDOG=1")

        # SIGHUP: RELOADING=1 (with MONOTONIC_USEC), then READY=1 again; still serving.
        notify.messages.clear()
        node.proc.send_signal(signal.SIGHUP)
        _, reloading = notify.wait("RELOADING=1")
        assert re.search(r"^MONOTONIC_USEC=\d+$", reloading, re.M), reloading
        notify.wait("READY=1")
        assert node.proc.poll() is None and port_accepts(node.port)

        # SIGTERM: STOPPING=1, then a clean exit.
        node.proc.send_signal(signal.SIGTERM)
        notify.wait("STOPPING=1")
        assert node.proc.wait(30) == 0
    finally:
        notify.close()
    log = node.log_text()
    assert "received SIGTERM: draining" in log and "stopped cleanly" in log, log


def test_notifier_without_socket_is_a_no_op_and_handles_abstract_names(tmp_path):
    quiet = kvd_systemd.Notifier({})
    assert not quiet.enabled and quiet.notify("READY=1") is False
    assert quiet.watchdog_interval is None
    assert kvd_systemd.Notifier({"WATCHDOG_USEC": "3000000"}).watchdog_interval == 1.5
    other_pid = kvd_systemd.Notifier({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"})
    assert other_pid.watchdog_interval is None
    mine = kvd_systemd.Notifier({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval == 1.5

    name = f"kvd-test-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    try:
        sender = kvd_systemd.Notifier({"NOTIFY_SOCKET": "@" + name})
        assert sender.notify("STATUS=a\nb", "READY=1")
        receiver.settimeout(5)
        assert receiver.recv(100) == b"STATUS=a b\nREADY=1"  # one datagram, newline-safe
        sender.close()
    finally:
        receiver.close()
    gone = kvd_systemd.Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})
    assert gone.notify("READY=1") is False  # logged once, never raised


async def test_watchdog_pings_every_half_interval(autojump_clock):
    """WATCHDOG=1 at once, then every WATCHDOG_USEC / 2 exactly, never later: systemd
    would never fire. Simulated time, so the machine's load cannot move the pings."""
    notifier = kvd_systemd.Notifier({"NOTIFY_SOCKET": "@kvd-test-unused",
                                     "WATCHDOG_USEC": "400000"})
    pings: list[float] = []
    notifier.notify = lambda *fields: pings.append(trio.current_time()) or True
    start = trio.current_time()
    with trio.move_on_after(1.7):
        await notifier.run_watchdog()
    assert [round(t - start, 6) for t in pings] == [round(0.2 * i, 6) for i in range(9)]


def admin(node: OpsNode, **fields) -> dict:
    async def call():
        async with open_client(node.address) as client:
            return await client.admin(fields)

    return trio.run(call)


@pytest.mark.slow
def test_two_nodes_ready_quorum_hints_and_failures_on_metrics(tmp_path, nodes):
    """/ready follows the reachable quorum; hints and quorum failures move end to end."""
    fast = {"gossip_interval": 0.2}
    n1 = OpsNode(tmp_path / "n1" / "data", node_id="n1", extra=fast)
    nodes.append(n1)
    n1.start()
    n2 = OpsNode(tmp_path / "n2" / "data", node_id="n2", extra=fast, seeds=[n1.peer_address])
    nodes.append(n2)
    n2.start()
    assert admin(n2, op="join", seed=n1.peer_address)["staged"] == "join n2"
    admin(n1, op="commit")

    def ready(node):
        status, body = node.http("/ready")
        return status == 200 and "2 of 2 nodes up" in body, body

    def formed():
        rows = admin(n1, op="transfers")["transfers"]
        return rows == [] and ready(n1)[0] and ready(n2)[0], rows

    wait_for("a formed two-node cluster", formed, timeout=60, interval=0.2)
    assert value(n1.scrape(), "kvd_cluster_nodes", state="up") == 2

    n2.kill()  # N=2 (capped by the cluster size), R=W=2: no partition of n1 has a quorum
    body = wait_for("n1 not ready", lambda: (n1.http("/ready")[0] == 503, n1.http("/ready")),
                    timeout=30)
    assert "partitions have fewer than 2 reachable replicas" in n1.http("/ready")[1], body
    before = n1.scrape()
    assert value(before, "kvd_ready") == 0
    assert value(before, "kvd_cluster_nodes", state="down") == 1

    client = SyncClient(n1.address)
    for i in range(10):
        assert client.put(f"h{i}".encode(), b"v", w=1).replicas == 1  # hinted for n2
    with pytest.raises(QuorumFailed):
        client.put(b"needs-two", b"v", w=2)
    during = n1.scrape()
    # 11: the refused W=2 write is on n1 and hinted too; it just did not reach W.
    assert value(during, "kvd_hints_pending") - value(before, "kvd_hints_pending") == 11
    assert value(during, "kvd_hints_pending_by_node", target="n2") == 11
    assert value(during, "kvd_quorum_failures_total", op="put") == 1
    assert value(during, "kvd_request_duration_seconds_count", op="put", outcome="quorum") == 1

    n2.start()
    wait_for("n1 ready again", lambda: ready(n1), timeout=30)

    def handed_off():
        scraped = n1.scrape()
        return (value(scraped, "kvd_hints_pending") == 0
                and value(scraped, "kvd_hints_delivered_total") == 11), scraped

    wait_for("hints delivered", handed_off, timeout=30, interval=0.3)


# ----------------------------------------------------------------------------- reload


def test_sighup_reloads_log_level_and_throttles_and_names_the_rest(tmp_path, nodes):
    node = OpsNode(tmp_path / "n1" / "data", extra={"transfer_rate_mb": 50.0,
                                                            "idle_timeout": 0.3})
    nodes.append(node)
    node.start()
    config = node.data_dir.parent / "n1.toml"
    base = config.read_text()

    def hup_and_wait(marker: str, count: int = 1) -> str:
        node.proc.send_signal(signal.SIGHUP)
        return wait_for(marker, lambda: (node.log_text().count(marker) >= count,
                                         node.log_text()))

    config.write_text(base.replace("transfer_rate_mb = 50.0", "transfer_rate_mb = 5.5")
                      + 'log_level = "debug"\nn = 5\nhint_window = 60.0\n')
    # The warning is the reload's last line, written after "reloaded:" (waiting for that one
    # alone, a log read between the two writes missed the warning).
    log = hup_and_wait("reload: not applied")
    reloaded = next(line for line in log.splitlines() if "reloaded:" in line)
    assert re.match(r"\S+Z INFO kvd\.systemd: reloaded: ", reloaded), reloaded
    for change in ("log_level = 'debug'", "transfer_rate_mb = 5.5", "hint_window = 60.0"):
        assert change in reloaded, reloaded
    assert "WARNING kvd.systemd: reload: not applied, restart kvd to change: n" in log, log
    # log_level took effect: debug lines now appear (an idle connection being closed).
    async def idle_connection():
        async with open_client(node.address) as client:
            await client.status()
            await trio.sleep(1.0)

    try:
        trio.run(idle_connection)
    except ConnectFailed:  # the server closing it first is the point
        pass
    wait_for("a DEBUG line", lambda: ("DEBUG " in node.log_text(), node.log_text()[-500:]))

    config.write_text(base + "n = [\n")  # broken TOML: nothing changes, still serving
    log = hup_and_wait("reload failed, nothing changed")
    assert "invalid TOML" in log, log
    assert node.proc.poll() is None
    assert SyncClient(node.address).put(b"k", b"v").replicas == 1
    assert node.stop() == 0


def test_apply_reload_changes_only_reloadable_keys():
    node = SimpleNamespace(config=Config(data_dir=":memory:"), coordinator=FakeCoordinator())
    new = Config(data_dir=":memory:", read_repair=False, transfer_limit=7, r=1,
                 listen="127.0.0.1:9999")
    applied, refused = kvd_systemd.apply_reload(node, new)
    assert applied == {"transfer_limit": 7, "read_repair": False}
    assert refused == ["listen", "r"]
    assert node.config.transfer_limit == 7 and node.coordinator.read_repair is False
    assert node.config.r == 2 and node.config.listen == "127.0.0.1:7379"
    for key in kvd_systemd.RELOADABLE:
        assert key in Config.model_fields, key


# ----------------------------------------------------------------------------- logs

LOG_LINE = re.compile(r"^<([0-7])>(DEBUG|INFO|WARNING|ERROR|CRITICAL) kvd[\w.]*: \S.*$")
PRIORITY = {"DEBUG": "7", "INFO": "6", "WARNING": "4", "ERROR": "3", "CRITICAL": "2"}


def test_logs_one_line_per_event_with_journald_priorities_and_no_secrets(tmp_path, nodes):
    secret = "s3cr3t-cluster-value-7a1b9c2d4e"
    token = "tok-1234567890abcdef-app"
    secret_file = tmp_path / "cluster.secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(f'[tokens]\napp = {{ token = "{token}", role = "admin" }}\n')
    tokens_file.chmod(0o600)
    node = OpsNode(tmp_path / "n1" / "data", env={"JOURNAL_STREAM": "8:12345"},
                   extra={"log_level": "debug", "cluster_secret_file": str(secret_file),
                          "client_tokens_file": str(tokens_file)})
    nodes.append(node)
    node.start()
    SyncClient(node.address, token=token).put(b"k", b"v")
    with pytest.raises(Exception):
        SyncClient(node.address, token="wrong-token-but-long-enough").get(b"k")
    node.proc.send_signal(signal.SIGHUP)
    wait_for("reload", lambda: ("reloaded" in node.log_text(), node.log_text()))
    assert node.stop() == 0
    lines = node.log_text().splitlines()
    assert len(lines) >= 5, lines
    for line in lines:
        match = LOG_LINE.match(line)
        assert match, f"not a journald line: {line!r}"
        assert PRIORITY[match.group(2)] == match.group(1), line
        assert secret not in line and token not in line, line
    text = "\n".join(lines)
    assert "<6>INFO kvd.server: received SIGTERM: draining" in text
    assert "<4>WARNING kvd.security: refused client connection from 127.0.0.1" in text, text


# ----------------------------------------------------------------------------- metrics


def test_metrics_parse_and_move_with_requests(tmp_path, nodes):
    node = OpsNode(tmp_path / "n1" / "data")
    nodes.append(node)
    node.start()
    assert node.http("/health") == (200, "ok\n")
    assert node.http("/nope")[0] == 404
    assert http_get(node.metrics_port, "/metrics", method="HEAD") == (200, "")
    before = node.scrape()
    for name in ("kvd_request_duration_seconds_count", "kvd_quorum_failures_total"):
        for op in ("get", "put", "delete"):
            assert (name, (("op", op),) + ((("outcome", "ok"),) if "duration" in name else ())) \
                in before, (name, op)

    client = SyncClient(node.address)
    for i in range(5):
        client.put(f"k{i}".encode(), b"x" * 1000)
    client.put(b"k0", b"concurrent", blind=True)  # a second sibling
    for i in range(3):
        assert client.get(f"k{i}".encode()).found
    assert not client.get(b"missing").found
    client.delete(b"k4")
    after = node.scrape()

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("kvd_request_duration_seconds_count", op="put", outcome="ok") == 6
    assert moved("kvd_request_duration_seconds_count", op="get", outcome="ok") == 3
    assert moved("kvd_request_duration_seconds_count", op="get", outcome="not_found") == 1
    assert moved("kvd_request_duration_seconds_count", op="delete", outcome="ok") == 1
    assert moved("kvd_request_duration_seconds_sum", op="put", outcome="ok") > 0
    assert moved("kvd_request_duration_seconds_bucket", op="put", outcome="ok", le="+Inf") == 6
    assert moved("kvd_siblings_count", op="put") == 6
    assert moved("kvd_siblings_sum", op="get") == 2 + 1 + 1  # k0 has two siblings
    assert moved("kvd_siblings_bucket", op="get", le="1.0") == 2
    assert moved("kvd_requests_total") == 11
    assert moved("kvd_connections_total") == 11  # SyncClient: one connection per call
    assert value(after, "kvd_storage_bytes", kind="leveldb") > 0
    assert value(after, "kvd_ready") == 1
    assert value(after, "kvd_ring_partitions") == 1024
    assert value(after, "kvd_partitions_owned") == 1024
    assert value(after, "kvd_cluster_nodes", state="up") == 1
    assert value(after, "process_resident_memory_bytes") > 0
    assert value(after, "kvd_info", node="n1", version=kvd_version()) == 1


def kvd_version() -> str:
    from kvd._version import version

    return version()


class FakeCoordinator:
    """Canned answers, reported to the observer as kvd.node.coordinator reports them."""

    def __init__(self):
        self.read_repairs = 0
        self.read_repair = True
        self.fail: Exception | None = None
        self.obj = None
        self.observer = None  # NodeMetrics.attach sets itself here

    async def get(self, key, n, r):
        return self._answer("get", SimpleNamespace(obj=self.obj, replicas=1, source=None))

    async def put(self, key, context, n, w, **kwargs):
        op = "delete" if kwargs.get("deleted") else "put"
        return self._answer(op, SimpleNamespace(obj=self.obj, replicas=1))

    def _answer(self, op, result):
        if self.fail:
            self.observer.request_finished(op, 0.001, None, self.fail)
            raise self.fail
        self.observer.request_finished(op, 0.001, result.obj, None)
        return result


def fake_node(q: int = 8) -> SimpleNamespace:
    """Every source the collector reads, as plain attributes a test can move."""
    from kvd.node.antientropy import RepairStats
    from kvd.ring import Ring
    from kvd.server import Counters

    ring = Ring(q=q, owners=tuple("me" if p % 2 else "peer" for p in range(q)), version=3)
    up = {"me", "peer"}
    hints: dict[str, int] = {}
    cluster = SimpleNamespace(
        state=SimpleNamespace(ring=ring, pending=[]), is_up=lambda m: m in up, hints=hints,
        restore=SimpleNamespace(restoring=False, awaiting_join=False),
        handoff=SimpleNamespace(delivered=0, pending=lambda: dict(hints)),
        transfers=SimpleNamespace(progress={"keys_done": 0, "bytes_done": 0, "state": "idle"}),
        routing=SimpleNamespace(
            member_count=lambda: 2,
            primaries=lambda p, n: [ring.owners[p], ring.owners[(p + 1) % q]][:n]))
    sizes = {"leveldb": 0, "blobs": 0}
    return SimpleNamespace(
        node_id="me", draining=False, in_flight=0, counters=Counters(), clocks=REAL,
        coordinator=FakeCoordinator(), cluster=cluster, up=up, sizes=sizes,
        aae=SimpleNamespace(totals=RepairStats()),
        storage=SimpleNamespace(approximate_size=lambda: sizes["leveldb"], refusing_writes=None),
        store=SimpleNamespace(damaged_found=0, blobs=SimpleNamespace(
            approximate_size=lambda: sizes["blobs"], damaged_found=0)))


def _pending_move():
    return SimpleNamespace(partition=1, source="peer", target="me")


# (metric sample, labels, how to move its source): each must change the scraped value.
MOVES = [
    ("kvd_requests_total", {}, lambda n: setattr(n.counters, "requests", 7)),
    ("kvd_request_errors_total", {}, lambda n: setattr(n.counters, "errors", 2)),
    ("kvd_connections_total", {}, lambda n: setattr(n.counters, "connections", 4)),
    ("kvd_connections_rejected_total", {},
     lambda n: setattr(n.counters, "rejected_connections", 1)),
    ("kvd_protocol_errors_total", {}, lambda n: setattr(n.counters, "protocol_errors", 1)),
    ("kvd_requests_in_flight", {}, lambda n: setattr(n, "in_flight", 3)),
    ("kvd_read_repairs_total", {}, lambda n: setattr(n.coordinator, "read_repairs", 5)),
    ("kvd_hints_pending", {}, lambda n: n.cluster.hints.update(peer=9)),
    ("kvd_hints_pending_by_node", {"target": "peer"}, lambda n: n.cluster.hints.update(peer=9)),
    ("kvd_hints_delivered_total", {}, lambda n: setattr(n.cluster.handoff, "delivered", 11)),
    ("kvd_transfers_in_progress", {}, lambda n: n.cluster.transfers.progress.update(
        state="running", partitions_left=2)),
    ("kvd_transfers_pending", {}, lambda n: n.cluster.state.pending.append(_pending_move())),
    ("kvd_transfer_bytes", {}, lambda n: n.cluster.transfers.progress.update(bytes_done=100)),
    ("kvd_transfer_keys", {}, lambda n: n.cluster.transfers.progress.update(keys_done=10)),
    ("kvd_anti_entropy_segments_repaired_total", {},
     lambda n: setattr(n.aae.totals, "segments_differing", 6)),
    ("kvd_anti_entropy_keys_repaired_total", {},
     lambda n: setattr(n.aae.totals, "keys_repaired", 6)),
    ("kvd_anti_entropy_partitions_exchanged_total", {},
     lambda n: setattr(n.aae.totals, "partitions", 6)),
    ("kvd_anti_entropy_tombstones_purged_total", {},
     lambda n: setattr(n.aae.totals, "tombstones_purged", 6)),
    ("kvd_damaged_copies_total", {"kind": "object"},
     lambda n: setattr(n.store, "damaged_found", 2)),
    ("kvd_damaged_copies_total", {"kind": "blob"},
     lambda n: setattr(n.store.blobs, "damaged_found", 1)),
    ("kvd_storage_bytes", {"kind": "leveldb"}, lambda n: n.sizes.update(leveldb=4096)),
    ("kvd_storage_bytes", {"kind": "blobs"}, lambda n: n.sizes.update(blobs=1 << 20)),
    ("kvd_cluster_nodes", {"state": "down"}, lambda n: n.up.discard("peer")),
    ("kvd_ready", {}, lambda n: setattr(n, "draining", True)),
]


@pytest.mark.parametrize("name, labels, move", MOVES, ids=[f"{m[0]}{m[1] or ''}" for m in MOVES])
async def test_each_metric_follows_its_source(name, labels, move):
    metrics = kvd_metrics.NodeMetrics(Config(data_dir=":memory:", n=2, r=1, w=1))
    node = fake_node()
    metrics.attach(node)
    before = value(samples((await metrics.render()).decode()), name, **labels)
    move(node)
    metrics._blob_bytes_at = -1e9  # the blob size is cached; a scrape 10 s later sees it
    after = value(samples((await metrics.render()).decode()), name, **labels)
    assert after != before, (name, labels, before)


async def test_request_outcomes_quorum_failures_and_siblings():
    metrics = kvd_metrics.NodeMetrics(Config(data_dir=":memory:"))
    node = fake_node()
    metrics.attach(node)
    coordinator = node.coordinator
    await coordinator.get(b"k", 1, 1)  # obj None: not found
    coordinator.fail = QuorumFailed("read quorum not reached")
    for call in (coordinator.get(b"k", 3, 2), coordinator.put(b"k", None, 3, 2, value=b"v"),
                 coordinator.put(b"k", None, 3, 2, deleted=True)):
        with pytest.raises(QuorumFailed):
            await call
    coordinator.fail = Unavailable("shutting down")
    with pytest.raises(Unavailable):
        await coordinator.put(b"k", None, 3, 2, value=b"v")
    coordinator.fail = RuntimeError("a bug")
    with pytest.raises(RuntimeError):
        await coordinator.get(b"k", 3, 2)
    coordinator.fail = None
    scraped = samples((await metrics.render()).decode())
    count = "kvd_request_duration_seconds_count"
    assert value(scraped, count, op="get", outcome="not_found") == 1
    assert value(scraped, count, op="get", outcome="quorum") == 1
    assert value(scraped, count, op="put", outcome="quorum") == 1
    assert value(scraped, count, op="delete", outcome="quorum") == 1
    assert value(scraped, count, op="put", outcome="unavailable") == 1
    assert value(scraped, count, op="get", outcome="error") == 1
    for op in ("get", "put", "delete"):
        assert value(scraped, "kvd_quorum_failures_total", op=op) == 1
    outcomes = {dict(labels)["outcome"] for (name, labels) in scraped if name == count}
    assert outcomes <= set(kvd_metrics.OUTCOMES)


def test_unready_partitions_table():
    def primaries(p):
        return [["a", "b", "c"][(p + i) % 3] for i in range(3)]  # N=3 distinct nodes

    assert kvd_metrics.unready_partitions(primaries, 8, "a", {"a", "b", "c"}, 2) == (8, 0)
    assert kvd_metrics.unready_partitions(primaries, 8, "a", {"a", "b"}, 2) == (8, 0)
    assert kvd_metrics.unready_partitions(primaries, 8, "a", {"a"}, 2) == (8, 8)
    assert kvd_metrics.unready_partitions(primaries, 8, "a", {"a"}, 1) == (8, 0)
    assert kvd_metrics.unready_partitions(lambda p: ["b", "c"], 8, "a", {"a"}, 2) == (0, 0)


async def test_ready_is_503_until_the_ring_is_loaded_then_200(tmp_path, monkeypatch):
    """The real serve(): its metrics endpoint answers while the ring loads (held back here
    the way a slow disk would), and /ready turns 200 only once the node has its ring."""
    from kvd import server
    from kvd.node.cluster import Cluster

    release = trio.Event()
    real_load = Cluster.load

    async def slow_load(self):
        await release.wait()
        await real_load(self)

    monkeypatch.setattr(Cluster, "load", slow_load)
    port = free_port()
    config = Config(data_dir=":memory:", node_id="r1", listen="127.0.0.1:0",
                    peer_listen="127.0.0.1:0", metrics_listen=f"127.0.0.1:{port}")

    async def get(path):
        return await trio.to_thread.run_sync(http_get, port, path)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, config)
        with trio.fail_after(20):
            while True:
                try:
                    health = await get("/health")
                    break
                except OSError:
                    await trio.sleep(0.02)
        assert health == (200, "ok\n")
        assert await get("/ready") == (503, "not ready: ring not loaded yet\n")
        assert value(samples((await get("/metrics"))[1]), "kvd_ready") == 0
        release.set()
        with trio.fail_after(20):
            while (await get("/ready"))[0] != 200:
                await trio.sleep(0.02)
        status, body = await get("/ready")
        assert body.startswith("ready: ring version 1, 1 of 1 nodes up"), body
        nursery.cancel_scope.cancel()


# ----------------------------------------------------------------------------- man pages

MAN = ROOT / "man"
PAGES = ("kvd.8", "kvctl.1", "kvd.toml.5")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed: run `make ops-tools` (as root)")
    return path


@pytest.mark.parametrize("page", PAGES)
def test_man_page_is_lint_clean(page):
    mandoc = subprocess.run([need("mandoc"), "-Tlint", str(MAN / page)], capture_output=True,
                            text=True)
    assert (mandoc.returncode, mandoc.stdout + mandoc.stderr) == (0, "")
    groff = subprocess.run([need("groff"), "-man", "-ww", "-z", str(MAN / page)],
                           capture_output=True, text=True)
    assert (groff.returncode, groff.stdout + groff.stderr) == (0, "")


def plain(roff: str) -> str:
    """Roff source with the escapes that matter for searching undone."""
    roff = re.sub(r"\\f[BIRP]|\\f\(..|\\&|\\c", "", roff)
    return roff.replace("\\-", "-").replace("\\e", "\\").replace("\\(aq", "'")


def sections(roff: str, macro: str) -> dict[str, str]:
    """{heading: body} for every ``.SH`` or ``.SS`` heading (headings unquoted)."""
    out: dict[str, str] = {}
    heading = None
    for line in plain(roff).splitlines():
        if line.startswith(macro + " ") or (macro == ".SS" and line.startswith(".SH ")):
            heading = line.split(" ", 1)[1].strip().strip('"') if line.startswith(macro) else None
            if heading is not None:
                out[heading] = ""
        elif heading is not None:
            out[heading] += line + "\n"
    return out


def mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def missing_from_kvctl_page(roff: str) -> list[str]:
    """kvctl commands, options and arguments that kvctl.1 does not document."""
    import typer

    from kvctl.app import app

    root = typer.main.get_command(app)
    commands = sections(roff, ".SS")
    options = sections(roff, ".SH").get("OPTIONS", "")
    missing = [opt for param in root.params for opt in param.opts if not mentions(options, opt)]
    missing += [] if mentions(options, "--help") else ["--help"]

    def walk(command, path):
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, [*path, name])
            return
        name = " ".join(path)
        heading = next((h for h in commands if h == name or h.startswith(name + " ")), None)
        if heading is None:
            missing.append(f"command {name!r}")
            return
        text = heading + "\n" + commands[heading]
        for param in command.params:
            if param.param_type_name == "argument":
                if not mentions(text, param.name.upper()):
                    missing.append(f"{name} argument {param.name.upper()}")
            else:
                missing.extend(f"{name} {opt}" for opt in param.opts if not mentions(text, opt))

    walk(root, [])
    return missing


def missing_from_kvd_page(roff: str) -> list[str]:
    """kvd flags and kvd_* metric families that kvd.8 does not document."""
    from kvd.main import build_parser

    pages = sections(roff, ".SH")
    missing = [opt for action in build_parser()._actions for opt in action.option_strings
               if not mentions(pages.get("OPTIONS", ""), opt)]
    metrics = kvd_metrics.NodeMetrics(Config(data_dir=":memory:"))
    metrics.attach(fake_node())
    exposed = trio.run(metrics.render).decode()
    names = {f.name for f in text_string_to_metric_families(exposed) if f.name.startswith("kvd_")}
    observability = pages.get("OBSERVABILITY", "")
    missing += [name for name in sorted(names) if name not in observability]
    return missing


def missing_from_config_page(roff: str) -> list[str]:
    """Config keys that kvd.toml.5 does not document with their default."""
    keys = sections(roff, ".SH").get("KEYS", "")
    missing = []
    for key in Config.model_fields:
        entry = re.search(rf"^\.TP\n\.B {key}\n(.*?)(?=^\.TP|^\.SS|\Z)", keys, re.M | re.S)
        if entry is None or "default" not in entry.group(1) or f"KVD_{key.upper()}" \
                not in entry.group(1):
            missing.append(key)
    return missing


def test_kvctl_page_documents_every_command_and_option():
    roff = (MAN / "kvctl.1").read_text()
    assert missing_from_kvctl_page(roff) == []
    # The check can fail: drop a command's section, then one option line of another.
    without_command = re.sub(r"^\.SS \"?cluster force.*?(?=^\.SS)", "", roff, flags=re.M | re.S)
    assert missing_from_kvctl_page(without_command) == ["command 'cluster force-remove'"]
    without_option = roff.replace(".BI \\-\\-value\\-size \" BYTES\"\n", "")
    assert missing_from_kvctl_page(without_option) == ["bench --value-size"]
    without_global = roff.replace(".BI \\-\\-token\\-file \" FILE\"\n", "")
    assert missing_from_kvctl_page(without_global) == ["--token-file"]


def test_kvd_page_documents_every_flag_and_metric():
    roff = (MAN / "kvd.8").read_text()
    assert missing_from_kvd_page(roff) == []
    assert missing_from_kvd_page(roff.replace(".BI \\-\\-data\\-dir \" DIR\"\n", "")) == \
        ["--data-dir"]
    assert missing_from_kvd_page(roff.replace("kvd_hints_delivered_total", "")) == \
        ["kvd_hints_delivered"]


def test_config_page_documents_every_key_and_is_generated():
    roff = (MAN / "kvd.toml.5").read_text()
    assert missing_from_config_page(roff) == []
    assert missing_from_config_page(roff.replace(".B tombstone_grace\n", ".B x\n")) == \
        ["tombstone_grace"]
    sys.path.insert(0, str(MAN))
    try:
        import mkconfig
    finally:
        sys.path.remove(str(MAN))
    assert mkconfig.render() == roff, "man/kvd.toml.5 is stale: run `make man`"
    assert mkconfig.RELOADABLE == set(kvd_systemd.RELOADABLE)


# ----------------------------------------------------------------------------- systemd unit

UNIT = ROOT / "systemd" / "kvd.service"
SYSUSERS = ROOT / "systemd" / "kvd.sysusers"


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, val = line.partition("=")
            settings.setdefault(key.strip(), []).append(val.strip())
    return settings


def man_tree(root: Path) -> Path:
    """A MANPATH holding this repository's pages, for Documentation=man:... checks."""
    for page in PAGES:
        section = root / f"man{page.rsplit('.', 1)[1]}"
        section.mkdir(parents=True, exist_ok=True)
        (section / page).write_text((MAN / page).read_text())
    return root


def unit_for_tests(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at this checkout's kvd, which exists here."""
    kvd = Path(sys.executable).with_name("kvd")
    assert kvd.exists(), kvd
    text = UNIT.read_text().replace("ExecStart=/usr/bin/kvd ", f"ExecStart={kvd} ")
    assert f"ExecStart={kvd} " in text
    unit = tmp_path / "kvd.service"
    unit.write_text(text)
    return unit


def test_unit_verifies_with_its_man_pages(tmp_path):
    analyze = need("systemd-analyze")
    need("man")
    env = {**os.environ, "MANPATH": str(man_tree(tmp_path / "man"))}
    result = subprocess.run([analyze, "verify", str(unit_for_tests(tmp_path))],
                            capture_output=True, text=True, env=env, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # The check can fail: a page the unit names but nobody installed.
    (tmp_path / "man" / "man8" / "kvd.8").unlink()
    broken = subprocess.run([analyze, "verify", str(unit_for_tests(tmp_path))],
                            capture_output=True, text=True, env=env, timeout=60)
    assert broken.returncode != 0 and "man kvd(8)" in broken.stderr, broken


def security_exposure(unit: Path) -> tuple[float, str]:
    result = subprocess.run([need("systemd-analyze"), "security", "--offline=true",
                             "--no-pager", str(unit)], capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for kvd\.service: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    return float(found.group(1)), result.stdout


def test_unit_hardening_scores_at_most_2(tmp_path):
    score, report = security_exposure(unit_for_tests(tmp_path))
    assert score <= 2.0, report
    print(f"systemd-analyze security: {score}")
    # The score can fail: the same unit without its hardening section is far above 2.0.
    text = UNIT.read_text()
    bare = tmp_path / "bare" / "kvd.service"
    bare.parent.mkdir()
    bare.write_text(text[:text.index("# Hardening")] + text[text.index("[Install]"):])
    assert security_exposure(bare)[0] > 5.0


def test_unit_runs_kvd_as_a_notify_service_with_state_and_limits():
    settings = unit_settings(UNIT.read_text())
    expected = {
        "Type": ["notify"], "NotifyAccess": ["main"], "User": ["kvd"], "Group": ["kvd"],
        "StateDirectory": ["kvd"], "ExecStart": ["/usr/bin/kvd --config /etc/kvd/kvd.toml"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"], "NoNewPrivileges": ["yes"],
        "ProtectSystem": ["strict"], "PrivateTmp": ["yes"],
        "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"],
        "SystemCallFilter": ["@system-service", "~@privileged @resources"],
    }
    for key, values in expected.items():
        assert settings.get(key) == values, (key, settings.get(key))
    assert int(settings["LimitNOFILE"][0]) >= 65536
    watchdog = settings["WatchdogSec"][0]
    assert re.fullmatch(r"\d+s", watchdog) and int(watchdog[:-1]) >= 10
    # The packaged config keeps its data where StateDirectory= makes a writable directory.
    packaged = (ROOT / "packaging" / "kvd.toml").read_text()
    assert re.search(r'^data_dir = "/var/lib/kvd"$', packaged, re.M)


def test_sysusers_creates_the_kvd_account(tmp_path):
    sysusers = need("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    result = subprocess.run([sysusers, f"--root={tmp_path}", str(SYSUSERS)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    entry = next(line for line in passwd.splitlines() if line.startswith("kvd:"))
    _, _, uid, gid, _, home, shell = entry.split(":")
    assert int(uid) < 1000 and home == "/var/lib/kvd" and shell.endswith("nologin"), entry
    assert re.search(rf"^kvd:x:{gid}:", (tmp_path / "etc" / "group").read_text(), re.M)


# ----------------------------------------------------------------------------- Debian package


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    """`make deb` once per test session, into a temporary directory: under pytest-xdist the
    workers share it (the first to take the lock builds, the others wait and reuse it)."""
    for tool in ("dpkg-deb", "make"):
        need(tool)
    if not Path("/usr/bin/python3.11").exists():
        pytest.skip("/usr/bin/python3.11 is missing: run `make ops-tools` (as root)")
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's directory, above each worker's own
    out = root / "deb-shared"
    out.mkdir(exist_ok=True)
    with open(root / "deb-shared.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = sorted(out.glob("kvd_*.deb"))
        if not built:
            started = time.monotonic()
            # The same xz format as `make deb`, at preset 0: compressing the ~38 MiB tree
            # costs ~3.5 CPU-s there, against ~9.5 s at the shipped -z2 (1 MiB smaller).
            result = subprocess.run(["make", "--no-print-directory", "deb", f"DEB_DIR={out}"],
                                    cwd=ROOT, capture_output=True, text=True, timeout=600,
                                    env={**os.environ, "DEB_COMPRESS": "-Zxz -z0"})
            assert result.returncode == 0, result.stdout + result.stderr
            built = sorted(out.glob("kvd_*.deb"))
            assert len(built) == 1, (list(out.iterdir()), result.stdout)
            print(f"make deb: {built[0].stat().st_size / 2**20:.1f} MiB in "
                  f"{time.monotonic() - started:.0f} s")
    return built[0]


def project_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_deb_control_and_contents_are_complete(deb, tmp_path):
    info = subprocess.run(["dpkg-deb", "-I", str(deb)], capture_output=True, text=True,
                          check=True).stdout
    fields = dict(re.findall(r"^ ([A-Z][\w-]+): (.*)$", info, re.M))
    assert fields["Package"] == "kvd"
    assert fields["Version"] == project_version() + "-1"
    assert fields["Architecture"] == subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    # The python3 package, not one interpreter's (issue 12); bounded above by the minor
    # version the venv's compiled extensions were built for (packaging/README.md).
    minor = sys.version_info.minor
    assert f"python3 (>= 3.{minor})" in fields["Depends"], fields["Depends"]
    assert f"python3 (<< 3.{minor + 1})" in fields["Depends"], fields["Depends"]
    assert "python3.11" not in fields["Depends"] and int(fields["Installed-Size"]) > 1000
    for script in ("postinst", "prerm", "postrm"):
        assert re.search(rf"^\s+\d+ bytes,\s+\d+ lines\s+\*\s+{script}\s+#!/bin/sh$", info, re.M), \
            (script, info)
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    assert (control / "conffiles").read_text().split() == ["/etc/kvd/kvd.toml"]
    for script in ("postinst", "prerm", "postrm"):
        assert subprocess.run(["sh", "-n", str(control / script)]).returncode == 0, script

    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    entries = {}
    for line in listing.splitlines():
        mode, _owner, _size, _date, _time, rest = line.split(None, 5)
        path, _, target = rest.partition(" -> ")
        entries[path.removeprefix(".")] = (mode, target)
    site = "/opt/kvd/lib/python3.11/site-packages"
    wanted = {
        "/usr/bin/kvd": ("l", "/opt/kvd/bin/kvd"),
        "/usr/bin/kvctl": ("l", "/opt/kvd/bin/kvctl"),
        "/opt/kvd/bin/python3": ("l", "/usr/bin/python3"),
        "/opt/kvd/bin/kvd": ("-rwxr-xr-x", ""), "/opt/kvd/bin/kvctl": ("-rwxr-xr-x", ""),
        "/opt/kvd/pyvenv.cfg": ("-rw-r--r--", ""),
        "/etc/kvd/kvd.toml": ("-rw-r--r--", ""),
        "/usr/lib/systemd/system/kvd.service": ("-rw-r--r--", ""),
        "/usr/lib/sysusers.d/kvd.conf": ("-rw-r--r--", ""),
        "/usr/share/man/man8/kvd.8.gz": ("-rw-r--r--", ""),
        "/usr/share/man/man1/kvctl.1.gz": ("-rw-r--r--", ""),
        "/usr/share/man/man5/kvd.toml.5.gz": ("-rw-r--r--", ""),
        "/usr/share/bash-completion/completions/kvctl": ("-rw-r--r--", ""),
        "/usr/share/doc/kvd/copyright": ("-rw-r--r--", ""),
        "/usr/share/doc/kvd/changelog.Debian.gz": ("-rw-r--r--", ""),
        "/usr/share/doc/kvd/README.md.gz": ("-rw-r--r--", ""),
        "/usr/share/doc/kvd/protocol.md.gz": ("-rw-r--r--", ""),
        "/usr/share/kvd/grafana-dashboard.json": ("-rw-r--r--", ""),
        f"{site}/kvd/server.py": ("-rw-r--r--", ""),
        f"{site}/kvd/metrics.py": ("-rw-r--r--", ""),
        f"{site}/kvctl/app.py": ("-rw-r--r--", ""),
    }
    for path, (mode, target) in wanted.items():
        assert path in entries, f"{path} missing from the package"
        got_mode, got_target = entries[path]
        assert got_mode.startswith(mode) and got_target == target, (path, entries[path])
    assert all(" root/root " in line for line in listing.splitlines()), "files not owned by root"
    # Only kvd's own commands and the interpreter links: no console scripts of dependencies.
    scripts = sorted(p.removeprefix("/opt/kvd/bin/") for p in entries
                     if re.fullmatch(r"/opt/kvd/bin/[^/]+", p))
    assert [s for s in scripts if not re.fullmatch(r"python(3(\.\d+)?)?", s)] == \
        ["kvctl", "kvd"], scripts
    # Debian policy 12.3: documentation is compressed (except copyright).
    docs = [p for p in entries if p.startswith("/usr/share/doc/kvd/") and not p.endswith("/")]
    assert [d for d in docs if not d.endswith((".gz", "/copyright"))] == [], docs
    # Every runtime dependency of pyproject.toml is in the venv (its dist-info directory).
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = {m.group(1).lower().replace("-", "_") for m in re.finditer(
        rf"^{re.escape(site)}/([^/]+?)-[^/-]+\.dist-info/$", "\n".join(entries), re.M)}
    for dependency in project["dependencies"]:
        if "python_version <" in dependency:
            continue  # a backport for older Pythons
        name = re.split(r"[<>=!~;\[ ]", dependency)[0].lower().replace("-", "_")
        assert name in installed, (dependency, sorted(installed))
    assert "kvd" in installed


class ThrowawayRoot:
    """The host's root file system under an overlay whose writable layer is a temporary
    directory, entered with chroot in a private mount namespace: `dpkg -i` there runs the
    real maintainer scripts, and nothing reaches the host. Needs root (unshare -m)."""

    def __init__(self, base: Path):
        self.upper, self.work, self.merged = base / "upper", base / "work", base / "merged"
        for d in (self.upper, self.work, self.merged):
            d.mkdir(parents=True)

    def command(self, inner: str, user: str | None = None) -> list[str]:
        m = self.merged
        setup = (f"mount -t overlay overlay -o lowerdir=/,upperdir={self.upper},"
                 f"workdir={self.work} {m} && mount -t proc proc {m}/proc && "
                 f"mount --rbind /dev {m}/dev && mount -t tmpfs tmpfs {m}/run && ")
        run = ["sh", "-c", inner]
        if user:
            run = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                   "--no-new-privs", *run]
        return ["unshare", "-m", "sh", "-c", setup + 'exec chroot "$0" "$@"', str(m), *run]

    def run(self, inner: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(inner), capture_output=True, text=True,
                              timeout=timeout)

    def path(self, inside: str) -> Path:
        return self.upper / inside.lstrip("/")

    @staticmethod
    def available() -> str | None:
        """Why a throwaway root cannot be made here, or None."""
        if os.geteuid() != 0:
            return "needs root (unshare -m, mount, chroot)"
        for tool in ("unshare", "chroot", "setpriv", "dpkg"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed"
        probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
        if probe.returncode != 0:
            return f"unshare -m is not permitted here: {probe.stderr.decode().strip()}"
        return None


def test_deb_installs_runs_and_purges_in_a_throwaway_root(deb, tmp_path):
    reason = ThrowawayRoot.available()
    if reason is not None:
        pytest.skip(f"throwaway root: {reason}; test_deb_extracted_venv_runs covers the rest")
    root = ThrowawayRoot(tmp_path)
    shutil.copy(deb, root.path("/kvd.deb"))  # a new directory here would mask its mode
    installed = root.run(
        "set -e; dpkg -i /kvd.deb; getent passwd kvd; stat -c '%U %a' /var/lib/kvd; "
        "readlink /etc/systemd/system/multi-user.target.wants/kvd.service || echo not enabled; "
        "kvd --version; kvctl --version; kvd --config /etc/kvd/kvd.toml --check >/dev/null; "
        "bash -c '. /usr/share/bash-completion/completions/kvctl; COMP_WORDS=(kvctl clu); "
        "COMP_CWORD=1; _kvctl_completion kvctl; echo completion: ${COMPREPLY[*]}'; "
        "man -w kvd.toml")
    out = installed.stdout
    assert installed.returncode == 0, out + installed.stderr
    assert re.search(r"^kvd:x:\d+:\d+:kvd key-value store:/var/lib/kvd:/usr/sbin/nologin$",
                     out, re.M), out
    assert "kvd 750" in out, out
    # Not enabled nor started before the operator has configured it (issue 12).
    assert "not enabled" in out and "systemctl enable --now kvd" in out, out
    assert f"kvd {project_version()}" in out and f"kvctl {project_version()}" in out, out
    assert "completion: cluster" in out, out
    assert "/usr/share/man/man5/kvd.toml.5.gz" in out, out
    assert root.path("/usr/bin/kvd").is_symlink()  # installed into the upper layer only
    assert not Path("/opt/kvd").exists() or Path("/opt/kvd").stat().st_ino != \
        root.path("/opt/kvd").stat().st_ino

    # The packaged config, as the kvd user, with a temporary data dir on free ports.
    port, peer, metrics = free_port(), free_port(), free_port()
    log = open(tmp_path / "kvd.log", "wb")
    daemon = subprocess.Popen(
        root.command(f"KVD_METRICS_LISTEN=127.0.0.1:{metrics} exec /usr/bin/kvd "
                     f"--config /etc/kvd/kvd.toml --data-dir /tmp/kvd-data "
                     f"--listen 127.0.0.1:{port} --peer-listen 127.0.0.1:{peer}", user="kvd"),
        stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        try:
            wait_port(port, proc=daemon)
        except RuntimeError as exc:
            raise AssertionError((tmp_path / "kvd.log").read_text()) from exc
        client = SyncClient(f"127.0.0.1:{port}")
        assert client.put(b"packaged", b"yes").replicas == 1
        assert client.get(b"packaged").siblings[0].value == b"yes"
        assert http_get(metrics, "/ready")[0] == 200
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
    text = (tmp_path / "kvd.log").read_text()
    assert code == 0, text
    assert "stopped cleanly" in text, text
    data = root.path("/tmp/kvd-data")
    assert data.is_dir() and data.stat().st_uid != 0  # written by the kvd user

    # Purge: package files and conffile go; a data directory with data stays, and says so.
    (root.path("/var/lib/kvd") / "keep-me").write_text("data")
    purged = root.run("set -e; dpkg --purge kvd; ls /opt/kvd /etc/kvd/kvd.toml 2>&1 || true; "
                      "ls /var/lib/kvd; getent passwd kvd")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert "kept /var/lib/kvd" in purged.stdout, purged.stdout
    assert "cannot access '/opt/kvd': No such file" in purged.stdout, purged.stdout
    assert "cannot access '/etc/kvd/kvd.toml': No such file" in purged.stdout, purged.stdout
    assert "keep-me" in purged.stdout and "kvd:x:" in purged.stdout, purged.stdout


def test_deb_extracted_venv_runs(deb, tmp_path):
    """Without root: `dpkg-deb -x` into a directory; the venv runs through its own python
    (its scripts' shebangs name /opt/kvd, which only exists once installed)."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    venv = tmp_path / "opt" / "kvd"
    python = venv / "bin" / "python"
    assert (venv / "bin" / "kvd").read_text().startswith("#!/opt/kvd/bin/python\n")
    assert str(tmp_path) not in (venv / "pyvenv.cfg").read_text()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    for module, name in (("kvd.main", "kvd"), ("kvctl.app", "kvctl")):
        result = subprocess.run([str(python), "-I", "-m", module, "--version"],
                                capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
        assert result.stdout.strip() == f"{name} {project_version()}", result
    where = subprocess.run([str(python), "-I", "-c", "import kvd, plyvel; print(kvd.__file__)"],
                           capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert where.stdout.startswith(str(venv / "lib" / "python3.11" / "site-packages")), where
    port = free_port()
    config = tmp_path / "etc" / "kvd" / "kvd.toml"
    proc = subprocess.Popen(
        [str(python), "-I", "-m", "kvd.main", "--config", str(config), "--data-dir",
         str(tmp_path / "data"), "--listen", f"127.0.0.1:{port}",
         "--peer-listen", f"127.0.0.1:{free_port()}"],
        env={**env, "KVD_METRICS_LISTEN": ""}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        cwd=tmp_path)
    try:
        wait_port(port, proc=proc)
        assert SyncClient(f"127.0.0.1:{port}").put(b"k", b"v").replicas == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        proc.stdout.close()


# ----------------------------------------------------------------------------- hardening, live

# The unit's seccomp rules, applied by hand (python3-seccomp) to a real kvd: the allow list of
# SystemCallFilter= (expanded by systemd-analyze itself), RestrictAddressFamilies= and
# MemoryDenyWriteExecute= as systemd's seccomp-util.c builds them, with EPERM as in
# SystemCallErrorNumber=. Then exec the program given.
SECCOMP_HELPER = r"""
import errno, os, socket, sys
import seccomp

allowed = set(sys.argv[1].split(","))
special = {"socket", "mmap", "mprotect", "pkey_mprotect", "shmat"}
f = seccomp.SyscallFilter(seccomp.ERRNO(errno.EPERM))
for name in sorted(allowed - special):
    try:
        f.add_rule(seccomp.ALLOW, name)
    except (RuntimeError, ValueError, OSError):
        pass  # not a syscall of this architecture
for family in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
    f.add_rule(seccomp.ALLOW, "socket", seccomp.Arg(0, seccomp.EQ, family))
W, X, SHM_EXEC = 0x2, 0x4, 0o100000
f.add_rule(seccomp.ALLOW, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, X, 0))
f.add_rule(seccomp.ALLOW, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, W, 0))
f.add_rule(seccomp.ALLOW, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, X, 0))
f.add_rule(seccomp.ALLOW, "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, X, 0))
f.add_rule(seccomp.ALLOW, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, 0))
f.load()
os.execv(sys.argv[2], sys.argv[2:])
"""


def unit_syscalls() -> set[str]:
    """The syscalls kvd.service allows: its SystemCallFilter= lines, expanded by
    `systemd-analyze syscall-filter` (allow list minus ~deny list, as systemd applies them)."""
    listing = subprocess.run([need("systemd-analyze"), "syscall-filter"], capture_output=True,
                             text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in listing.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#") and current is not None:
            current.append(line.strip())

    def expand(item: str) -> set[str]:
        if item.startswith("@"):
            return set().union(*(expand(x) for x in groups[item]))
        return {item}

    allowed: set[str] = set()
    for line in unit_settings(UNIT.read_text())["SystemCallFilter"]:
        deny = line.startswith("~")
        names = set().union(*(expand(x) for x in line.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


def seccomp_command(argv: list[str]) -> list[str]:
    if subprocess.run(["/usr/bin/python3", "-c", "import seccomp"],
                      capture_output=True).returncode != 0:
        pytest.skip("python3-seccomp is not installed: run `make ops-tools` (as root)")
    return ["/usr/bin/python3", "-c", SECCOMP_HELPER, ",".join(sorted(unit_syscalls())), *argv]


def test_unit_seccomp_filter_is_enforced_by_the_harness():
    """The harness below would catch a violation: what the unit forbids fails under it."""
    probe = ("import mmap, os, socket\n"
             "for what, call in [('netlink', lambda: socket.socket(socket.AF_NETLINK, "
             "socket.SOCK_RAW)), ('setpriority', lambda: os.setpriority(os.PRIO_PROCESS, 0, 5)),"
             " ('wx', lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC))]:\n"
             "    try:\n        call(); print(what, 'allowed')\n"
             "    except OSError as e:\n        print(what, 'refused', e.errno)\n")
    result = subprocess.run(seccomp_command([sys.executable, "-c", probe]), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["netlink refused 1", "setpriority refused 1",
                                             "wx refused 1"], result.stdout


def test_kvd_works_under_the_units_seccomp_filter(tmp_path, nodes):
    """trio, plyvel/LevelDB, blob files, sd_notify, metrics, reload and shutdown under the
    syscall, address-family and W^X rules of kvd.service."""
    notify = NotifySocket(tmp_path / "notify.sock")
    node = OpsNode(tmp_path / "n1" / "data", env={
        "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
    nodes.append(node)
    node.data_dir.parent.mkdir(parents=True)
    config = node.write_config()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVD_")}
    env.update({"KVD_METRICS_LISTEN": f"127.0.0.1:{node.metrics_port}", **node.env})
    log = open(node.log_path, "ab")
    node.proc = subprocess.Popen(
        seccomp_command([sys.executable, "-m", "kvd.main", "--config", str(config)]),
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    log.close()
    try:
        notify.wait("READY=1")
        notify.wait("WATCHDOG=1")
        status = Path(f"/proc/{node.proc.pid}/status").read_text()
        assert re.search(r"^Seccomp:\s+2$", status, re.M), status  # filtered, as under systemd
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
        client = SyncClient(node.address)
        big = os.urandom(3 * 2**20 + 17)  # chunked: blob files, fsync
        assert client.put(b"small", b"v").replicas == 1
        assert client.put(b"big", big).replicas == 1
        assert client.get(b"big").siblings[0].value == big
        assert node.http("/ready")[0] == 200
        assert value(node.scrape(), "process_open_fds") > 0
        node.proc.send_signal(signal.SIGHUP)
        notify.wait("RELOADING=1")
        node.proc.send_signal(signal.SIGTERM)
        notify.wait("STOPPING=1")
        assert node.proc.wait(30) == 0, node.log_text()
    finally:
        notify.close()
    text = node.log_text()
    assert "Operation not permitted" not in text and "Traceback" not in text, text


# ----------------------------------------------------------------------------- Grafana


def dashboard_series() -> set[str]:
    """Every kvd_* series name the packaged dashboard's queries use."""
    import json

    doc = json.loads((ROOT / "packaging" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in doc["panels"] for t in panel["targets"]]
    exprs += [v["definition"] for v in doc["templating"]["list"] if "definition" in v]
    return {name for expr in exprs for name in re.findall(r"\bkvd_\w+", expr)}


def exposed_series(text: str) -> set[str]:
    """Series names a /metrics page offers, samples or not (a labelled metric with no
    child yet still has its family): histograms' _bucket/_sum/_count, counters' _total."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",)}
        names.update(family.name + s for s in suffixes.get(family.type, ()))
    return names


def test_grafana_dashboard_uses_only_series_a_live_node_exposes(tmp_path, nodes):
    used = dashboard_series()
    for topic in ("kvd_request_duration_seconds_count", "kvd_request_duration_seconds_bucket",
                  "kvd_quorum_failures_total", "kvd_hints_pending", "kvd_transfers_pending",
                  "kvd_anti_entropy_partitions_exchanged_total"):
        assert topic in used, f"the dashboard has no panel on {topic}"
    node = OpsNode(tmp_path / "n1" / "data")
    nodes.append(node)
    node.start()
    SyncClient(node.address).put(b"k", b"v")
    status, text = node.http("/metrics")
    assert status == 200
    missing = sorted(used - exposed_series(text))
    assert not missing, f"the dashboard queries series kvd does not expose: {missing}"
