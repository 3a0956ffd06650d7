"""The single place that opens and closes a Spark session (``--backend spark``).

``local[*]`` by default, or ``--spark-master URL``. The JVM is launched by us rather than by
``SparkSession.builder`` so that its output can be sent to a log file (Spark and Java write
banners, ``WARN NativeCodeLoader`` and progress bars straight to the terminal otherwise),
and so that the JVM is really gone when the ``with`` block ends: ``SparkSession.stop()``
alone leaves the gateway JVM running until the Python process exits.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from fruitdask.config import TF_ENV, RunConfig
from fruitdask.errors import ClusterError

logger = logging.getLogger(__name__)

#: The directory that holds the ``fruitdask`` package: Python workers started by the JVM
#: must import it even when it is not installed (a source checkout).
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)

_LOG4J2 = """\
rootLogger.level = {level}
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{{HH:mm:ss}} %p %c{{1}}: %m%n
logger.jetty.name = org.sparkproject.jetty
logger.jetty.level = error
"""


def spark_conf(cfg: RunConfig, log4j_file: str, driver_memory: str | None = None) -> dict[str, str]:
    """The Spark settings of a fruitdask session (pure: testable without a JVM).

    Arrow batches hold ``--batch-size`` rows, so one pandas batch is one VGG16 batch; the UI
    and the console progress bar are off (``--debug`` turns the UI back on).
    """
    conf = {
        "spark.master": cfg.spark_master,
        "spark.app.name": "fruitdask",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(cfg.batch_size),
        "spark.python.worker.reuse": "true",
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
        "spark.executorEnv.PYTHONPATH": PACKAGE_ROOT,
        "spark.ui.enabled": "true" if cfg.debug else "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": "8",
        "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{log4j_file}",
        "spark.executor.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{log4j_file}",
    }
    for key, value in TF_ENV.items():
        conf[f"spark.executorEnv.{key}"] = value
    if driver_memory:
        conf["spark.driver.memory"] = driver_memory
    return conf


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:]).strip()
    except OSError:
        return ""


@contextmanager
def spark_session(cfg: RunConfig, driver_memory: str | None = None) -> Iterator:
    """Yield a ``SparkSession``; on exit stop it and shut its JVM down, even on failure.

    Parameters
    ----------
    driver_memory
        ``spark.driver.memory`` (e.g. ``"8g"``); in local mode the driver also runs the
        executors, so this is the heap Spark's PCA gathers its covariance in.
    """
    try:
        from pyspark import SparkConf, SparkContext
        from pyspark.java_gateway import launch_gateway
        from pyspark.sql import SparkSession
    except ImportError as e:
        raise ClusterError("--backend spark needs PySpark: pip install 'fruitdask[spark]' (and Java 17)") from e

    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fruitdask-spark-"))
        log4j_file = os.path.join(tmp, "log4j2.properties")
        with open(log4j_file, "w") as f:
            f.write(_LOG4J2.format(level="warn" if cfg.debug else "error"))
        jvm_log = os.path.join(tmp, "jvm.log")
        conf = SparkConf(loadDefaults=False)
        for key, value in spark_conf(cfg, log4j_file, driver_memory).items():
            conf.set(key, value)
        # Without --debug the JVM (and the Python workers it starts) write to a file.
        log = None if cfg.debug else stack.enter_context(open(jvm_log, "wb"))
        popen = {} if log is None else {"stdout": log, "stderr": subprocess.STDOUT}
        if SparkContext._gateway is not None:
            raise ClusterError("a Spark JVM is already running in this process: stop it before starting fruitdask's")
        try:
            gateway = launch_gateway(conf, popen_kwargs=popen)
        except Exception as e:  # Py4J/PySpark raise many types when Java is missing
            raise ClusterError(
                f"could not start the Spark JVM for master {cfg.spark_master!r} ({e}): check that Java 17 is "
                f"installed (java -version) or JAVA_HOME is set; JVM output: {_tail(jvm_log) or 'none'}"
            ) from e
        stack.callback(_shutdown_jvm, gateway)
        try:
            sc = SparkContext(conf=conf, gateway=gateway)
        except Exception as e:  # the JVM reports bad masters as Py4JJavaError
            raise ClusterError(
                f"could not start Spark with master {cfg.spark_master!r}: {e}; use local[*] or spark://host:7077. "
                f"JVM output: {_tail(jvm_log) or 'none'}"
            ) from e
        stack.callback(sc.stop)
        # Python workers run sc.pythonExec (PYSPARK_PYTHON, else "python3" from PATH, which may
        # lack the dependencies): use this very interpreter, as Dask's workers do.
        sc.pythonExec = sys.executable
        sc.setLogLevel("WARN" if cfg.debug else "ERROR")
        spark = SparkSession(sc)
        stack.callback(spark.stop)
        logger.info("Spark %s session: master %s, %d default partitions", sc.version, sc.master, sc.defaultParallelism)
        yield spark


def _shutdown_jvm(gateway) -> None:
    """Close the Py4J gateway and wait for the JVM to exit (kill it after 10 s)."""
    from pyspark import SparkContext

    try:
        gateway.shutdown()
    except Exception as e:  # noqa: BLE001 - the JVM may already be gone; still reap it below
        logger.debug("closing the Py4J gateway: %s", e)
    proc = getattr(gateway, "proc", None)
    if proc is not None:
        if proc.stdin:
            proc.stdin.close()  # the JVM exits when its stdin closes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    with SparkContext._lock:
        SparkContext._gateway = None
        SparkContext._jvm = None
        SparkContext._active_spark_context = None
