"""Linux network namespaces for the chaos suite: one per node, a bridge, and the faults.

Layout (every name starts with ``kvdchaos``; 10.77.0.0/24 exists only on links created here)::

    root ns: the test, its clients, kvctl        kvdchaos-br: the bridge
        kvdchaos-h 10.77.0.254/24  <-- veth -->  hostport --- br0 --- pI
    kvdchaos-nI: node I (I = 1..5)                                     |
        eth0 10.77.0.(10+I)/24  <------------------ veth -------------'

Faults live inside the node namespaces, so healing never touches the root namespace:

- partitions: an nftables table ``inet kvdchaos`` per node that drops packets to and from
  the peers that node must not reach (the client address 10.77.0.254 always passes: clients
  sit beside every node, as in Jepsen);
- a lossy, slow link: an iptables (xt_NFQUEUE) rule sending every packet of that node's
  10.77.0.0/24 traffic to ``nfqueue.py`` (drops 20 %, delays the rest 50 ms), because this
  kernel has neither sch_netem nor nft's ``queue``; ``tc qdisc ... netem`` is used instead
  when the kernel has it (:func:`netem_available`).

:func:`sweep` removes every ``kvdchaos`` namespace (SIGKILLing what still runs in it) and
the root-namespace veth. It runs before a run (stale leftovers of an interrupted one), after
it (finally), and at exit (atexit). A lock file keeps two runs on one machine apart.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "kvdchaos"
BRIDGE_NS = f"{PREFIX}-br"
HOST_LINK = f"{PREFIX}-h"
SUBNET = "10.77.0"
HOST_IP = f"{SUBNET}.254"
LOCK_PATH = Path("/run/kvdchaos.lock")
NFQUEUE_PROGRAM = Path(__file__).resolve().parent / "nfqueue.py"
QUEUE_NUM = 7


class NetError(RuntimeError):
    pass


def run(*args: str, ns: str | None = None, check: bool = True, input: str | None = None,
        timeout: float = 20) -> subprocess.CompletedProcess:
    command = list(args)
    if ns is not None:
        command = ["ip", "netns", "exec", ns, *command]
    out = subprocess.run(command, capture_output=True, text=True, input=input, timeout=timeout)
    if check and out.returncode != 0:
        raise NetError(f"{' '.join(command)}: exit {out.returncode}: {out.stderr.strip()}")
    return out


def node_ns(index: int) -> str:
    return f"{PREFIX}-n{index}"


def node_ip(index: int) -> str:
    return f"{SUBNET}.{10 + index}"


# ----------------------------------------------------------------------------- preconditions


def missing_prerequisites() -> str | None:
    """Why the chaos suite cannot run here (one line), or None when it can."""
    if sys.platform != "linux":
        return "not Linux (network namespaces needed)"
    if os.geteuid() != 0:
        return "not root (network namespaces and nftables need it)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"),
                          ("iptables-legacy", "iptables")):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian package {package}; `make chaos-tools` installs it)"
    probe = f"{PREFIX}-probe{os.getpid()}"
    try:
        run("ip", "netns", "add", probe)
    except (NetError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        run("ip", "link", "set", "lo", "up", ns=probe)
        run("nft", "add", "table", "inet", "probe", ns=probe)
        run("iptables-legacy", "-A", "OUTPUT", "-d", "127.0.0.2", "-j", "NFQUEUE",
            "--queue-num", str(QUEUE_NUM), ns=probe)
    except (NetError, OSError, subprocess.TimeoutExpired) as exc:
        return f"nftables/iptables do not work in a namespace here: {exc}"
    finally:
        run("ip", "netns", "del", probe, check=False)
    if subnet_in_use():
        return f"{SUBNET}.0/24 is already routed in the root namespace; not touching it"
    return None


def subnet_in_use() -> bool:
    out = run("ip", "-4", "route", "show", check=False).stdout
    return any(line.startswith(f"{SUBNET}.") and HOST_LINK not in line
               for line in out.splitlines())


def netem_available() -> bool:
    """True when ``tc qdisc add ... netem`` works (tried on a dummy namespace's loopback)."""
    probe = f"{PREFIX}-netem{os.getpid()}"
    try:
        run("ip", "netns", "add", probe)
        out = run("tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                  ns=probe, check=False)
        return out.returncode == 0
    except (NetError, OSError, subprocess.TimeoutExpired):
        return False
    finally:
        run("ip", "netns", "del", probe, check=False)


class RunLock:
    """flock on /run/kvdchaos.lock: one chaos run per machine (they share names)."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def acquire(self, timeout: float = 0) -> bool:
        self.fd = os.open(LOCK_PATH, os.O_CREAT | os.O_RDWR, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    self.fd = None
                    return False
                time.sleep(0.5)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------- set-up


def sweep() -> list[str]:
    """Remove every kvdchaos namespace (killing its processes) and the host link."""
    removed = []
    out = run("ip", "netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pids = run("ip", "netns", "pids", name, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        # A killed process leaves the namespace once it is reaped; deleting the name is enough.
        run("ip", "netns", "del", name, check=False)
        removed.append(name)
    if run("ip", "link", "show", HOST_LINK, check=False).returncode == 0:
        run("ip", "link", "del", HOST_LINK, check=False)
        removed.append(HOST_LINK)
    return removed


def setup(count: int) -> None:
    """Bridge namespace, ``count`` node namespaces and the host link; all links up."""
    run("ip", "netns", "add", BRIDGE_NS)
    run("ip", "link", "set", "lo", "up", ns=BRIDGE_NS)
    run("ip", "link", "add", "br0", "type", "bridge", ns=BRIDGE_NS)
    run("ip", "link", "set", "br0", "up", ns=BRIDGE_NS)
    run("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", "hostport",
        "netns", BRIDGE_NS)
    run("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_LINK)
    run("ip", "link", "set", HOST_LINK, "up")
    run("ip", "link", "set", "hostport", "master", "br0", "up", ns=BRIDGE_NS)
    for index in range(1, count + 1):
        ns = node_ns(index)
        run("ip", "netns", "add", ns)
        run("ip", "link", "set", "lo", "up", ns=ns)
        run("ip", "link", "add", f"p{index}", "type", "veth", "peer", "name", "eth0",
            "netns", ns, ns=BRIDGE_NS)
        run("ip", "link", "set", f"p{index}", "master", "br0", "up", ns=BRIDGE_NS)
        run("ip", "addr", "add", f"{node_ip(index)}/24", "dev", "eth0", ns=ns)
        run("ip", "link", "set", "eth0", "up", ns=ns)
        # The empty partition table, so that a partition is one atomic `nft -f`.
        set_blocked(index, [])


# ----------------------------------------------------------------------------- faults


def set_blocked(index: int, peers: list[int]) -> None:
    """Node ``index`` drops every packet to or from the nodes in ``peers`` (atomically)."""
    ns = node_ns(index)
    addresses = ", ".join(node_ip(p) for p in peers)
    rules = [f"table inet {PREFIX} {{}}", f"delete table inet {PREFIX}",
             f"table inet {PREFIX} {{",
             "  chain input { type filter hook input priority 0; policy accept;"]
    if peers:
        rules.append(f"    ip saddr {{ {addresses} }} drop")
    rules.append("  }")
    rules.append("  chain output { type filter hook output priority 0; policy accept;")
    if peers:
        rules.append(f"    ip daddr {{ {addresses} }} drop")
    rules += ["  }", "}"]
    run("nft", "-f", "-", ns=ns, input="\n".join(rules) + "\n")


def partition(groups: list[list[int]], count: int) -> None:
    """Each node reaches only the nodes of its own group."""
    for group in groups:
        for index in group:
            set_blocked(index, [p for p in range(1, count + 1) if p not in group])


def ring(count: int) -> None:
    """Non-transitive: node i reaches only i-1 and i+1 (mod count)."""
    for index in range(1, count + 1):
        neighbours = {(index - 2) % count + 1, index % count + 1}
        set_blocked(index, [p for p in range(1, count + 1)
                            if p != index and p not in neighbours])


def can_connect(index: int, ip: str, port: int, timeout: float = 2.0) -> bool:
    """Whether node ``index``'s namespace can open a TCP connection to ``ip:port`` now."""
    out = run("timeout", str(timeout), "bash", "-c", f"exec 3<>/dev/tcp/{ip}/{port}",
              ns=node_ns(index), check=False, timeout=timeout + 10)
    return out.returncode == 0


def heal(count: int) -> None:
    for index in range(1, count + 1):
        set_blocked(index, [])


class LossyLink:
    """20 % loss + 50 ms delay on every packet of one node's link (both directions)."""

    def __init__(self, index: int, drop: float = 0.2, delay: float = 0.05, seed: int = 1):
        self.index = index
        self.ns = node_ns(index)
        self.drop, self.delay, self.seed = drop, delay, seed
        self.proc: subprocess.Popen | None = None
        self.summary = ""
        self.netem = netem_available()

    def start(self) -> None:
        if self.netem:  # both directions: the node's eth0 and its bridge port
            for ns, dev in ((self.ns, "eth0"), (BRIDGE_NS, f"p{self.index}")):
                run("tc", "qdisc", "add", "dev", dev, "root", "netem", "loss",
                    f"{self.drop * 100:g}%", "delay", f"{self.delay * 1000:g}ms", ns=ns)
            return
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, str(NFQUEUE_PROGRAM),
             "--queue", str(QUEUE_NUM), "--drop", str(self.drop), "--delay", str(self.delay),
             "--seed", str(self.seed)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise NetError(f"nfqueue.py did not start: {line!r} {self.proc.stderr.read()}")
        subnet = f"{SUBNET}.0/24"
        run("iptables-legacy", "-I", "INPUT", "-s", subnet, "-j", "NFQUEUE",
            "--queue-num", str(QUEUE_NUM), ns=self.ns)
        run("iptables-legacy", "-I", "OUTPUT", "-d", subnet, "-j", "NFQUEUE",
            "--queue-num", str(QUEUE_NUM), ns=self.ns)

    def stop(self) -> None:
        if self.netem:
            for ns, dev in ((self.ns, "eth0"), (BRIDGE_NS, f"p{self.index}")):
                run("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)
            self.summary = "netem"
            return
        run("iptables-legacy", "-F", "INPUT", ns=self.ns, check=False)
        run("iptables-legacy", "-F", "OUTPUT", ns=self.ns, check=False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                out, _ = self.proc.communicate(timeout=5)
                self.summary = out.strip().splitlines()[-1] if out.strip() else ""
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
