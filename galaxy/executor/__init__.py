"""Task execution on a worker: see core.py (pure), runner.py (processes), resources.py."""

from galaxy.executor.core import CANCELLED, FAILED, STATES, SUCCEEDED, TIMED_OUT, ExecSpec, Result
from galaxy.executor.runner import Attempt, Executor

__all__ = ["CANCELLED", "FAILED", "STATES", "SUCCEEDED", "TIMED_OUT", "Attempt", "ExecSpec",
           "Executor", "Result"]
