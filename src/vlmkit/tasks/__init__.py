"""Tasks: what differs between kinds of training (see `vlmkit.tasks.base`). The registry row of a model
family names its task (`vlmkit.models.registry.FAMILIES`)."""

from __future__ import annotations

from vlmkit.errors import ConfigError
from vlmkit.tasks.base import Task


def task_class(name: str) -> type[Task]:
    """The task class registered under `name` ("contrastive", "coca", "llava", "fusion", "flamingo", "dalle",
    "flow", "video-contrastive")."""
    from vlmkit.tasks.coca import CocaTask
    from vlmkit.tasks.contrastive import ContrastiveTask
    from vlmkit.tasks.dalle import DalleTask
    from vlmkit.tasks.flamingo import FlamingoTask
    from vlmkit.tasks.flow import FlowTask
    from vlmkit.tasks.fusion import FusionTask
    from vlmkit.tasks.llava import LlavaTask
    from vlmkit.tasks.video import VideoContrastiveTask

    tasks = {
        t.name: t
        for t in (
            ContrastiveTask,
            VideoContrastiveTask,
            CocaTask,
            LlavaTask,
            FusionTask,
            FlamingoTask,
            DalleTask,
            FlowTask,
        )
    }
    if name not in tasks:
        raise ConfigError(f"unknown task {name!r}; vlmkit has {', '.join(tasks)}")
    return tasks[name]


__all__ = ["Task", "task_class"]
