"""The machine a bench runs on: CPU and bf16 flags, how busy it is, the memory of a child."""

from __future__ import annotations

import os
import threading
from typing import Any

#: A run counts as quiet when the CPU was at most this busy just before it started (2 idle
#: cores read 1-5 %; another helper's test run reads 50 % or more).
QUIET_CPU_PCT = 25.0
QUIET_SAMPLE_S = 2.0


class MemorySampler:
    """Peak RSS of a process tree, split into driver, JVM and workers (sampled every 0.2 s)."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.peak = {"driver_mb": 0.0, "jvm_mb": 0.0, "workers_mb": 0.0, "worker_max_mb": 0.0, "n_workers": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        try:
            driver = self.root.memory_info().rss
            kids = self.root.children(recursive=True)
        except psutil.Error:
            return
        jvm, workers = 0, []
        for k in kids:
            try:
                rss, name = k.memory_info().rss, k.name().lower()
            except psutil.Error:
                continue
            if "java" in name:
                jvm += rss
            else:
                workers.append(rss)
        mb = 1 / 2**20
        self.peak["driver_mb"] = max(self.peak["driver_mb"], driver * mb)
        self.peak["jvm_mb"] = max(self.peak["jvm_mb"], jvm * mb)
        self.peak["workers_mb"] = max(self.peak["workers_mb"], sum(workers) * mb)
        self.peak["worker_max_mb"] = max(self.peak["worker_max_mb"], max(workers, default=0) * mb)
        self.peak["n_workers"] = max(self.peak["n_workers"], len(workers))

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {k: round(v, 1) for k, v in self.peak.items()}


def machine(cpuinfo: str | None = None) -> dict:
    """CPU model, core count, memory and the bf16 flags that decide ``--precision auto``."""
    from fruitdask.features import precision

    text = precision.read_cpuinfo() if cpuinfo is None else cpuinfo
    flags = precision.cpu_flags(text)
    info: dict[str, Any] = {
        "cpus": os.cpu_count(), "cpu": precision.cpu_model(text),
        "cpu_flags": {f: f in flags for f in ("avx512f", *precision.BF16_CPU_FLAGS)},
        "gpu_compute_capabilities": precision.gpu_compute_capabilities(),
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        pass
    return info


def sample_load(seconds: float = QUIET_SAMPLE_S) -> dict:
    """How busy the machine is *now*, right before an engine starts (nothing of the bench runs).

    The verdict uses the CPU busy share over the last ``seconds``; the 1-minute load average
    is kept for the record but still holds the previous engine's tail for a minute.
    """
    import psutil

    busy = psutil.cpu_percent(interval=seconds)
    return {"cpu_busy_pct": round(busy, 1), "load_1min": round(os.getloadavg()[0], 2), "quiet": busy <= QUIET_CPU_PCT}


def parse_precisions(text: str | None, default: str, runtimes: str | None = None) -> list[str]:
    """The ``--precisions`` axis, resolved on this machine (bfloat16 refused where TensorFlow
    would emulate it), crossed with ``--runtimes``: a TensorFlow cell is named by its precision
    (as before runtimes), an OpenVINO one ``openvino-PRECISION`` (:func:`variant`). int8 runs on
    OpenVINO only; OpenVINO's bfloat16 runs where it is emulated too (its plugin does so)."""
    from fruitdask.features import precision

    asked = [p.strip() for p in (text or default).split(",") if p.strip()]
    names = [r.strip() for r in (runtimes or "tensorflow").split(",") if r.strip()]
    out: list[str] = []
    for runtime in names:
        for p in asked:
            if runtime == "tensorflow":
                if p == "int8":
                    continue
                label = precision.detect_and_resolve(p).precision
            else:
                label = f"{runtime}-{p if p != 'auto' else precision.detect_and_resolve(p).precision}"
            if label not in out:
                out.append(label)
    return out


def variant(label: str) -> tuple[str, str]:
    """``(runtime, precision)`` of a bench cell's label (:func:`parse_precisions`)."""
    runtime, _, prec = label.rpartition("-")
    return runtime or "tensorflow", prec
