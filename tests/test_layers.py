"""The layer order, read from the source: who may import whom.

Layers, lowest first (docs/architecture.md):
  leaf   kvd.errors, kvd._version, kvd.address: standard library only;
  core   kvd.proto (codec, schema, handshake, records), kvd.ring, kvd.membership,
         kvd.versions (causality, encoding), kvd.aae, kvd.storage.keys:
         pure, no I/O (msgpack is fine: it is a pure encoder);
  shell  the rest of kvd: trio tasks, storage, network, metrics, config;
  top    kvd.server (assembles a node) and kvd.main (the daemon's entry point);
  kvctl  the operator CLI: the client side only.

Rules:
  1. leaf and core import only the standard library, msgpack, and leaf or core modules,
     also inside functions.
  2. Importing a core module imports neither trio nor plyvel, counting the package
     ``__init__`` modules Python runs on the way.
  3. Only kvd.main reaches kvd.server, and nothing reaches kvd.main: kvd.node in particular
     never reaches the server (metrics -> main -> server -> metrics was such a cycle).
  4. kvctl never reaches the daemon (server, node, storage, metrics, config, main) nor
     pydantic, plyvel or prometheus_client: a kvctl run loads only the client side.
  5. Nothing in kvd imports kvctl.
  6. Each heavy library has one home: plyvel only in kvd.storage.leveldb, pydantic only in
     kvd.config, prometheus_client only in kvd.metrics_export, typer and rich only in kvctl.
  7. No module of kvd is over MAX_LINES lines (kvd.config, the documented config schema,
     is exempt): a module that grows past it is doing more than one job; split it.

The graph is built with ``ast`` from every import statement, so a lazy import inside a
function counts; imports under ``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kvd", "kvctl")

LEAF = ("kvd.errors", "kvd._version", "kvd.address")
CORE = ("kvd.proto", "kvd.ring", "kvd.membership", "kvd.versions", "kvd.aae", "kvd.storage.keys")
PURE_THIRD_PARTY = {"msgpack"}
NO_IO = {"trio", "plyvel"}
DAEMON = ("kvd.server", "kvd.node", "kvd.storage", "kvd.metrics", "kvd.config", "kvd.main",
          "kvd.systemd")
DAEMON_THIRD_PARTY = {"pydantic", "plyvel", "prometheus_client"}
HOMES = {
    "plyvel": ("kvd.storage.leveldb",),
    "pydantic": ("kvd.config",),
    "prometheus_client": ("kvd.metrics_export",),
    "typer": ("kvctl",),
    "rich": ("kvctl",),
}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class Module:
    """One first-party module: its imports at import time and inside functions."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.is_package = path.name == "__init__.py"
        self.eager: set[str] = set()  # run when the module is imported
        self.lazy: set[str] = set()  # run later, inside a function
        self._visit(ast.parse(path.read_text(), str(path)).body, eager=True)

    def _visit(self, body: list[ast.stmt], eager: bool) -> None:
        for node in body:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                self._visit(node.orelse, eager)
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                (self.eager if eager else self.lazy).update(self._targets(node))
                continue
            # A function body runs later; a class body, a branch or a try runs now.
            now = eager and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for field in ("body", "orelse", "finalbody"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    self._visit(children, now)
            for part in [*getattr(node, "handlers", ()), *getattr(node, "cases", ())]:
                self._visit(part.body, now)

    def _targets(self, node: ast.Import | ast.ImportFrom) -> set[str]:
        if isinstance(node, ast.Import):
            return {alias.name for alias in node.names}
        if node.level:
            parts = self.name.split(".")
            base = parts if self.is_package else parts[:-1]
            base = base[: len(base) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one;
        # the caller resolves names that are not modules back to ``pkg``.
        return {module} | {f"{module}.{alias.name}" for alias in node.names}


def _load() -> dict[str, Module]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            modules[name] = Module(name, path)
    return modules


MODULES = _load()


def _resolve(target: str) -> str:
    """A first-party module name, or the top-level name of a third-party/stdlib import."""
    if target.split(".")[0] not in PACKAGES:
        return target.split(".")[0]
    while target not in MODULES and "." in target:
        target = target.rsplit(".", 1)[0]  # ``from kvd.ring import claim``: a name, not a module
    return target


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _edges(name: str, lazy: bool) -> set[str]:
    module = MODULES[name]
    targets = module.eager | (module.lazy if lazy else set())
    out = {_resolve(t) for t in targets if t and not t.startswith("__future__")}
    out.discard(name)
    return out


def _reach(start: str, lazy: bool) -> dict[str, str]:
    """Every module ``start`` reaches -> the module that imports it (for the error path).
    Importing ``a.b.c`` also runs ``a`` and ``a.b``."""
    seen = {start: ""}
    todo = [start]
    while todo:
        name = todo.pop()
        if name not in MODULES:
            continue
        for nxt in [*_parents(name), *_edges(name, lazy)]:
            if nxt not in seen:
                seen[nxt] = name
                todo.append(nxt)
    return seen


def _path(seen: dict[str, str], end: str) -> str:
    chain = [end]
    while seen[chain[-1]]:
        chain.append(seen[chain[-1]])
    return " <- ".join(chain)


def _is_stdlib(name: str) -> bool:
    return name in sys.stdlib_module_names


MAX_LINES = 500
LONG_ALLOWED = {"kvd.config"}


def test_the_graph_is_read() -> None:
    # A guard for the test itself: a parser that found nothing would pass every rule.
    assert _edges("kvd.client", lazy=False) >= {"kvd.proto.handshake", "kvd.address", "trio"}
    assert "kvd.server" in _edges("kvd.main", lazy=True)
    assert "kvd.server" not in _edges("kvd.main", lazy=False)
    assert "kvd.storage.base" not in _edges("kvd.storage", lazy=False)  # TYPE_CHECKING only


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _within(n, LEAF + CORE)))
def test_leaf_and_core_import_only_pure_modules(name: str) -> None:
    allowed_first_party = LEAF + CORE
    bad = sorted(
        target
        for target in _edges(name, lazy=True)
        if not (
            _is_stdlib(target)
            or target in PURE_THIRD_PARTY
            or _within(target, allowed_first_party)
            or target in _parents(name)
        )
    )
    if _within(name, LEAF):
        bad += sorted(t for t in _edges(name, lazy=True) if t in PURE_THIRD_PARTY)
    assert not bad, f"{name} imports {bad}: the pure core and leaf modules do no I/O"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _within(n, CORE)))
def test_importing_the_core_runs_no_io_library(name: str) -> None:
    seen = _reach(name, lazy=False)
    bad = sorted(NO_IO & set(seen))
    assert not bad, "; ".join(_path(seen, b) for b in bad)


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"kvd.main", "kvd.server"}))
def test_only_the_entry_point_reaches_the_server(name: str) -> None:
    seen = _reach(name, lazy=True)
    bad = sorted(t for t in seen if t in ("kvd.server", "kvd.main"))
    assert not bad, "; ".join(_path(seen, b) for b in bad)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _within(n, ("kvctl",))))
def test_kvctl_reaches_only_the_client_side(name: str) -> None:
    seen = _reach(name, lazy=True)
    bad = sorted(t for t in seen if _within(t, DAEMON) or t in DAEMON_THIRD_PARTY)
    assert not bad, "; ".join(_path(seen, b) for b in bad)


def test_kvd_does_not_import_kvctl() -> None:
    bad = sorted(
        (name, target)
        for name in MODULES
        if _within(name, ("kvd",))
        for target in _edges(name, lazy=True)
        if _within(target, ("kvctl",))
    )
    assert not bad


@pytest.mark.parametrize("library", sorted(HOMES))
def test_each_library_has_one_home(library: str) -> None:
    importers = sorted(n for n in MODULES if library in _edges(n, lazy=True))
    assert importers, f"nothing imports {library}: is the table out of date?"
    bad = [n for n in importers if not _within(n, HOMES[library])]
    assert not bad, f"{library} is imported by {bad}, outside {HOMES[library]}"


def test_a_kvctl_run_loads_no_daemon_library() -> None:
    # The static rule above, checked once at run time: what `kvctl` actually loads.
    code = (
        "import sys, kvctl.app\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{sorted(DAEMON_THIRD_PARTY)!r} or m.startswith(('kvd.server', 'kvd.node', "
        "'kvd.config', 'kvd.metrics')))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_module_is_over_the_line_limit() -> None:
    long = {}
    for path in (ROOT / "kvd").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and name not in LONG_ALLOWED:
            long[name] = lines
    assert not long, f"over {MAX_LINES} lines, split by concern: {long}"
