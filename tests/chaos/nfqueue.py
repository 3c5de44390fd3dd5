"""A lossy, slow link through NFQUEUE, in pure Python (no libnetfilter_queue, no build step).

This kernel has no sch_netem, and no nft ``queue`` statement (CONFIG_NFT_QUEUE is off), so the
chaos suite sends the packets of the faulty node's link to an iptables ``NFQUEUE`` target
(xt_NFQUEUE) and this program, run inside that node's network namespace, decides:
``--drop`` of them are dropped (default 20 %), the others are accepted after ``--delay``
seconds (default 0.05). It speaks the nfnetlink_queue protocol directly on an
``AF_NETLINK``/``NETLINK_NETFILTER`` socket, copying only packet metadata (we never look at or
change a payload), so it needs nothing but the standard library.

Run: ``ip netns exec NS python nfqueue.py --queue 7 --drop 0.2 --delay 0.05``. It prints
``ready`` once bound, and on SIGTERM/SIGINT a line ``seen=N dropped=N`` before exiting.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1
NF_DROP = 0
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NLA_TYPE_MASK = 0x3FFF


def _attr(kind: int, payload: bytes) -> bytes:
    header = struct.pack("=HH", 4 + len(payload), kind)
    pad = (-len(payload)) % 4
    return header + payload + b"\0" * pad


def _message(msg: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0,
             family: int = socket.AF_UNSPEC) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(queue)) + attrs
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def _parse_attrs(data: bytes) -> dict[int, bytes]:
    out = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out[kind & NLA_TYPE_MASK] = data[offset + 4: offset + length]
        offset += (length + 3) & ~3
    return out


class Queue:
    def __init__(self, queue: int):
        self.queue = queue
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((0, 0))
        self.seq = 0

    def _request(self, msg: int, attrs: bytes, family: int = socket.AF_UNSPEC) -> None:
        self.seq += 1
        self.sock.send(_message(msg, self.queue, attrs, NLM_F_REQUEST | NLM_F_ACK, self.seq,
                                family))
        reply = self.sock.recv(65536)
        length, kind = struct.unpack_from("=IH", reply, 0)
        if kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", reply, 16)
            if error != 0:
                raise OSError(-error, f"nfqueue config message {msg}: {os.strerror(-error)}")

    def bind(self) -> None:
        self._request(NFQNL_MSG_CONFIG, _attr(
            NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)))
        self._request(NFQNL_MSG_CONFIG, _attr(
            NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)))

    def unbind(self) -> None:
        try:
            self._request(NFQNL_MSG_CONFIG, _attr(
                NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_UNBIND, 0, socket.AF_INET)))
        except OSError:
            pass

    def receive(self) -> list[int]:
        """Packet ids of every queued packet in one datagram."""
        data = self.sock.recv(1 << 20)
        ids = []
        offset = 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if length < 16:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                attrs = _parse_attrs(data[offset + 20: offset + length])
                header = attrs.get(NFQA_PACKET_HDR)
                if header is not None:
                    ids.append(struct.unpack_from("!I", header, 0)[0])
            offset += (length + 3) & ~3
        return ids

    def verdict(self, packet_id: int, verdict: int) -> None:
        self.sock.send(_message(NFQNL_MSG_VERDICT, self.queue, _attr(
            NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, default=7)
    parser.add_argument("--drop", type=float, default=0.2)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    queue = Queue(args.queue)
    queue.bind()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    print("ready", flush=True)
    pending: list[tuple[float, int]] = []  # (release time, packet id)
    seen = dropped = 0
    while not stop:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else 0.5
        try:
            readable, _, _ = select.select([queue.sock], [], [], timeout)
        except InterruptedError:
            continue
        if readable:
            try:
                ids = queue.receive()
            except OSError as exc:  # ENOBUFS: the kernel dropped some; they count as lost
                print(f"receive: {exc}", file=sys.stderr, flush=True)
                ids = []
            now = time.monotonic()
            for packet_id in ids:
                seen += 1
                if rng.random() < args.drop:
                    dropped += 1
                    queue.verdict(packet_id, NF_DROP)
                else:
                    heapq.heappush(pending, (now + args.delay, packet_id))
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            queue.verdict(heapq.heappop(pending)[1], NF_ACCEPT)
    for _, packet_id in pending:
        queue.verdict(packet_id, NF_ACCEPT)
    queue.unbind()
    print(f"seen={seen} dropped={dropped}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
