"""Options and set-up that several sub-commands share: one place for each flag.

The storage flags, ``--quiet``/``--debug``, the run options of ``run`` and ``bench`` and the
configuration built from them (flags over ``FRUITDASK_*`` environment over defaults); the
logging set-up those flags choose is :mod:`fruitdask.logs`. Nothing here imports
:mod:`fruitdask.cli`: the dispatcher imports the commands, never the other way round.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from fruitdask.config import (
    BACKENDS,
    POOLINGS,
    PRECISIONS,
    REMOVE_FLOOR,
    RUNTIMES,
    RunConfig,
    StorageSettings,
    build_config,
    build_storage_settings,
)
from fruitdask.storage import stores

#: The real Fruits-360 images shipped with the package (12 labels x 10 images).
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data" / "Training"
DEFAULT_OUTPUT = "fruitdask-output"

_D = RunConfig()


def add_storage_options(p: argparse.ArgumentParser) -> None:
    """The storage flags, shared by every command that reads or writes storage: each store's
    own (S3's ``--s3-endpoint``, ``--aws-*``) and the region allow-list."""
    g = p.add_argument_group(f"storage ({', '.join(s.schemes[0] + '://' for s in stores.remote_stores())})")
    stores.add_arguments(g)
    g.add_argument("--allowed-regions", dest="storage_allowed_regions",
                   type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
                   help="comma-separated regions buckets may live in (default: the EU member-state regions)")


def add_quiet_debug(p: argparse.ArgumentParser) -> None:
    """``--quiet`` / ``--debug`` for the commands that only read and write files."""
    g = p.add_argument_group("output")
    g.add_argument("--quiet", "-q", action="store_true", default=None, help="print nothing but errors")
    g.add_argument("--debug", action="store_true", default=None, help="verbose logs and tracebacks on errors")


def storage_settings(args: argparse.Namespace) -> StorageSettings:
    """Storage settings from flags over ``FRUITDASK_STORAGE_*``/AWS environment over defaults;
    nothing else of the run configuration is read (a command validates only what it uses)."""
    flags = {k: v for k, v in vars(args).items() if k.startswith("storage_")}
    return build_storage_settings(flags, os.environ)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``run`` and ``bench``: data, model, PCA, cluster, storage (in this order in --help)."""
    _add_data_options(p)
    _add_model_options(p)
    _add_reduction_options(p)
    _add_execution_options(p)
    add_storage_options(p)
    _add_kube_options(p)
    _add_output_options(p)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    """``--input``, ``--output``, ``--overwrite``."""
    g = p.add_argument_group("data")
    g.add_argument("--input", help=f"folder or URI of <Label>/<image>.jpg files (default: the bundled sample, {SAMPLE_DIR.parent.name})")
    g.add_argument("--output", help=f"folder or URI for the results (default: ./{DEFAULT_OUTPUT})")
    g.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an output written before the features table; on a table, the same as --rebuild")
    add_wait_lock(g)


def add_wait_lock(g: argparse._ActionsContainer) -> None:
    """``--wait-lock SECONDS``: for ``run`` and the ``table`` commands that write."""
    g.add_argument("--wait-lock", dest="storage_lock_wait", type=float, metavar="SECONDS",
                   help="wait up to SECONDS for the output's lock while another run or table command holds it, "
                   "instead of failing at once (default: 0; or FRUITDASK_STORAGE_LOCK_WAIT)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """VGG16: weights, input size, batch, pooling, precision, seed."""
    g = p.add_argument_group("model")
    g.add_argument("--weights", help="auto | imagenet | random | PATH_OR_URI of a .weights.h5/.keras file "
                   f"(default: {_D.weights}: ImageNet if it can be had, else the run fails; random only with --allow-random-weights)")
    g.add_argument("--allow-random-weights", action="store_true", default=None,
                   help="let --weights auto fall back to seeded random weights when ImageNet cannot be had "
                   "(offline demos: features are then not ImageNet features)")
    g.add_argument("--image-size", type=int, help=f"square input size fed to VGG16, >= 32 (default: {_D.image_size})")
    g.add_argument("--batch-size", type=int, help=f"images per VGG16 inference batch (default: {_D.batch_size})")
    g.add_argument("--pooling", choices=POOLINGS, help=f"avg/max: 512 features; none: flattened maps, 25,088 at 224 (default: {_D.pooling})")
    g.add_argument("--precision", choices=PRECISIONS,
                   help=f"VGG16 arithmetic: bfloat16 (Keras mixed_bfloat16, about 2x faster) needs a CPU with "
                   f"AVX512_BF16 or AMX or a bf16 GPU; auto picks it where present; int8 (OpenVINO after NNCF "
                   f"quantization on a calibration sample of the lake) is opt-in; features stay float32 (default: {_D.precision})")
    g.add_argument("--runtime", choices=RUNTIMES,
                   help="inference runtime: tensorflow (Keras, today's path), openvino (the same VGG16 and weights, "
                   "converted once per machine and cached; has int8), auto: the table's runtime, else tensorflow, "
                   f"openvino for --precision int8 (default: {_D.runtime})")
    g.add_argument("--seed", type=int, help=f"seed for random weights and the randomized SVD (default: {_D.seed})")


def _add_reduction_options(p: argparse.ArgumentParser) -> None:
    """The IncrementalPCA: K or the variance target, batch rows, power iterations."""
    g = p.add_argument_group("reduction (PCA)")
    g.add_argument("--components", type=int, help="number of principal components K (default: from --variance)")
    g.add_argument("--variance", type=float, help=f"explained-variance target that chooses K (default: {_D.variance})")
    g.add_argument("--pca-batch-size", type=int, help="rows per IncrementalPCA batch, >= K (default: min(images, 1024))")
    g.add_argument("--pca-power-iterations", type=int, help=f"power iterations of the randomized SVD (default: {_D.pca_power_iterations})")


def _add_execution_options(p: argparse.ArgumentParser) -> None:
    """Backend and cluster, partitions, error limits, resume, Spark."""
    g = p.add_argument_group("execution")
    g.add_argument("--backend", choices=BACKENDS, help=f"engine that runs the stages (default: {_D.backend})")
    g.add_argument("--cluster", help="local | kubernetes | scheduler address such as tcp://host:8786 (default: local)")
    g.add_argument("--workers", dest="n_workers", type=int, help="local cluster worker processes (default: 1 up to 16 cores, then one per 16 cores; measured on 2 and 16)")
    g.add_argument("--threads-per-worker", type=int, help="threads per local worker (default: one per core, at most 16)")
    g.add_argument("--memory-limit", help=f"memory per local worker (default: {_D.memory_limit})")
    g.add_argument("--dashboard-address", help=f"local dashboard address (default: {_D.dashboard_address!r}, a free port)")
    g.add_argument("--cluster-timeout", type=float, help=f"seconds to reach the scheduler before failing (default: {_D.cluster_timeout:g})")
    g.add_argument("--partition-size", type=int, help=f"images per partition/task (default: {_D.partition_size})")
    g.add_argument("--max-errors", type=float, help="fail when more images are unusable: a count, or a fraction < 1 (default: no limit)")
    g.add_argument("--max-file-mb", type=float,
                   help=f"skip files larger than this many MiB, by the listed size, before reading them; they go to "
                   f"errors.parquet (default: {_D.max_file_mb:g})")
    g.add_argument("--skipped-ok", action="store_true", default=None,
                   help="exit 0 instead of 4 when files were skipped (for schedulers that treat any non-zero "
                   "exit as failure: Kubernetes Jobs, Airflow); --max-errors still bounds them")
    g.add_argument("--resume", action="store_true", default=None, help="reuse featurized partitions checkpointed by an earlier failed run")
    g.add_argument("--keep-deleted", action="store_true", default=None,
                   help="keep the rows of images gone from the input (default: remove them, so the table is the input)")
    g.add_argument("--max-remove-fraction", type=float,
                   help=f"refuse a run that would remove more than this share of the table's rows (and more than "
                   f"{REMOVE_FLOOR} rows): a listing that sees less than the table is refused, nothing is removed; 1 allows any "
                   f"removal (default: {_D.max_remove_fraction:g})")
    g.add_argument("--rebuild", action="store_true", default=None,
                   help="featurize every image again into a new table version (e.g. after changing --image-size)")
    g.add_argument("--refit", action="store_true", default=None,
                   help="fit the PCA again on every row and re-project them (automatic when the table doubled since the last fit)")
    g.add_argument("--spark-master", help=f"Spark master URL for --backend spark (default: {_D.spark_master})")


def _add_kube_options(p: argparse.ArgumentParser) -> None:
    """The ``DaskCluster`` of ``--cluster kubernetes``."""
    g = p.add_argument_group("kubernetes (--cluster kubernetes)")
    g.add_argument("--kube-name", help=f"DaskCluster name (default: {_D.kube.name})")
    g.add_argument("--kube-namespace", help=f"namespace (default: {_D.kube.namespace})")
    g.add_argument("--kube-image", help=f"container image (default: {_D.kube.image})")
    g.add_argument("--kube-workers", dest="kube_n_workers", type=int, help=f"worker pods (default: {_D.kube.n_workers})")
    g.add_argument("--kube-worker-cpu", help=f"CPU per worker pod (default: {_D.kube.worker_cpu})")
    g.add_argument("--kube-worker-memory", help=f"memory per worker pod (default: {_D.kube.worker_memory})")
    g.add_argument("--kube-service-account", help=f"workers' service account with S3 access via IRSA; the scheduler never gets it (default: {_D.kube.service_account})")
    g.add_argument("--kube-tls-secret", help=f"Secret with ca.crt, tls.crt, tls.key for mutual TLS; the client reads its own copies from "
                   f"DASK_DISTRIBUTED__COMM__TLS__* (default: {_D.kube.tls_secret})")
    g.add_argument("--kube-region", help=f"EU region the worker pods must run in (default: {_D.kube.region})")
    g.add_argument("--kube-connect-existing", action="store_true", default=None, help="connect to an existing DaskCluster instead of creating one")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """``--quiet`` / ``--debug`` as ``run`` and ``bench`` word them (progress bar, statistics)."""
    g = p.add_argument_group("output")
    g.add_argument("--quiet", "-q", action="store_true", default=None, help="no progress bar or statistics, errors only")
    g.add_argument("--debug", action="store_true", default=None, help="verbose logs (Dask, Spark) and tracebacks on errors")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    """Build the run configuration: flags over ``FRUITDASK_*`` environment over defaults."""
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    flags.update(overrides)
    if flags.get("input") is None and "FRUITDASK_INPUT" not in os.environ:
        flags["input"] = str(SAMPLE_DIR)
    if flags.get("output") is None and "FRUITDASK_OUTPUT" not in os.environ:
        flags["output"] = DEFAULT_OUTPUT
    return build_config(flags, os.environ)
