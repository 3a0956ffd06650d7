"""A data file of the features table as one typed value, from the task that writes it to the
commit that adds or removes it (:func:`fruitdask.lake.table.commit`).

A task on a worker or an executor writes a file and returns its :class:`FileAction` (small,
picklable); the run decides which files its one commit adds and which it removes, and only
the commit turns them into delta-rs' own actions (:meth:`FileAction.add_action`,
:meth:`FileAction.remove_action`), as delta-rs' Python writer passes its ``AddAction``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # deltalake is imported where a commit is made
    from deltalake.transaction import AddAction, RemoveAction


def now_ms() -> int:
    """Milliseconds since the epoch: Delta's unit for file times."""
    return int(time.time() * 1000)


@dataclass(frozen=True)
class FileAction:
    """A data file, relative to the table root, that a commit adds or removes.

    ``rows`` and ``stats`` (Delta's per-file statistics, JSON) are known for a file this run
    wrote; a file of the version read that the run removes may carry its path and size only.
    ``modification_time`` is when the file was written (Delta's ``modificationTime``, in ms);
    ``data_change`` is False only for a rewrite that changes no row (Delta's convention).
    """

    path: str
    size: int
    rows: int | None = None
    stats: str | None = None
    modification_time: int = field(default_factory=now_ms)
    partition_values: Mapping[str, str | None] = field(default_factory=dict)
    data_change: bool = True

    def add_action(self) -> AddAction:
        """delta-rs' action adding this file (its statistics are required)."""
        from deltalake.transaction import AddAction

        if self.stats is None:
            raise ValueError(f"{self.path}: a file is added with its statistics (Delta's stats JSON), none given")
        return AddAction(self.path, int(self.size), dict(self.partition_values), int(self.modification_time),
                         self.data_change, self.stats)

    def remove_action(self, deletion_timestamp: int) -> RemoveAction:
        """delta-rs' action removing this file at ``deletion_timestamp`` (ms since the epoch)."""
        from deltalake.transaction import RemoveAction

        return RemoveAction(self.path, self.data_change, deletion_timestamp, int(self.size) if self.size else None,
                            dict(self.partition_values) or None)
