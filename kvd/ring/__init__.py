"""The pure ring package: partitioner, ring value, claim/plan, preference lists.

Imports neither trio nor plyvel (tests/test_ring.py checks it).
"""

from kvd.ring.apl import (
    FALLBACK,
    PRIMARY,
    annotated_preference_list,
    effective_n,
    fallbacks,
    preference_list,
)
from kvd.ring.claim import (
    Move,
    claim,
    distinct_feasible,
    n_distinct_feasible,
    plan,
    violations,
    zones_enforced,
)
from kvd.ring.ring import Ring, new_ring, partition_of

__all__ = [
    "FALLBACK",
    "PRIMARY",
    "Move",
    "Ring",
    "annotated_preference_list",
    "claim",
    "distinct_feasible",
    "effective_n",
    "fallbacks",
    "n_distinct_feasible",
    "new_ring",
    "partition_of",
    "plan",
    "preference_list",
    "violations",
    "zones_enforced",
]
