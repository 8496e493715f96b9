"""Built-in experiments (tasks) and the readers of the data sets they use."""

from __future__ import annotations

from ntrace.tasks.registry import TASKS, Task, get_task

__all__ = ["TASKS", "Task", "get_task"]
