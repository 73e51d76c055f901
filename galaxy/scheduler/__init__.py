"""Task placement on the coordinator (pure): see galaxy/scheduler/core.py."""

from galaxy.scheduler.core import (
    LOOKAHEAD, PLACEMENTS_MAX, POLICIES, QUEUE_BUFFER_MS, QUEUE_FACTOR_MAX, RESERVATIONS_MAX, TRUST_LEVELS,
    Assigned, Assignment, Demand, Fence, NodeView, PendingTask, Placed, Plan, auto_queue_max, check_plan, plan,
    queued_count, room_for_any, start_order,
)

__all__ = [
    "LOOKAHEAD", "PLACEMENTS_MAX", "POLICIES", "QUEUE_BUFFER_MS", "QUEUE_FACTOR_MAX", "RESERVATIONS_MAX",
    "TRUST_LEVELS", "Assigned", "Assignment", "Demand", "Fence", "NodeView", "PendingTask", "Placed", "Plan",
    "auto_queue_max", "check_plan", "plan", "queued_count", "room_for_any", "start_order",
]
