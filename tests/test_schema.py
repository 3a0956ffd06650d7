"""One schema module for every table fruitdask writes (fruitdask/schema.py): the Spark DDL
agrees with the Arrow schemas, and no other module defines the columns again."""

from __future__ import annotations

import ast
from pathlib import Path

import pyarrow as pa
import pytest

from fruitdask import schema

PACKAGE = Path(__file__).resolve().parents[1] / "fruitdask"
SCHEMA_FILE = PACKAGE / "schema.py"


def _ddl_columns(ddl: str) -> list[tuple[str, str]]:
    """``name TYPE, ...`` split at the top-level commas (``ARRAY<...>`` may hold some)."""
    columns, depth, start = [], 0, 0
    for i, ch in enumerate(ddl + ","):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            name, _, type_ = ddl[start:i].strip().partition(" ")
            columns.append((name, type_.strip()))
            start = i + 1
    return columns


@pytest.mark.parametrize("ddl, arrow", [(schema.FEATURES_DDL, schema.FEATURES_SCHEMA),
                                        (schema.TABLE_DDL, schema.TABLE_SCHEMA),
                                        (schema.ERRORS_DDL, schema.ERRORS_SCHEMA)])
def test_spark_ddl_matches_the_arrow_schema_as_pyspark_maps_it(ddl, arrow):
    """pyspark's own Arrow-to-Spark mapping (no JVM needed) is the independent reference."""
    from pyspark.sql.pandas.types import from_arrow_schema

    expected = [(f.name, f.dataType.simpleString()) for f in from_arrow_schema(arrow)]
    assert [(n, t.lower()) for n, t in _ddl_columns(ddl)] == expected


def test_an_arrow_type_without_a_spark_type_is_refused_with_the_fix():
    with pytest.raises(TypeError, match="_SPARK_TYPES"):
        schema.spark_ddl(pa.schema([("x", pa.decimal128(5, 2))]))


def test_the_derived_schemas_agree():
    assert schema.ERROR_COLUMNS[:4] == schema.SKIPPED_COLUMNS
    assert set(schema.ERROR_COLUMNS) - set(schema.SKIPPED_COLUMNS) <= set(schema.TABLE_COLUMNS)
    assert [schema.FRAME_ERRORS.get(c, c) for c in schema.FEATURES_COLUMNS if c != "features"] == schema.SKIPPED_COLUMNS
    assert set(schema.MANIFEST_SCHEMA.names) - {"change"} <= set(schema.TABLE_COLUMNS)


def _string_literals(node: ast.AST) -> set[str]:
    return {e.value for e in getattr(node, "elts", ()) if isinstance(e, ast.Constant) and isinstance(e.value, str)}


def test_no_other_module_defines_a_table_s_columns():
    """A list, tuple or set literal naming error columns (``stage`` and ``reason``), or an
    Arrow schema built anywhere but fruitdask/schema.py, is a second copy that can drift."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == SCHEMA_FILE:
            continue
        rel = path.relative_to(PACKAGE.parent)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
                names = _string_literals(node)
                if {"stage", "reason"} <= names or {"error_stage", "error_reason"} <= names:
                    offenders.append(f"{rel}:{node.lineno} {sorted(names)}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("schema", "field") \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "pa":
                offenders.append(f"{rel}:{node.lineno} pa.{node.func.attr}(...)")
    assert not offenders, f"columns defined outside fruitdask/schema.py (import them from there): {offenders}"
