#!/bin/sh
# The everyday kvctl commands with stdout a pipe, as a script would run them: every plain
# table is read with awk (header line, then one row per line, whitespace-separated).
# Run by tests/test_kvctl.py against a real node: KVCTL_HOST names it, KVCTL the command.
set -eu
KVCTL=${KVCTL:-kvctl}

fail() { echo "everyday: $*" >&2; exit 1; }

# put / get: the value comes back exactly, with nothing around it.
$KVCTL put everyday:1 "hello world" 2>/dev/null
[ "$($KVCTL get everyday:1 2>/dev/null)" = "hello world" ] || fail "get did not print the value"

# status: one row per node; column 1 the state, 2 the node, 5 the partitions.
$KVCTL status 2>/dev/null | awk '
    NR == 1 { if ($1 != "STATE" || $2 != "NODE" || $5 != "PARTITIONS") exit 1; next }
    { rows++; if ($1 != "UN" || $5 !~ /^[0-9]+$/) exit 1 }
    END { if (rows != 1) exit 1 }' || fail "status is not plain columns"

# ring: ownership per node adds up to the partition count ring printed on stderr.
$KVCTL ring 2>/dev/null | awk '
    NR == 1 { if ($1 != "NODE" || $2 != "PARTITIONS") exit 1; next }
    { total += $2 } END { if (total != 1024) exit 1 }' || fail "ring is not plain columns"

# inspect: one row per replica, all present.
$KVCTL inspect everyday:1 2>/dev/null | awk '
    NR == 1 { if ($1 != "NODE" || $3 != "PRESENT") exit 1; next }
    { if ($3 != "yes") exit 1; rows++ } END { if (rows < 1) exit 1 }' \
    || fail "inspect is not plain columns"

# repair --wait: one row of numbers.
$KVCTL repair --wait 2>/dev/null | awk '
    NR == 1 { if ($1 != "PARTITIONS" || $7 != "ERRORS") exit 1; next }
    { if ($1 !~ /^[0-9]+$/ || $7 != 0) exit 1; rows++ } END { if (rows != 1) exit 1 }' \
    || fail "repair is not plain columns"

# bench: one row, ops/s a number.
$KVCTL bench --ops 50 --keys 20 --concurrency 2 --connections 1 2>/dev/null | awk '
    NR == 1 { if ($1 != "OPS" || $3 != "OPS/S") exit 1; next }
    { if ($1 != 50 || $3 !~ /^[0-9.]+$/) exit 1; rows++ } END { if (rows != 1) exit 1 }' \
    || fail "bench is not plain columns"

# transfers: nothing moving on one node: no table, the note goes to stderr.
[ -z "$($KVCTL transfers 2>/dev/null)" ] || fail "transfers printed a table with nothing moving"

# delete: gone (exit 1 from get).
$KVCTL delete everyday:1 2>/dev/null
if $KVCTL get everyday:1 >/dev/null 2>&1; then fail "the key is still there after delete"; fi

echo "everyday: ok"
