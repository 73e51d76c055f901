"""Task placement on the coordinator (pure): see galaxy/scheduler/core.py."""

from galaxy.scheduler.core import (
    LOOKAHEAD, PLACEMENTS_MAX, POLICIES, RESERVATIONS_MAX, TRUST_LEVELS, Assignment, Demand, Fence,
    NodeView, PendingTask, Placed, Plan, check_plan, plan, room_for_any,
)

__all__ = [
    "LOOKAHEAD", "PLACEMENTS_MAX", "POLICIES", "RESERVATIONS_MAX", "TRUST_LEVELS", "Assignment", "Demand",
    "Fence", "NodeView", "PendingTask", "Placed", "Plan", "check_plan", "plan", "room_for_any",
]
