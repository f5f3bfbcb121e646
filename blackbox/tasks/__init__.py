"""Few-shot classification tasks: definitions, prompt templates, data loading, and tasks
from the user's own task files (taskfile.py).

Pure Python (no torch) so that the client and the server can share it.
"""

from .data import ENV_VAR, SPLITS, Example, list_seeds, load_split, load_task_file, resolve_data_dir, stratified_subset
from .demonstrations import pick_demonstrations, with_demonstrations
from .registry import (
    PLACEHOLDERS,
    PLACEMENTS,
    DataQuirks,
    Task,
    TaskError,
    get_task,
    list_tasks,
    place_prompt,
    register_task,
    validate_template,
)
from .taskfile import FileTask, describe_task_file, task_from_file

__all__ = [
    "ENV_VAR",
    "PLACEHOLDERS",
    "PLACEMENTS",
    "SPLITS",
    "DataQuirks",
    "Example",
    "FileTask",
    "Task",
    "TaskError",
    "describe_task_file",
    "get_task",
    "list_seeds",
    "list_tasks",
    "load_split",
    "load_task_file",
    "pick_demonstrations",
    "place_prompt",
    "register_task",
    "resolve_data_dir",
    "stratified_subset",
    "task_from_file",
    "validate_template",
    "with_demonstrations",
]
