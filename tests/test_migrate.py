"""The table-column seam (issue 33): a column declared in fruitdask/schema.py reaches a table
written before it, by Delta schema evolution, without featurizing again.

The new columns are declared the way a newcomer adds one (a :class:`schema.TableColumn` in
``schema.TABLE``), by monkeypatch: the runs happen in this process, on a threaded LocalCluster
whose workers share it, with a seeded random weights file at 32 px. ``table show`` and
``table history``, whose promise is checked, run as a user types them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import BUNDLED, SMALL_SIZE, copy_images, read_features
from PIL import Image, ImageOps

from fruitdask import checkpoint, cli, schema
from fruitdask.lake import migrate, tasks
from fruitdask.lake import table as delta

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
NEW_COLUMNS = (
    schema.TableColumn("label_lower", pa.string(), backfill=lambda t: pc.utf8_lower(t.column("label"))),
    schema.TableColumn("quality", pa.int32(), default=3),
)


def declare_new_columns(monkeypatch) -> None:
    """Two columns added to the table's declaration (one filled from ``label``, one by default)."""
    monkeypatch.setattr(schema, "TABLE", (*schema.TABLE, *NEW_COLUMNS))
    new_schema = pa.schema([c.field for c in schema.TABLE])
    for module in (schema, tasks, delta):  # the modules that bound TABLE_SCHEMA when imported
        monkeypatch.setattr(module, "TABLE_SCHEMA", new_schema)


def run(client, data: Path, out: Path, weights: Path) -> int:
    return cli.main(["run", "--input", str(data), "--output", str(out), "--cluster", client.scheduler.address,
                     "--image-size", str(SMALL_SIZE), "--weights", str(weights), "--precision", "float32",
                     "--partition-size", "4", "--quiet"])


def typed(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "fruitdask", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


def test_an_old_table_gains_a_declared_column_without_featurizing(tmp_path, local_cluster, weights_file, monkeypatch):
    """A table written without two columns; the columns are declared; the same command again:
    one commit (``add_columns``) evolves the table's schema and fills every old row (the
    backfill from ``label``, the default), with no image featurized (the featurizer raises if
    called) and every row's features, run and time kept. A later run's new rows get the
    columns too. Fails before the seam: no ``TableColumn``/``lake.migrate``, and a run left the
    old table's schema as it was (delta-rs appends under the table's schema)."""
    _, client = local_cluster(1, 2, processes=False)
    data = copy_images(BUNDLED, tmp_path / "in", 2, 2)
    out = tmp_path / "out"
    assert run(client, data, out, weights_file) == 0
    before = read_features(out).set_index("image_key")
    assert "label_lower" not in before.columns

    declare_new_columns(monkeypatch)
    unmigrated = read_features(out)  # a reader sees the declared columns filled before any run adds them
    assert list(unmigrated["label_lower"]) == [label.lower() for label in unmigrated["label"]]

    def featurizer_called(*args, **kwargs):
        raise AssertionError("an image was featurized again")

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "featurize_checkpointed", featurizer_called)
        assert run(client, data, out, weights_file) == 0  # the same command as the first run
    table = delta.load(str(out), {})
    assert table.version() == 1 and [f.name for f in table.schema().fields] == schema.TABLE_SCHEMA.names
    assert json.loads(table.history(1)[0][delta.META_KEY])["operation"] == migrate.OPERATION
    after = read_features(out).set_index("image_key")
    assert sorted(after.index) == sorted(before.index) and len(after) == 4
    assert list(after["label_lower"]) == [label.lower() for label in after["label"]]
    assert set(after["quality"]) == {3}
    for column in ("run_id", "featurized_at", "pca_fit"):
        assert after[column].to_dict() == before[column].to_dict(), column
    for key in before.index:
        assert list(after.at[key, "features"]) == list(before.at[key, "features"])

    shown = typed(["table", "history", str(out), "--json"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    newest = json.loads(shown.stdout)[0]
    assert (newest["version"], newest["action"], newest["added"], newest["updated"]) == (1, "add_columns", 0, 0)

    assert run(client, data, out, weights_file) == 0
    assert delta.load(str(out), {}).version() == 1, "added once: nothing to do the second time"
    for f in sorted(data.rglob("*.jpg"))[:2]:  # two new images: featurized, and given the columns on write
        ImageOps.mirror(Image.open(f)).save(f.parent / f"mirror_{f.name}")
    assert run(client, data, out, weights_file) == 0
    newer = read_features(out)
    assert len(newer) == 6 and list(newer["label_lower"]) == [label.lower() for label in newer["label"]]
    assert set(newer["quality"]) == {3}


def test_a_table_with_every_declared_column_is_left_alone(tmp_path):
    """No column missing: no commit, the state handed back as it was."""
    state = delta.open_table(str(tmp_path / "none"), {})
    assert migrate.missing_columns(state) == [] and migrate.add_columns(state, None) is state  # type: ignore[arg-type]
