"""Pure membership core: phi accrual failure detector, gossiped member table, cluster state.

Imports neither trio nor plyvel (tests/test_membership.py checks it); time is an argument.
"""

from kvd.membership.cluster_state import (
    CHANGE_KINDS,
    Change,
    ClusterState,
    claimant,
    clear,
    commit,
    merge,
    moving,
    new_cluster,
    owners_for_writes,
    plan,
    serving_owner,
    stage,
    transfer_done,
)
from kvd.membership.members import STATUSES, MemberInfo, MemberTable
from kvd.membership.phi import HeartbeatHistory, PhiAccrualDetector

__all__ = [
    "CHANGE_KINDS",
    "STATUSES",
    "Change",
    "ClusterState",
    "HeartbeatHistory",
    "MemberInfo",
    "MemberTable",
    "PhiAccrualDetector",
    "claimant",
    "clear",
    "commit",
    "merge",
    "moving",
    "new_cluster",
    "owners_for_writes",
    "plan",
    "serving_owner",
    "stage",
    "transfer_done",
]
