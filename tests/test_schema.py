"""One schema module for every table fruitdask writes (fruitdask/schema.py): the derived
schemas agree, no other module defines the columns again, and a column declared there fills
the rows that predate it."""

from __future__ import annotations

import ast
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from fruitdask import schema

PACKAGE = Path(__file__).resolve().parents[1] / "fruitdask"
SCHEMA_FILE = PACKAGE / "schema.py"


def test_the_derived_schemas_agree():
    assert schema.ERROR_COLUMNS[:4] == schema.SKIPPED_COLUMNS
    assert set(schema.ERROR_COLUMNS) - set(schema.SKIPPED_COLUMNS) <= set(schema.TABLE_SCHEMA.names)
    assert [schema.FRAME_ERRORS.get(c, c) for c in schema.FEATURES_SCHEMA.names if c != "features"] == schema.SKIPPED_COLUMNS
    assert set(schema.MANIFEST_SCHEMA.names) - {"change"} <= set(schema.TABLE_SCHEMA.names)


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


def test_complete_table_fills_a_declared_column_by_its_backfill_or_its_default(monkeypatch):
    """Rows without a declared column get it from their other columns (a backfill), or its
    default, in the table's column order and types; a column the rows hold is kept as is.
    Fails before the table's columns were declared with a fill (no ``complete_table``)."""
    monkeypatch.setattr(schema, "TABLE", (*schema.TABLE,
                                          schema.TableColumn("label_lower", pa.string(), backfill=lambda t: pc.utf8_lower(t.column("label"))),
                                          schema.TableColumn("quality", pa.int32(), default=3)))
    monkeypatch.setattr(schema, "TABLE_SCHEMA", pa.schema([c.field for c in schema.TABLE]))
    old = pa.Table.from_pylist([{"image_key": "Apple/1.jpg", "label": "Apple", "pca_fit": "0001-x"}])
    new = schema.complete_table(old.append_column("quality", pa.array([7], pa.int64())))
    assert new.schema == schema.TABLE_SCHEMA
    row = new.to_pylist()[0]
    assert (row["label_lower"], row["quality"], row["image_key"], row["features"]) == ("apple", 7, "Apple/1.jpg", None)
    assert schema.complete_table(old).column("quality").to_pylist() == [3]
