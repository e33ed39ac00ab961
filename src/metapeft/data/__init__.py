"""Tasks: readers, validation, episode sampling and the synthetic task families."""

from metapeft.data.tasks import Example, Task, load_task, read_rows

__all__ = ["Example", "Task", "load_task", "read_rows"]
