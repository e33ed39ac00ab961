"""Tasks and the data they come from.

- ``tasks``: ``Example``, ``Task`` and the validating readers (``read_rows``, ``read_task_dir``);
- ``episodes``: the one N-way K-shot sampler (``sample_episode``, ``EpisodeSource``), class
  splits, sweep tasks and ``load_task``;
- ``pools``: domain and label filters over a pool;
- ``feedback``: feedback-log task extraction and replay weights;
- ``synthetic``: the deterministic synthetic task families.
"""

from metapeft.data.episodes import (EpisodeSource, load_task, sample_episode, sample_sweep_tasks,
                                    split_classes)
from metapeft.data.feedback import (ReplayWeights, TaskGroup, extract_tasks, format_report,
                                    read_feedback, replay_stats, replay_weights)
from metapeft.data.pools import (class_overlap, filter_pool, read_label_list,
                                 split_classes_by_domain)
from metapeft.data.tasks import Example, Task, read_rows, read_task_dir

__all__ = [
    "EpisodeSource",
    "Example",
    "ReplayWeights",
    "Task",
    "TaskGroup",
    "class_overlap",
    "extract_tasks",
    "filter_pool",
    "format_report",
    "load_task",
    "read_feedback",
    "read_label_list",
    "read_rows",
    "read_task_dir",
    "replay_stats",
    "replay_weights",
    "sample_episode",
    "sample_sweep_tasks",
    "split_classes",
    "split_classes_by_domain",
]
