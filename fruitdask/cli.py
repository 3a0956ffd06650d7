"""Command-line interface: a thin layer over the library.

``main(argv) -> int`` parses flags, builds the frozen :class:`~fruitdask.config.RunConfig`,
sets up logging and the progress bar, and is the one boundary where library errors become
a clean one-line message and an exit code (no traceback unless ``--debug``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fruitdask import __version__
from fruitdask.config import BACKENDS, POOLINGS, TF_ENV, RunConfig, StorageSettings, build_config
from fruitdask.errors import FruitdaskError

logger = logging.getLogger("fruitdask")

#: The real Fruits-360 images shipped with the package (12 labels x 10 images).
SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data" / "Training"
DEFAULT_OUTPUT = "fruitdask-output"

#: Sub-commands living in their own modules: each has ``add_arguments(parser)`` and
#: ``command(args) -> int``. ``run`` is defined here.
COMMAND_MODULES: dict[str, tuple[str, str]] = {
    "train": ("fruitdask.commands.train", "train a fruit classifier on the PCA features of a run output, evaluate it on a Test/ tree"),
    "predict": ("fruitdask.commands.predict", "predict the fruit in photos with a model written by `train` (top-k labels)"),
    "report": ("fruitdask.commands.report", "rebuild OUTPUT/report.html, the self-contained HTML page of a finished run"),
    "bench": ("fruitdask.bench", "time raw Keras vs the Dask vs the Spark pipeline on the same images and weights"),
    "serve": ("fruitdask.serve.command", "serve a model written by `train` over HTTP: POST a photo to /v1/predict, get the fruit"),

}

#: Exit codes (see ``fruitdask run --help`` and docs/faults.md). 1, 2 and 3 come from the
#: ``exit_code`` of the :mod:`fruitdask.errors` classes.
EXIT_OK = 0
#: The dataset was committed, but some files were skipped (listed in errors.parquet).
EXIT_SKIPPED = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

RUN_EPILOG = """exit codes:
  0    success, every listed image was featurized
  4    success with skipped files: the dataset is committed, the unusable images are
       listed in OUTPUT/errors.parquet and counted in run.json (treat as success with
       a warning; --max-errors turns too many of them into exit 3; --skipped-ok
       makes it 0)
  1    failure (input, output, storage, weights, cluster); nothing committed
  2    bad flag or configuration value
  3    more unusable images than --max-errors allows; nothing committed
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM): cluster closed, nothing committed
"""

_D = RunConfig()


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C so every cluster and temp prefix is closed."""


def _on_sigterm(signum, frame):
    raise Terminated()


def add_storage_options(p: argparse.ArgumentParser) -> None:
    """The ``s3://`` flags, shared by every command that reads or writes storage."""
    g = p.add_argument_group("storage (s3://)")
    g.add_argument("--s3-endpoint", dest="storage_endpoint_url", help="S3 endpoint URL (default: AWS, or $AWS_ENDPOINT_URL)")
    g.add_argument("--aws-profile", dest="storage_profile", help="AWS profile name (default: the usual AWS credential chain)")
    g.add_argument("--aws-region", dest="storage_region", help="AWS region for the S3 client (default: from the AWS config)")
    g.add_argument("--allowed-regions", dest="storage_allowed_regions",
                   type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
                   help="comma-separated regions buckets may live in (default: the EU member-state regions)")


def add_quiet_debug(p: argparse.ArgumentParser) -> None:
    """``--quiet`` / ``--debug`` for the commands that only read and write files."""
    g = p.add_argument_group("output")
    g.add_argument("--quiet", "-q", action="store_true", default=None, help="print nothing but errors")
    g.add_argument("--debug", action="store_true", default=None, help="verbose logs and tracebacks on errors")


def storage_settings(args: argparse.Namespace, input_url: str, output_url: str) -> StorageSettings:
    """Storage settings from flags over ``FRUITDASK_STORAGE_*``/AWS environment over defaults."""
    flags = {k: v for k, v in vars(args).items() if k.startswith("storage_")}
    return build_config({**flags, "input": input_url, "output": output_url}, os.environ).storage


def add_run_options(p: argparse.ArgumentParser, *, io_required: bool = False) -> None:
    """Options shared by ``run`` and ``bench``: data, model, PCA, cluster, storage."""
    g = p.add_argument_group("data")
    g.add_argument("--input", help=f"folder or URI of <Label>/<image>.jpg files (default: the bundled sample, {SAMPLE_DIR.parent.name})")
    g.add_argument("--output", help=f"folder or URI for the results (default: ./{DEFAULT_OUTPUT})")
    g.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output (default: refuse)")

    g = p.add_argument_group("model")
    g.add_argument("--weights", help="auto | imagenet | random | PATH_OR_URI of a .weights.h5/.keras file "
                   f"(default: {_D.weights}: ImageNet if it can be had, else the run fails; random only with --allow-random-weights)")
    g.add_argument("--allow-random-weights", action="store_true", default=None,
                   help="let --weights auto fall back to seeded random weights when ImageNet cannot be had "
                   "(offline demos: features are then not ImageNet features)")
    g.add_argument("--image-size", type=int, help=f"square input size fed to VGG16, >= 32 (default: {_D.image_size})")
    g.add_argument("--batch-size", type=int, help=f"images per VGG16 inference batch (default: {_D.batch_size})")
    g.add_argument("--pooling", choices=POOLINGS, help=f"avg/max: 512 features; none: flattened maps, 25,088 at 224 (default: {_D.pooling})")
    g.add_argument("--precision", choices=("float32", "bfloat16", "auto"),
                   help=f"VGG16 arithmetic: bfloat16 (Keras mixed_bfloat16, about 2x faster) needs a CPU with "
                   f"AVX512_BF16 or AMX or a bf16 GPU; auto picks it where present; features stay float32 (default: {_D.precision})")
    g.add_argument("--seed", type=int, help=f"seed for random weights and the randomized SVD (default: {_D.seed})")

    g = p.add_argument_group("reduction (PCA)")
    g.add_argument("--components", type=int, help="number of principal components K (default: from --variance)")
    g.add_argument("--variance", type=float, help=f"explained-variance target that chooses K (default: {_D.variance})")
    g.add_argument("--pca-batch-size", type=int, help="rows per IncrementalPCA batch, >= K (default: min(images, 1024))")
    g.add_argument("--pca-power-iterations", type=int, help=f"power iterations of the randomized SVD (default: {_D.pca_power_iterations})")

    g = p.add_argument_group("execution")
    g.add_argument("--backend", choices=BACKENDS, help=f"engine that runs the stages (default: {_D.backend})")
    g.add_argument("--cluster", help="local | kubernetes | scheduler address such as tcp://host:8786 (default: local)")
    g.add_argument("--workers", dest="n_workers", type=int, help="local cluster worker processes (default: one per core)")
    g.add_argument("--threads-per-worker", type=int, help="threads per local worker (default: 1 on <= 4 cores, else 2)")
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
    g.add_argument("--spark-master", help=f"Spark master URL for --backend spark (default: {_D.spark_master})")
    g.add_argument("--spark-allow-large-pca", action="store_true", default=None,
                   help="let Spark's PCA gather a d x d covariance on the driver even when it is large")

    add_storage_options(p)

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


def setup_logging(quiet: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if debug else "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if not debug else logging.INFO)
    logger.setLevel(level)
    if not debug:
        import distributed  # noqa: F401 - configures its loggers at import; quiet them after

        for name in list(logging.root.manager.loggerDict):
            if name.split(".")[0] in ("distributed", "tensorflow", "absl", "py4j", "pyspark", "h5py"):
                logging.getLogger(name).setLevel(logging.ERROR)


def _on_event(name: str, data: dict) -> None:
    if name == "listed":
        logger.info("%d images, %d labels", data["images"], data["labels"])
        for label, n in data["per_label"].items():
            logger.info("  %-24s %6d", label, n)
    elif name == "cluster":
        logger.info("cluster: %s workers, %s threads; dashboard: %s",
                    data.get("n_workers"), data.get("threads"), data.get("dashboard"))


def cmd_run(args: argparse.Namespace) -> int:
    from fruitdask import pipeline
    from fruitdask.progress import progress_bar

    cfg = config_from_args(args)
    # The bar starts with the featurization, after the cluster line (dashboard URL) is printed.
    doc = pipeline.run(cfg, progress=progress_bar(cfg.quiet), on_event=_on_event)
    red = doc["reduction"]
    for w in doc["warnings"]:
        logger.warning("WARNING: %s", w)
    logger.info(
        "wrote %d rows (%d skipped) to %s: K=%d components, %.1f%% variance, %.2f images/s featurizing, %.1fs in all",
        doc["counts"]["rows_written"], doc["counts"]["errors"], cfg.output, red["k"],
        100 * red["variance_reached"], doc["images_per_second"]["featurize"] or 0, doc["duration_s"],
    )
    from fruitdask.report.page import report_location

    report_path = report_location(cfg.output)
    logger.info("report: %s", report_path)
    if not cfg.quiet:
        print(json.dumps({"output": cfg.output, "rows": doc["counts"]["rows_written"], "k": red["k"], "report": report_path}))
    return EXIT_SKIPPED if doc["counts"]["errors"] and not cfg.skipped_ok else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fruitdask",
        description="Featurize Fruits-360 images with VGG16 on Dask (or Spark), reduce with IncrementalPCA, "
        "write Parquet. Data stays in EU regions.",
    )
    parser.add_argument("--version", action="version", version=f"fruitdask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run_p = sub.add_parser(
        "run",
        help="run the pipeline: list images, broadcast VGG16, featurize, PCA, write Parquet",
        description="Run the pipeline. With no flags it processes the bundled sample on a local cluster.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_options(run_p)
    run_p.set_defaults(func=cmd_run)
    for name, (module_name, help_text) in COMMAND_MODULES.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    for key, value in TF_ENV.items():
        os.environ.setdefault(key, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False))
    setup_logging(bool(getattr(args, "quiet", False)), debug)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _in_main_thread() else None
    try:
        return int(args.func(args) or 0)
    except FruitdaskError as e:
        if debug:
            logger.exception("failed")
        print(f"fruitdask: error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        # Anything else (a Dask FuturesCancelledError, a worker's exception, a bug) is still
        # one line and exit 1; the traceback is for --debug.
        if debug:
            logger.exception("failed")
        hint = "" if debug else " (run again with --debug for the traceback)"
        print(f"fruitdask: error: {type(e).__name__}: {_one_line(str(e)) or 'no message'}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fruitdask: interrupted; cluster closed, nothing committed", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("fruitdask: terminated; cluster closed, nothing committed", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line(text: str) -> str:
    """A message on one line: its lines joined with "; " (Dask's run over several)."""
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
