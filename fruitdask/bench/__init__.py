"""``fruitdask bench``'s engine: raw single-process Keras vs the Dask pipeline vs the Spark pipeline.

One invocation, the same images (copied once into a work folder) and the same weights for
every engine. Each engine runs in its own child process, so that its memory is measured
alone (psutil samples the child's process tree: the driver, Spark's JVM, the workers) and no
engine inherits another's warm caches, threads or JVM. Each engine runs ``--repeats`` times
(default 3), interleaved with the others, and ``--precisions float32,bfloat16`` adds a
precision axis in the same invocation.

Definitions (printed with the results):

- **end to end**: the wall time of the whole command, from process start to exit, for every
  engine: imports, listing, weights, cluster or JVM start, featurize, PCA, Parquet write.
  Raw Keras is a plain one-process script doing the same work (its TensorFlow import and
  model build count, as the pipelines' do). Reported as median (min-max) over the runs.
- **steady-state images/s**: measured after every parallel slot finished its first piece of
  work, so it excludes start-up, the broadcast, imports and model builds. Raw: images after
  the first batch / time after the first batch. Pipelines: images in the partitions that
  finished after the first wave (one partition per slot) / time from the end of the first
  wave to the end of the last partition.
- **fixed cost**: end to end - images / steady-state rate, i.e. the time spent beyond what
  steady-state throughput needs (imports, cluster or JVM start, weights, model builds,
  first batch, tail imbalance, PCA and write).
- **quiet**: the CPU busy share is sampled for 2 s right before each engine run (not after
  the previous one, whose tail a load average would still hold).
"""
