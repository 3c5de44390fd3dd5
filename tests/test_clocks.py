"""Issue 9, section 1: no module reads the time itself; a node reads the clocks it was given
(kvd/clocks.py), so a whole cluster runs on trio's MockClock with a skewed wall clock each."""

from __future__ import annotations

import ast
from pathlib import Path

KVD = Path(__file__).resolve().parent.parent / "kvd"

# Reading these is reading the time.
CLOCK_READS = {("time", "time"), ("time", "time_ns"), ("time", "monotonic"),
               ("time", "monotonic_ns"), ("time", "perf_counter"), ("time", "perf_counter_ns"),
               ("trio", "current_time")}

# Modules that may, and why. Nothing else.
ALLOWED = {
    "clocks.py": "the clocks' home: REAL and skewed() are built here",
    "backup.py": "`kvd restore`, an offline command: it stamps the restored identity",
    "net/admission.py": "cancel-scope deadlines of real sockets parked in epoll, in trio's "
                        "own clock by definition; never runs in the simulator",
    "net/memory.py": "the simulated network itself, not a node: its retransmission timers "
                     "run on the simulation's clock",
}


def clock_reads(path: Path) -> list[str]:
    """``module.name()`` calls and ``from module import name`` imports of a clock in ``path``
    (a reference that is not called, such as a default for an injected clock, is no read)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        call = node.func if isinstance(node, ast.Call) else None
        if (isinstance(call, ast.Attribute) and isinstance(call.value, ast.Name)
                and (call.value.id, call.attr) in CLOCK_READS):
            found.append(f"{call.value.id}.{call.attr} (line {node.lineno})")
        elif isinstance(node, ast.ImportFrom) and node.module in ("time", "trio"):
            found += [f"from {node.module} import {a.name} (line {node.lineno})"
                      for a in node.names if (node.module, a.name) in CLOCK_READS]
    return found


def test_no_module_reads_the_time_itself():
    offenders = {}
    for path in sorted(KVD.rglob("*.py")):
        name = path.relative_to(KVD).as_posix()
        if name not in ALLOWED and (found := clock_reads(path)):
            offenders[name] = found
    assert not offenders, f"read the injected clocks (node.clocks) instead: {offenders}"


def test_the_scan_sees_every_form_of_a_clock_read(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import time, trio\nfrom time import monotonic\n"
                      "a = time.time()\nb = trio.current_time()\nc = time.sleep(1)\n"
                      "d = trio.current_time\n")
    assert sorted(clock_reads(source)) == ["from time import monotonic (line 2)",
                                           "time.time (line 3)", "trio.current_time (line 4)"]
