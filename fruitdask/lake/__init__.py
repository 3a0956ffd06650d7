"""The lake: the features as a Delta table that each run brings up to date with the input.

- the table's columns and the errors file's: :mod:`fruitdask.schema` (every table fruitdask writes).
- :mod:`fruitdask.lake.keys`: stable image keys (relative to the normalised input root),
  source versions, their compact hashes.
- :mod:`fruitdask.lake.rekey`: the one-commit re-keying of a table keyed otherwise.
- :mod:`fruitdask.lake.table`: the Delta table through ``deltalake`` (delta-rs): its state,
  one optimistic commit per run, history, vacuum, compaction.
- :mod:`fruitdask.lake.plan`: the streamed listing against the table: what to featurize,
  rewrite and remove (the diff), with a few dozen bytes per image on the client.
- :mod:`fruitdask.lake.tasks`: the bodies that run on workers or executors (featurize a
  partition into a table file, rewrite a file, statistics of a file).
- :mod:`fruitdask.lake.update`: one run's update of the table, on any backend.
"""
