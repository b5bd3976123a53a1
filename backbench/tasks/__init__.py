"""The task layer: every task is one module that registers a :class:`~backbench.tasks.base.Task`.

The built-in tasks are the modules :mod:`backbench.probe.builtin` imports; the registry
loads them on first use (:func:`~backbench.tasks.base.registered`). A new task is one more
module that calls :func:`register`: the CLI, the battle and the Python API find it there.
"""

from backbench.tasks.base import (FeatureSpec, Param, RunOptions, Task, TaskRequest, get_task, main_metric,
                                  register, registered, run_task)

__all__ = ["FeatureSpec", "Param", "RunOptions", "Task", "TaskRequest", "get_task", "main_metric", "register",
           "registered", "run_task"]
