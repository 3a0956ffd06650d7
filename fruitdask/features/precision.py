"""Numeric precision of the VGG16 forward pass: ``float32``, ``bfloat16``, ``int8`` (the OpenVINO
runtime only, :mod:`fruitdask.features.runtimes.choice`) or ``auto``.

bfloat16 (Keras ``mixed_bfloat16``: float32 weights, bfloat16 matmuls) roughly doubles
VGG16's throughput on CPUs with native bf16 instructions (AVX512_BF16, AMX) and on GPUs
from compute capability 8.0 (Ampere) on; elsewhere it is emulated and *slower* than
float32, so it is refused there. The features that leave the model are float32 either way.

Detection is pure (:func:`resolve`, :func:`cpu_bf16_flags` take text and flags, not the
machine), so it is tested with fake ``/proc/cpuinfo`` contents; only
:func:`detect_and_resolve` reads the machine.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass

from fruitdask.config import PRECISIONS
from fruitdask.errors import ClusterError, ConfigError

logger = logging.getLogger(__name__)

#: ``/proc/cpuinfo`` flags that mean native bf16 arithmetic (AVX512_BF16 dot products, AMX tiles).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")
#: ``/proc/cpuinfo`` flags of native int8 dot products (VNNI, AMX).
INT8_CPU_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
#: CUDA compute capability from which GPUs have bf16 tensor cores (Ampere).
BF16_MIN_COMPUTE_CAPABILITY = 8.0


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first CPU in ``/proc/cpuinfo`` text (x86 ``flags``, Arm ``Features``)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_model(cpuinfo: str) -> str | None:
    """The ``model name`` line of ``/proc/cpuinfo`` text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return None


def cpu_bf16_flags(flags: set[str]) -> list[str]:
    """The native-bf16 flags among ``flags`` (empty: bf16 would be emulated)."""
    return [f for f in BF16_CPU_FLAGS if f in flags]


def gpu_has_bf16(compute_capabilities: list[float]) -> bool:
    """Whether any GPU of these compute capabilities has bf16 tensor cores."""
    return any(cc >= BF16_MIN_COMPUTE_CAPABILITY for cc in compute_capabilities)


@dataclass(frozen=True)
class Resolved:
    """The precision a run uses, what was asked for, and why."""

    requested: str
    precision: str  # "float32" or "bfloat16"
    reason: str

    def to_dict(self) -> dict:
        return {"requested": self.requested, "precision": self.precision, "reason": self.reason}


def resolve(requested: str, cpuinfo: str, gpu_compute_capabilities: list[float] | None = None) -> Resolved:
    """Decide the precision from the request and the hardware (pure: no machine access).

    Raises
    ------
    ConfigError
        For an unknown value, or ``bfloat16`` on hardware that would only emulate it.
    """
    if requested not in PRECISIONS:
        raise ConfigError(f"unknown precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested == "float32":
        return Resolved(requested, "float32", "requested")
    if requested == "int8":  # the OpenVINO runtime's; VNNI (avx512_vnni, amx_int8) runs it natively
        vnni = sorted(INT8_CPU_FLAGS & cpu_flags(cpuinfo))
        return Resolved(requested, "int8", f"requested ({', '.join(vnni) or 'no VNNI/AMX flag: int8 without native dot products'})")
    native = cpu_bf16_flags(cpu_flags(cpuinfo))
    gpus = list(gpu_compute_capabilities or [])
    if native:
        why = f"CPU has {', '.join(native)}"
    elif gpu_has_bf16(gpus):
        why = f"GPU with compute capability {max(gpus):g}"
    else:
        why = None
    if requested == "auto":
        if why:
            return Resolved(requested, "bfloat16", f"auto: {why}")
        return Resolved(requested, "float32", "auto: no native bf16 (no avx512_bf16/amx_bf16 CPU flag, no bf16 GPU)")
    if not why:
        model = cpu_model(cpuinfo) or "this CPU"
        raise ConfigError(
            f"--precision bfloat16 needs native bf16 arithmetic, but {model} has no avx512_bf16 or amx_bf16 flag "
            f"(and no GPU of compute capability >= {BF16_MIN_COMPUTE_CAPABILITY:g} was found): bf16 would be "
            "emulated, slower than float32. Use --precision float32 (or auto), or run on a CPU with AVX512_BF16/AMX "
            "(AMD Zen 4+, Intel Sapphire Rapids+: EC2 c7i/m7i/r7i, c7a/m7a)"
        )
    return Resolved(requested, "bfloat16", why)


def read_cpuinfo(path: str = "/proc/cpuinfo") -> str:
    """``/proc/cpuinfo`` text, or "" where there is none (macOS, Windows)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def gpu_compute_capabilities() -> list[float]:
    """Compute capabilities of the NVIDIA GPUs ``nvidia-smi`` sees (none without it).

    Asked of ``nvidia-smi`` rather than TensorFlow so that the client never imports TensorFlow
    to decide the precision.
    """
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        logger.debug("nvidia-smi failed (%s): no GPU considered for bf16", e)
        return []
    caps = []
    for line in out.splitlines():
        try:
            caps.append(float(line.strip()))
        except ValueError:
            continue
    return caps


def detect_and_resolve(requested: str) -> Resolved:
    """:func:`resolve` on this machine's CPU flags and GPUs.

    The workers of a local cluster share the client's CPU; on a remote cluster the workers'
    nodes must have the same CPU generation (the chart's node selector pins it).
    """
    if requested == "float32":
        return Resolved(requested, "float32", "requested")
    if requested == "int8":
        return resolve(requested, read_cpuinfo())
    return resolve(requested, read_cpuinfo(), gpu_compute_capabilities())



def agree(requested: str, per_worker: dict[str, dict]) -> Resolved:
    """One precision for a cluster whose workers each resolved ``requested`` on their own
    hardware (``--cluster`` a scheduler address or Kubernetes: the client's CPU says nothing
    about the workers'). ``per_worker`` maps a worker to its :func:`detect_on_worker` answer.
    bfloat16 only where every worker has it natively: one emulating worker would make each
    partition it gets several times slower.

    Raises
    ------
    ClusterError
        When no worker answered (nothing to decide on).
    ConfigError
        ``bfloat16`` asked while some worker would only emulate it.
    """
    if not per_worker:
        raise ClusterError(f"--precision {requested}: no worker answered, cannot tell whether they have native bf16")
    if requested in ("float32", "int8"):
        return Resolved(requested, requested, "requested")
    without = sorted(w for w, r in per_worker.items() if r["precision"] != "bfloat16")
    if not without:
        reasons = sorted({r["reason"].removeprefix("auto: ") for r in per_worker.values()})
        why = f"all {len(per_worker)} workers: {'; '.join(reasons)}"
        return Resolved(requested, "bfloat16", f"auto: {why}" if requested == "auto" else why)
    summary = f"{len(without)} of {len(per_worker)} workers without native bf16 (e.g. {without[0]}: {per_worker[without[0]]['reason']})"
    if requested == "bfloat16":
        raise ConfigError(f"--precision bfloat16: {summary}; bf16 would be emulated there. Use --precision auto or float32")
    return Resolved(requested, "float32", f"auto: {summary}")


def detect_on_worker(requested: str) -> dict:
    """``client.run`` body: this worker's :func:`detect_and_resolve` as a plain dict
    (``bfloat16`` where it would be emulated answers float32 with the reason, so that
    :func:`agree` can name the worker)."""
    try:
        return detect_and_resolve(requested).to_dict()
    except ConfigError as e:
        return {"requested": requested, "precision": "float32", "reason": str(e)}
