"""The RESP front door's connections: authentication, pipelining, and the connection and
server commands (PING, HELLO, AUTH, CLIENT, COMMAND, INFO, CONFIG GET, ...). The data
commands are kvd.node.resp_data's; the parsing and serializing, kvd.proto.resp's.

Rules:

1. Same security as the client port: with client tokens configured, nothing but AUTH,
   HELLO, PING... before AUTH (``-NOAUTH``), and the token's role bounds what follows
   (``-NOPERM``); without tokens, only loopback clients are served (Redis's protected
   mode). Until then the parser's limits are Redis's pre-auth ones (kvd.proto.resp Rule 3).
2. Same budgets as the client port: the listener admits through its own
   kvd.net.admission budget; a connection is pending until it has authenticated (or, without
   tokens, sent its first command). Its Session (kvd.node.resp_session) closes one that
   waits too long for its client.
3. Pipelining: commands are answered in order, one at a time; replies are gathered and
   written when the parser needs more bytes, through the session's output queue, which
   never holds up reading (kvd.node.resp_session Rule 2).
4. A protocol error gets ``-ERR Protocol error: ...`` (a kvd frame, the line naming the
   client port: kvd.proto.resp Rule 5) and the connection closes; any other failure of a
   command is an error reply and the connection stays.
"""

from __future__ import annotations

import logging

import trio

from kvd import _version
from kvd.address import is_loopback_host
from kvd.errors import ConnectFailed, KvdError, ProtocolError, unwrap_single_error
from kvd.net import rawstream
from kvd.net.admission import serve_admitted
from kvd.node import resp_data
from kvd.node.large_values import send_value
from kvd.node.resp_session import STREAM_WINDOW, Session
from kvd.proto import resp
from kvd.proto.glob import glob_match
from kvd.proto.resp import Error, Simple, Verbatim
from kvd.security import Grant

log = logging.getLogger("kvd.resp")

FLUSH_AT = 256 * 1024  # gathered reply bytes written before the next command runs
REDIS_VERSION = "7.0.0"  # the Redis command set kvd answers like


async def serve(node, listeners: list, tls) -> None:
    """Accept RESP connections on ``listeners`` (TLS when ``tls``) within the port's budget
    (Rule 2) until cancelled."""
    await serve_admitted(lambda stream, ticket: handle_connection(node, stream, ticket),
                         listeners, node.admissions["resp"], tls=tls)


async def handle_connection(node, stream, ticket) -> None:
    """Serve one accepted RESP connection; ``ticket`` None: the port is full."""
    session = Session(node, rawstream.wrap(stream), ticket)
    try:
        if ticket is None:
            session.reply(Error("ERR max number of clients reached"))
        elif node.security.tokens is None and not is_loopback_host(session.host):
            session.reply(Error(
                "DENIED kvd's RESP port serves clients from non-loopback addresses only when "
                "client_tokens_file is configured; AUTH with a token then"))
        else:
            if node.security.tokens is None:
                session.authenticated(Grant("loopback client", "admin"))
            await _serve(session)
        await session.flush()
    except ProtocolError as exc:
        session.reply(Error(f"ERR {exc}"))
        with trio.move_on_after(1):
            await session.flush()
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectFailed):
        pass
    except KvdError as exc:  # a value failed after its header went out: the reply is cut
        log.info("closed a RESP connection from %s in mid-reply: %s", session.host, exc)


async def _serve(session: Session) -> None:
    """Answer the session's commands until it quits, closes or stays silent (Rule 2)."""
    with unwrap_single_error():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.watch, nursery.cancel_scope)
            nursery.start_soon(session.write_queued)
            await _commands(session)
            await session.flush(room=0)  # everything answered has gone out
            nursery.cancel_scope.cancel()


async def _commands(session: Session) -> None:
    node = session.node
    while True:
        event = await session.next_event()
        if event is None:
            return
        if isinstance(event, resp.StreamStart):
            started = node.clocks.monotonic()
            reply = await _streamed_set(session, event)
            if event.args and event.args[0].upper() == b"SET":
                _observed(session, "set", started, "ok", reply)
            session.reply(reply)
        elif await execute(session, event) is _QUIT:
            return
        if sum(map(len, session.out)) >= FLUSH_AT:
            await session.flush()
        if session.grant is not None and session.ticket.pending:
            session.ticket.established()  # it has spoken RESP (and authenticated): Rule 2
        if node.draining:
            return


_QUIT = object()


async def execute(session: Session, args: list[bytes]):
    """Run one command and queue its reply (Rule 1 checks first)."""
    name = args[0].upper()
    entry = _TABLE.get(name)
    if entry is None:
        # Redis quotes a bounded start of the arguments: an error line, not an echo.
        shown = " ".join(f"'{a[:32].decode(errors='replace')}'" for a in args[1:4])
        session.reply(Error(f"ERR unknown command '{args[0][:32].decode(errors='replace')}', "
                            f"with args beginning with: {shown}"))
        return None
    handler, arity, role, lower = entry
    if (arity > 0 and len(args) != arity) or len(args) < -arity:
        session.reply(Error(f"ERR wrong number of arguments for '{lower}' command"))
        return None
    refused = _refusal(session, role, lower)
    if refused is not None:
        session.reply(refused)
        return None
    started = session.node.clocks.monotonic()
    outcome = "ok"
    try:
        if role is not None:
            session.node.request_started()
        try:
            reply = await handler(session, args)
        finally:
            if role is not None:
                session.node.request_finished()
    except KvdError as exc:
        outcome = exc.code
        reply = _error_reply(exc)
    except Exception:  # a bug in one command must not take the connection or node down
        log.exception("RESP command %s failed", name[:32])
        outcome = "internal"
        reply = Error("ERR internal error; see the node's log")
    _observed(session, lower, started, outcome, reply)
    if isinstance(reply, resp_data.Streamed):
        await _send_streamed(session, reply)
    elif isinstance(reply, list) and any(isinstance(r, resp_data.Streamed) for r in reply):
        session.out.append(b"*%d\r\n" % len(reply))
        for item in reply:
            if isinstance(item, resp_data.Streamed):
                await _send_streamed(session, item)
            else:
                session.reply(item)
    elif reply is not _QUIT:
        session.reply(reply)
    return reply


def _observed(session: Session, command: str, started: float, outcome: str, reply) -> None:
    """Report one command, with how it ended, to the node's metrics (if any)."""
    if isinstance(reply, Error) and outcome == "ok":
        outcome = reply.split(" ", 1)[0].lower()
    observer = getattr(session.node, "resp_observer", None)
    if observer is not None:
        observer.resp_command_finished(command, session.node.clocks.monotonic() - started,
                                       outcome)


def _refusal(session: Session, role: str | None, command: str) -> Error | None:
    """NOAUTH or NOPERM when the session may not run ``command``, which needs ``role``
    (Rule 1); None when it may."""
    if role is None:
        return None
    grant = session.grant
    if grant is None:
        return Error("NOAUTH Authentication required.")
    if not grant.allows(role):
        return Error(f"NOPERM {grant.name} has role {grant.role}; '{command}' needs {role}")
    return None


_ERROR_WORDS = {"quorum": "QUORUM", "unavailable": "UNAVAILABLE", "unauthorized": "NOPERM",
                "too_many_siblings": "TOOMANYSIBLINGS"}


def _error_reply(exc: KvdError) -> Error:
    """A kvd error as a RESP error: a word a client can match, then the message."""
    return Error(f"{_ERROR_WORDS.get(exc.code, 'ERR')} {exc}")


async def _send_streamed(session: Session, item: resp_data.Streamed) -> None:
    """A chunked value, read from a replica piece by piece (kvd.node.resp_data Rule 4)."""
    chunks = item.sibling.chunks
    if item.source is None or chunks is None:
        session.reply(item.unavailable())
        return
    session.out.append(resp.bulk_header(chunks.length))

    async def send(data: bytes, _end: bool) -> None:
        session.out.append(data)
        await session.flush(room=STREAM_WINDOW)  # memory: the window, not the value

    await send_value(item.source, item.key, chunks, send)
    session.out.append(b"\r\n")


async def _streamed_set(session: Session, start: resp.StreamStart):
    """SET key <value above chunk_size>: the value goes to the coordinator piece by piece,
    as it arrives. Other commands with such an argument are read through and refused."""
    args = start.args
    if not (len(args) == 2 and args[0].upper() == b"SET"):
        await _read_through(session)
        return Error(f"ERR an argument above {session.node.config.chunk_size} bytes is "
                     "accepted only as SET key value")
    refused = _refusal(session, "write", "set")  # the reply a small SET gets (Rule 1)
    if refused is not None:
        await _read_through(session)
        return refused
    ended = False

    async def pieces():
        """The value in chunk_size pieces (the last may be shorter), as reads bring it."""
        nonlocal ended
        size = session.node.config.chunk_size
        gathered = bytearray()
        while not ended:
            event = await session.next_event()
            if event is None:
                raise ConnectFailed("closed in the middle of a value")
            if isinstance(event, resp.StreamEnd):
                ended = True
                if event.args:
                    raise KvdError("SET options are not supported with values above "
                                   "chunk_size")
                if gathered:
                    yield bytes(gathered)
                return
            gathered += event.data
            while len(gathered) >= size:
                yield bytes(gathered[:size])
                del gathered[:size]

    try:
        session.node.request_started()
        try:
            await resp_data.write_stream(session.node, args[1], start.length, pieces())
        finally:
            session.node.request_finished()
        return Simple("OK")
    except KvdError as exc:
        async for _ in pieces():
            pass
        return _error_reply(exc)


async def _read_through(session: Session) -> None:
    """The rest of a refused streamed command, each piece dropped as it is read: the
    connection stays in step with the client, and nothing of the value is kept."""
    while not isinstance(event := await session.next_event(), resp.StreamEnd):
        if event is None:
            raise ConnectFailed("closed in the middle of a value")


# ------------------------------------------------------------- connection commands


def _authenticate(session: Session, token: bytes, user: bytes | None = None):
    """None when ``token`` is valid (the session is then authenticated), else the error.
    ``user`` (AUTH user pass, HELLO AUTH): tokens carry their role, so it is not checked;
    without tokens, Redis's passwordless ``default`` user takes any password."""
    tokens = session.security.tokens
    if tokens is None:
        if user is not None:
            return None if user == b"default" else Error(
                "WRONGPASS invalid username-password pair or user is disabled.")
        return Error("ERR AUTH <password> called without any password configured for the "
                     "default user. Are you sure your configuration is correct?")
    grant = tokens.lookup(token.decode(errors="replace"))
    if grant is None:
        session.security.note_refusal("resp", session.host, "", "wrong token")
        return Error("WRONGPASS invalid username-password pair or user is disabled.")
    session.authenticated(grant)
    return None


async def auth(session, args):
    if len(args) > 3:
        return Error("ERR syntax error")
    return _authenticate(session, args[-1], args[1] if len(args) == 3 else None) or Simple("OK")


async def hello(session, args):
    if len(args) > 1:
        if args[1] not in (b"2", b"3"):
            return Error("NOPROTO unsupported protocol version")
        options = args[2:]
        while options:
            word = options[0].upper()
            if word == b"AUTH" and len(options) >= 3:
                refused = _authenticate(session, options[2], options[1])
                if refused:
                    return refused
                options = options[3:]
            elif word == b"SETNAME" and len(options) >= 2:
                if not _valid_name(options[1]):
                    return _BAD_NAME
                session.name, options = options[1], options[2:]
            else:
                return Error(f"ERR Syntax error in HELLO option '{word.decode(errors='replace')}'")
    if session.grant is None:
        return Error("NOAUTH HELLO must be called with the client already authenticated, "
                     "otherwise the HELLO <proto> AUTH <user> <pass> option can be used")
    if len(args) > 1:
        session.resp3 = args[1] == b"3"
    return {"server": "kvd", "version": REDIS_VERSION, "proto": 3 if session.resp3 else 2,
            "id": session.id, "mode": "standalone", "role": "master", "modules": [],
            "kvd_version": _version.version(fallback="development"),
            "node": session.node.node_id}


async def ping(session, args):
    if len(args) > 2:
        return Error("ERR wrong number of arguments for 'ping' command")
    return args[1] if len(args) == 2 else Simple("PONG")


async def echo(session, args):
    return args[1]


async def select(session, args):
    return Simple("OK") if args[1] == b"0" else Error("ERR DB index is out of range")


async def quit_(session, args):
    session.reply(Simple("OK"))
    return _QUIT


async def reset(session, args):
    session.resp3, session.name = False, b""
    if session.security.tokens is not None:
        session.grant = None
        session.parser.limits = resp.PRE_AUTH
    return Simple("RESET")


_BAD_NAME = Error("ERR Client names cannot contain spaces, newlines or special characters.")


def _valid_name(name: bytes) -> bool:
    """Redis's rule: printable ASCII without spaces (CLIENT LIST prints it in one field)."""
    return all(33 <= byte <= 126 for byte in name)


async def client(session, args):
    sub = args[1].upper()
    if sub == b"SETNAME" and len(args) == 3:
        if not _valid_name(args[2]):
            return _BAD_NAME
        session.name = args[2]
        return Simple("OK")
    if sub == b"GETNAME" and len(args) == 2:
        return session.name or None
    if sub == b"ID" and len(args) == 2:
        return session.id
    if sub == b"INFO" and len(args) == 2:
        # Redis's fields (clients parse them all), with what kvd does not track as 0.
        name = session.name.decode(errors="replace").replace(" ", "_")
        return Verbatim(f"id={session.id} addr={session.host} laddr= fd=0 name={name} "
                        "age=0 idle=0 flags=N db=0 sub=0 psub=0 ssub=0 multi=-1 qbuf=0 "
                        "qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 "
                        f"tot-mem=0 events=r cmd=client|info user=default redir=-1 "
                        f"resp={3 if session.resp3 else 2}\n")
    if sub == b"SETINFO" and len(args) == 4:
        return Simple("OK")
    return Error(f"ERR unknown subcommand '{sub.decode(errors='replace')}'. Try CLIENT HELP.")


async def command(session, args):
    table = {**COMMANDS, **resp_data.COMMANDS}
    sub = args[1].upper() if len(args) > 1 else b""
    if sub == b"COUNT":
        return len(table)
    if sub == b"DOCS":
        return {}
    if sub in (b"", b"INFO"):
        names = [a.upper() for a in args[2:]] if sub else sorted(table)
        return [_command_info(name, table[name][1]) if name in table else None
                for name in names]
    if sub == b"GETKEYS" and len(args) > 2:
        return _keys_of(args[2:], table.get(args[2].upper()))
    return Error(f"ERR unknown subcommand '{sub.decode(errors='replace')}'. "
                 "Try COMMAND HELP.")


def _command_info(name: bytes, arity: int) -> list:
    """Redis 7's ten fields: name, arity, flags, first/last key and step, ACL categories,
    tips, key specs, subcommands (kvd has no more than the first six)."""
    if name not in resp_data.COMMANDS:
        return [name.lower(), arity, [], 0, 0, 0, [], [], [], []]
    first, last, step = resp_data.KEY_POSITIONS.get(name, (1, 1, 1))
    flags = [Simple("readonly" if resp_data.COMMANDS[name][2] == "read" else "write")]
    return [name.lower(), arity, flags, first, last, step, [], [], [], []]


def _keys_of(call: list[bytes], entry) -> list[bytes] | Error:
    """COMMAND GETKEYS: the keys of ``call`` by its command's key positions (Redis's errors)."""
    if entry is None:
        return Error("ERR Invalid command specified")
    arity = entry[1]
    if len(call) != arity if arity > 0 else len(call) < -arity:
        return Error("ERR Invalid number of arguments specified for command")
    name = call[0].upper()
    first, last, step = (resp_data.KEY_POSITIONS.get(name, (1, 1, 1))
                         if name in resp_data.COMMANDS else (0, 0, 0))
    if not first:
        return Error("ERR The command has no key arguments")
    return call[first : (len(call) + last if last < 0 else last) + 1 : step]


_CONFIG = {b"save": b"", b"appendonly": b"no", b"databases": b"1", b"maxmemory": b"0"}


async def config(session, args):
    if args[1].upper() != b"GET" or len(args) < 3:
        return Error("ERR kvd answers CONFIG GET only; its settings are in kvd.toml(5)")
    return {name: value for name, value in _CONFIG.items()
            if any(glob_match(p.lower(), name) for p in args[2:])}


async def info(session, args):
    node = session.node
    wanted = {a.lower() for a in args[1:]} or {b"default"}
    every = wanted & {b"all", b"everything", b"default"}
    sections = []
    if every or b"server" in wanted:
        uptime = int(node.clocks.monotonic() - node.started)
        sections.append(["# Server", f"redis_version:{REDIS_VERSION}",
                         f"kvd_version:{_version.version(fallback='development')}",
                         f"kvd_node:{node.node_id}", "redis_mode:standalone",
                         f"uptime_in_seconds:{uptime}"])
    if every or b"clients" in wanted:
        stats = node.admissions["resp"].statistics() if "resp" in node.admissions else {}
        sections.append(["# Clients", f"connected_clients:{stats.get('open', 0)}",
                         f"maxclients:{stats.get('limit', 0)}"])
    if every or b"cluster" in wanted:
        cluster = node.cluster
        members = sorted(cluster.state.members.items())
        sections.append(["# Cluster", "cluster_enabled:0", f"kvd_members:{len(members)}"]
                        + [f"kvd_member_{name}:status={status},up={int(cluster.is_up(name))}"
                           for name, status in members])
    if b"keyspace" in wanted or b"all" in wanted or b"everything" in wanted:
        # A full coverage walk (resp_data.dbsize): only when asked for by name.
        count = await resp_data.dbsize(session, args)
        sections.append(["# Keyspace", f"db0:keys={count},expires=0,avg_ttl=0"])
    return Verbatim("\r\n\r\n".join("\r\n".join(lines) for lines in sections) + "\r\n")


# name -> (handler, arity, role needed: None for commands allowed before AUTH)
COMMANDS = {
    b"AUTH": (auth, -2, None),
    b"HELLO": (hello, -1, None),
    b"PING": (ping, -1, None),
    b"ECHO": (echo, 2, "read"),
    b"SELECT": (select, 2, "read"),
    b"QUIT": (quit_, -1, None),
    b"RESET": (reset, 1, None),
    b"CLIENT": (client, -2, "read"),
    b"COMMAND": (command, -1, "read"),
    b"CONFIG": (config, -2, "read"),
    b"INFO": (info, -1, "read"),
}

# Every command by its upper-case name: (handler, arity, role, lower-case name for replies
# and metrics), looked up once per command.
_TABLE = {name: (*entry, name.decode().lower())
          for name, entry in {**COMMANDS, **resp_data.COMMANDS}.items()}
