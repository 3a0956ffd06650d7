"""What a run records about itself: stage timings, versions, and the ``run.json`` document."""

from __future__ import annotations

import importlib.metadata
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

PACKAGES = (
    "fruitdask", "dask", "distributed", "dask-ml", "tensorflow", "tensorflow-cpu", "keras", "numpy",
    "pandas", "pyarrow", "pillow", "s3fs", "fsspec", "scikit-learn", "pyspark", "dask-kubernetes",
)


def versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on (absent ones are left out)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class StageTimer:
    """Wall-clock seconds per named stage, in the order the stages ran."""

    stages: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0

    @property
    def total(self) -> float:
        return time.time() - self.started

