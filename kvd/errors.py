"""Error types shared by the daemon, the client library and kvctl.

Each error carries a stable wire ``code`` (sent in ERROR frames, see docs/protocol.md) and the
kvctl ``exit_code`` an operator sees (DESIGN section 7: 1 not found or failed, 2 usage,
3 quorum not reached, 4 cannot connect or not authorised).
"""

from __future__ import annotations

from contextlib import contextmanager


class KvdError(Exception):
    """Base of every expected failure; its message is one line meant for a human."""

    code = "internal"
    exit_code = 1


class ConfigError(KvdError):
    """A configuration value is missing, of the wrong type, or out of range."""

    code = "config"
    exit_code = 2


class ProtocolError(KvdError):
    """Bytes on a connection do not follow the wire protocol; the connection is closed."""

    code = "protocol"
    exit_code = 1


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow (garbage, oversized frame, ...)."""


class FrameTooLarge(RemoteProtocolError):
    """A frame's declared body length exceeds the connection's current limit."""

    code = "frame_too_large"


class BadRequest(KvdError):
    """A well-formed request whose arguments are invalid (empty key, R > N, bad context)."""

    code = "bad_request"
    exit_code = 2


class NotFound(KvdError):
    """The key has no live value."""

    code = "not_found"
    exit_code = 1


class TooManySiblings(KvdError):
    """A write would leave a key with more siblings than the hard limit."""

    code = "too_many_siblings"
    exit_code = 1


class QuorumFailed(KvdError):
    """Fewer replicas than R or W answered in time."""

    code = "quorum"
    exit_code = 3


class Unavailable(KvdError):
    """The node cannot serve the request right now (shutting down, no ring yet)."""

    code = "unavailable"
    exit_code = 3


class Damaged(KvdError):
    """A replica's stored copy of a key failed its checksum (disk rot): it is not used; the
    key's other replicas answer for it, and a read repair replaces it."""

    code = "damaged"
    exit_code = 1


class ConnectFailed(KvdError):
    """The client could not connect to, or lost its connection to, a node."""

    code = "connect"
    exit_code = 4


class Unauthorized(KvdError):
    """Authentication failed, or the credentials lack the role the request needs."""

    code = "unauthorized"
    exit_code = 4


_BY_CODE = {
    cls.code: cls
    for cls in (
        KvdError,
        ConfigError,
        ProtocolError,
        FrameTooLarge,
        BadRequest,
        NotFound,
        TooManySiblings,
        QuorumFailed,
        Unavailable,
        Damaged,
        ConnectFailed,
        Unauthorized,
    )
}


def error_from_code(code: str, message: str) -> KvdError:
    """Rebuild the error a remote node reported in an ERROR frame."""
    return _BY_CODE.get(code, KvdError)(message)


@contextmanager
def unwrap_single_error():
    """Re-raise a lone error from a nursery's exception group as itself, so callers can
    catch KvdError (and kvctl can map it to an exit code) without knowing about groups."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        kvd_errors = [e for e in leaves if isinstance(e, KvdError)]
        if kvd_errors and len(kvd_errors) == len(leaves):
            raise kvd_errors[0] from None
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
