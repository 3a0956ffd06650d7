"""Which inference runtime a run uses: ``--runtime tensorflow|openvino|auto`` with
``--precision float32|bfloat16|int8|auto``, and the table's record (pure: no machine access).

- ``--runtime tensorflow`` is today's path exactly (int8 refused: TensorFlow has no int8 here).
- ``--precision int8`` alone (runtime ``auto``) picks OpenVINO, the runtime that has int8.
- On an existing table, ``auto``/``auto`` keeps the runtime, precision and calibration the
  table recorded; a table without a runtime in its record is a TensorFlow one, and keeps
  today's path (its precision resolved as before, which the settings check compares).
- On a new table, ``auto`` stays on TensorFlow: int8 becomes an ``auto`` choice only once
  :data:`INT8_GATE` holds a measurement of this project's bench that passes the accuracy gate
  (held-out accuracy within 0.5 point of float32, cosine to float32 >= 0.99). None has been
  recorded: the bench machine this was written on (Xeon, avx512_vnni, no AMX, no
  avx512_bf16) has not run the quiet bench yet, so int8 is opt-in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fruitdask.errors import ConfigError

#: The bench's measured int8 figures that let ``auto`` pick int8 on a new table (``None``: not
#: measured on the reference machine yet, int8 stays opt-in). Shape when measured:
#: ``{"accuracy_points_below_float32": 0.0, "cosine_min": 0.999, "machine": "...", "bench": "..."}``.
INT8_GATE: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Choice:
    """The runtime, the precision request to resolve (``auto`` where the hardware decides),
    the recorded calibration to reuse (JSON, or ``None``), and why."""

    runtime: str
    precision: str
    calibration: str | None
    reason: str


def choose(runtime: str, precision: str, recorded: Mapping[str, Any] | None, *, replacing: bool,
           openvino_installed: bool) -> Choice:
    """Decide the runtime of a run.

    Parameters
    ----------
    runtime, precision
        What was asked (``--runtime``, ``--precision``).
    recorded
        The table's feature settings (its description), ``None`` for a new table.
    replacing
        ``--rebuild``/``--overwrite``: the record does not bind the run.
    openvino_installed
        Whether OpenVINO can be imported here (the workers of a local cluster share it).

    Raises
    ------
    ConfigError
        int8 asked of TensorFlow, or OpenVINO asked where it is not installed (a runtime's name
        is checked by the registry, :func:`fruitdask.features.runtimes.get_runtime`: plugins add names).
    """
    if runtime == "tensorflow" and precision == "int8":
        raise ConfigError("--precision int8 needs the OpenVINO runtime (TensorFlow has no int8 path here): "
                          "pass --runtime openvino or --runtime auto, or another --precision")
    old = dict(recorded or {}) if not replacing else {}
    old_runtime = old.get("runtime", "tensorflow") if old else None
    if runtime == "auto" and precision == "auto" and old_runtime == "openvino":
        choice = Choice("openvino", str(old["precision"]), old.get("calibration"), "auto: the table's runtime and precision")
    elif runtime == "auto" and precision == "int8":
        choice = Choice("openvino", "int8", None, "--precision int8: OpenVINO has int8")
    elif runtime == "auto":
        why = "auto: the table's runtime" if old_runtime else "auto: TensorFlow (int8 stays opt-in: no measured accuracy gate)"
        choice = Choice("tensorflow", precision, None, why)
    else:
        choice = Choice(runtime, precision, None, "requested")
    if choice.runtime == "openvino" and not openvino_installed:
        raise ConfigError(f"the OpenVINO runtime ({choice.reason}) is not installed here: install fruitdask[cpu] on "
                          "Linux x86_64 (it ships openvino and nncf), or pass --runtime tensorflow with float32/bfloat16")
    if choice.precision == "int8" and old.get("runtime") == "openvino" and old.get("precision") == "int8":
        choice = Choice(choice.runtime, "int8", old.get("calibration"), f"{choice.reason}; the table's calibration set")
    return choice
