"""The Prometheus side of kvd/metrics.py: a node's registry and the families it exports,
read from the node at scrape time (rule 2 there). Imported at the first scrape only, so a
daemon nobody scrapes never loads prometheus_client."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from kvd._version import version

if TYPE_CHECKING:
    from kvd.metrics import NodeMetrics

__all__ = ["CONTENT_TYPE", "exposition", "registry"]

# The text format would carry a *_created series beside every counter and histogram, doubling
# the series a scrape stores for a start time that process_start_time_seconds already gives.
disable_created_metrics()

CONTENT_TYPE = CONTENT_TYPE_LATEST


def registry(metrics: NodeMetrics) -> CollectorRegistry:
    """A registry of ``metrics``' node: its own families and the process, platform and GC
    collectors (one registry per node: several nodes can run in one test process)."""
    out = CollectorRegistry(auto_describe=True)
    out.register(_Counted(metrics))
    ProcessCollector(registry=out)
    PlatformCollector(registry=out)
    GCCollector(registry=out)
    out.register(_NodeCollector(metrics))
    return out


def exposition(source: CollectorRegistry) -> bytes:
    """The text exposition format of everything ``source`` collects now."""
    return generate_latest(source)


class _Counted:
    """Exports the request path's plain counts (kvd/metrics_counts.py) at scrape time."""

    def __init__(self, metrics: NodeMetrics):
        self.metrics = metrics

    def describe(self):
        return self.collect()

    def collect(self):
        m = self.metrics
        for histogram in (m.requests, m.siblings, m.resp_commands):
            family = HistogramMetricFamily(histogram.name, histogram.documentation,
                                           labels=histogram.labelnames)
            les = [floatToGoString(b) for b in histogram.bounds] + ["+Inf"]
            for labels, cumulative, total in histogram.series():
                family.add_metric(list(labels), list(zip(les, cumulative)), total)
            yield family
        failures = CounterMetricFamily(m.quorum_failures.name, m.quorum_failures.documentation,
                                       labels=m.quorum_failures.labelnames)
        for labels, count in m.quorum_failures.counts.items():
            failures.add_metric(list(labels), count)
        yield failures


class _NodeCollector:
    """Reads the node's counters and state at scrape time (rule 2)."""

    def __init__(self, metrics: NodeMetrics):
        self.metrics = metrics

    def describe(self):
        return []  # names depend on whether a node is attached; skip the up-front check

    def collect(self):
        metrics = self.metrics
        ready, _ = metrics.readiness()
        yield _gauge("kvd_ready", "1 when /ready answers 200.", int(ready))
        node = metrics.node
        if node is None:
            return
        info = GaugeMetricFamily("kvd_info", "This node's identity.", labels=["node", "version"])
        info.add_metric([node.node_id, version()], 1)
        yield info
        c = node.counters
        yield _counter("kvd_requests", "Client and peer requests handled.", c.requests)
        yield _counter("kvd_request_errors", "Requests answered with an error.", c.errors)
        yield _counter("kvd_connections", "Connections accepted.", c.connections)
        yield _counter("kvd_connections_rejected", "Connections refused: too many open.",
                       c.rejected_connections)
        yield _counter("kvd_protocol_errors", "Connections closed for a protocol violation.",
                       c.protocol_errors)
        yield _gauge("kvd_requests_in_flight", "Requests being handled now.", node.in_flight)
        ports = dict(getattr(node, "admissions", {}))
        if metrics.admission is not None:
            ports["metrics"] = metrics.admission
        open_ = GaugeMetricFamily("kvd_connections_open", "Connections open now, by port and "
                                  "whether they have authenticated yet.", labels=["port", "state"])
        evicted = CounterMetricFamily("kvd_connections_evicted", "Unauthenticated connections "
                                      "closed to make room for a newer one.", labels=["port"])
        for port, admission in sorted(ports.items()):
            stats = admission.statistics()
            open_.add_metric([port, "pending"], stats["pending"])
            open_.add_metric([port, "established"], stats["open"] - stats["pending"])
            evicted.add_metric([port], stats["evicted"])
        yield open_
        yield evicted
        if metrics.security is not None:
            refusals = CounterMetricFamily(
                "kvd_refusals", "Connections refused or closed by the handshake, by what "
                "happened and why (client-chosen names and numbers replaced by _).",
                labels=["what", "reason"])
            for (what, reason), count in sorted(metrics.security.refusals.totals.items()):
                refusals.add_metric([what, reason], count)
            yield refusals
        yield _counter("kvd_read_repairs", "Replicas rewritten by read repair.",
                       node.coordinator.read_repairs)

        cluster = node.cluster
        hints = cluster.handoff.pending()
        yield _gauge("kvd_hints_pending", "Hints this node holds for down replicas.",
                     sum(hints.values()))
        by_node = GaugeMetricFamily("kvd_hints_pending_by_node",
                                    "Hints this node holds, by the node they are for.",
                                    labels=["target"])
        for target, count in sorted(hints.items()):
            by_node.add_metric([target], count)
        yield by_node
        yield _counter("kvd_hints_delivered", "Hints handed off to their node.",
                       cluster.handoff.delivered)

        progress = cluster.transfers.progress
        fetching = progress.get("partitions_left", 0) if progress.get("state") in (
            "running", "retrying") else 0
        yield _gauge("kvd_transfers_in_progress",
                     "Partitions this node is fetching for a ring change.", fetching)
        state = cluster.state
        yield _gauge("kvd_transfers_pending", "Partition moves of the ring not finished yet "
                     "(cluster-wide).", len(state.pending))
        yield _gauge("kvd_transfer_bytes", "Bytes fetched by the current transfer plan.",
                     progress.get("bytes_done", 0))
        yield _gauge("kvd_transfer_keys", "Keys fetched by the current transfer plan.",
                     progress.get("keys_done", 0))

        aae = node.aae.totals
        for name, value, text in (
            ("partitions_exchanged", aae.partitions, "Partition exchanges run."),
            ("partitions_differing", aae.partitions_differing,
             "Exchanges that found a difference."),
            ("segments_repaired", aae.segments_differing, "Hash-tree segments that differed "
             "and were repaired."),
            ("keys_repaired", aae.keys_repaired, "Keys repaired."),
            ("tombstones_purged", aae.tombstones_purged, "Tombstones removed once every "
             "replica held them."),
            ("bytes_exchanged", aae.bytes_exchanged, "Bytes sent and received by exchanges."),
            ("errors", aae.errors, "Exchanges that failed."),
        ):
            yield _counter(f"kvd_anti_entropy_{name}", "Anti-entropy: " + text, value)

        damaged = CounterMetricFamily("kvd_damaged_copies", "Stored copies found failing "
                                      "their checksum (disk rot), by kind: a key's object, a "
                                      "large value's blob.", labels=["kind"])
        damaged.add_metric(["object"], node.store.damaged_found)
        damaged.add_metric(["blob"], node.store.blobs.damaged_found)
        yield damaged
        size = GaugeMetricFamily("kvd_storage_bytes", "Approximate bytes on disk.",
                                 labels=["kind"])
        size.add_metric(["leveldb"], node.storage.approximate_size())
        size.add_metric(["blobs"], metrics._blob_bytes)
        yield size

        ring = state.ring
        yield _gauge("kvd_ring_version", "Version of the committed ring.", ring.version)
        yield _gauge("kvd_ring_partitions", "Partitions of the ring (Q).", ring.q)
        yield _gauge("kvd_partitions_owned", "Partitions this node is first owner of.",
                     len(ring.partitions_of(node.node_id)))
        members = GaugeMetricFamily("kvd_cluster_nodes", "Nodes of the ring by liveness, as "
                                    "this node's failure detector sees them.", labels=["state"])
        nodes = ring.nodes()
        up = sum(1 for m in nodes if m == node.node_id or cluster.is_up(m))
        members.add_metric(["up"], up)
        members.add_metric(["down"], len(nodes) - up)
        yield members


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)
