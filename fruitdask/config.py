"""The one frozen run configuration, built once at the edge.

Precedence: command-line flags, then ``FRUITDASK_<FIELD>`` environment variables, then the
defaults below. Only :func:`build_config` looks at the environment, and only through the
mapping it is handed, so every other module receives plain values.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fruitdask.errors import ConfigError

#: AWS regions located in EU member states (GDPR territory). London (eu-west-2) and
#: Zurich (eu-central-2) are in Europe but outside the EU, so they are not listed.
EU_REGIONS: tuple[str, ...] = (
    "eu-west-1",
    "eu-west-3",
    "eu-central-1",
    "eu-north-1",
    "eu-south-1",
    "eu-south-2",
)

POOLINGS = ("avg", "max", "none")
#: ``--precision`` choices (:mod:`fruitdask.features.precision` resolves ``auto``).
PRECISIONS = ("float32", "bfloat16", "int8", "auto")
#: ``--runtime`` choices (:mod:`fruitdask.features.runtimes.choice` resolves ``auto``).
RUNTIMES = ("tensorflow", "openvino", "auto")
BACKENDS = ("dask", "spark")
#: Rows a run may always remove, whatever ``--max-remove-fraction`` says (small tables).
REMOVE_FLOOR = 10
MIN_IMAGE_SIZE = 32  # VGG16 without top needs at least 32x32 (five 2x2 poolings)

# Environment variables set in every process that runs TensorFlow. oneDNN is explicit so
# features do not change with the TensorFlow build's default (it moves values by ~3e-6).
TF_ENV: dict[str, str] = {
    "TF_ENABLE_ONEDNN_OPTS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


@dataclass(frozen=True)
class StorageSettings:
    """How to reach object storage, as plain values; identical on the client, workers and
    executors. :func:`fruitdask.storage.options.storage_options` turns them into fsspec's."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    allowed_regions: tuple[str, ...] = EU_REGIONS
    connect_timeout: float = 10.0
    # Seconds the output lock holds without renewal (renewed every third of it while the run
    # lives); a killed run's lock is taken over once it runs out (docs/s3.md).
    lock_ttl: float = 180.0
    # Seconds a run or a table command waits for the output lock another one holds (--wait-lock);
    # 0: fail at once.
    lock_wait: float = 0.0


@dataclass(frozen=True)
class KubeSettings:
    """What ``--cluster kubernetes`` asks dask-kubernetes for."""

    name: str = "fruitdask"
    namespace: str = "fruitdask"
    image: str = "ghcr.io/fruits/fruitdask:0.1.0"
    n_workers: int = 2
    worker_cpu: str = "2"
    worker_memory: str = "8Gi"
    # The workers' service account, with the S3 role (IRSA): the chart's, for release "fruits".
    # The scheduler never gets it (it runs under "<name>-scheduler", with no role).
    service_account: str | None = "fruits-fruitdask"
    region: str = "eu-west-1"
    # Secret with ca.crt, tls.crt and tls.key: scheduler, workers and client speak mutual TLS.
    tls_secret: str = "fruitdask-dask-tls"
    connect_existing: bool = False
    # The pod that owns the cluster (the downward API's metadata.name and metadata.uid, set by
    # the chart's daily CronJob as FRUITDASK_KUBE_OWNER_POD_NAME/_UID): every object created
    # for the cluster names it in ownerReferences, so Kubernetes' garbage collector deletes
    # them when that pod goes, even if the run never reaches its own clean-up.
    owner_pod_name: str | None = None
    owner_pod_uid: str | None = None
    # app.kubernetes.io/instance of the client pods the NetworkPolicies admit (with
    # fruitdask.io/client=true). None: the cluster's name. The chart's daily pod carries its
    # release's name, which cannot be the name of a cluster made per pod.
    client_instance: str | None = None


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``fruitdask run`` needs. Frozen: built once, passed down."""

    input: str = ""
    output: str = ""
    backend: str = "dask"
    cluster: str = "local"
    n_workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str = "auto"
    dashboard_address: str = ":0"
    cluster_timeout: float = 20.0  # seconds to reach the scheduler before failing the run
    image_size: int = 224
    batch_size: int = 32
    partition_size: int = 64
    pooling: str = "avg"
    precision: str = "auto"  # float32 | bfloat16 | int8 | auto (fruitdask.features.precision): bf16 where native
    # The inference runtime (fruitdask.features.runtimes; FRUITDASK_RUNTIME): auto keeps a
    # table's, else TensorFlow, OpenVINO for int8 (fruitdask.features.runtimes.choice).
    runtime: str = "auto"
    weights: str = "auto"
    allow_random_weights: bool = False  # --weights auto may fall back to random only when asked
    seed: int = 0
    components: int | None = None
    variance: float = 0.95
    pca_batch_size: int | None = None
    pca_power_iterations: int = 2
    overwrite: bool = False
    resume: bool = False
    keep_deleted: bool = False  # keep the rows of images gone from the input (Auto Loader's behaviour)
    # A run that would remove more than this share of the table's rows (and more than
    # REMOVE_FLOOR rows) refuses: a listing that sees less than the table is more
    # often a mistake (a wrong prefix, a folder moved away) than a mass deletion.
    max_remove_fraction: float = 0.1
    rebuild: bool = False  # featurize every image again into a new table version
    refit: bool = False  # fit the PCA again on every row and re-project them
    max_errors: float | None = None
    max_file_mb: float = 50.0  # files larger than this (by the listing) are skipped unread
    skipped_ok: bool = False
    quiet: bool = False
    debug: bool = False
    spark_master: str = "local[*]"
    storage: StorageSettings = field(default_factory=StorageSettings)
    kube: KubeSettings = field(default_factory=KubeSettings)

    def validate(self) -> RunConfig:
        """Check values that do not depend on the data; raise :class:`ConfigError`."""
        if not self.input:
            raise ConfigError("no input given: pass --input DIR_OR_URI (a folder of <Label>/<image>.jpg)")
        if not self.output:
            raise ConfigError("no output given: pass --output DIR_OR_URI")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}: use one of {', '.join(BACKENDS)}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {self.pooling!r}: use one of {', '.join(POOLINGS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ConfigError(
                f"--image-size {self.image_size} is too small for VGG16: use {MIN_IMAGE_SIZE} or more"
            )
        for name in ("batch_size", "partition_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.components is not None and self.components < 1:
            raise ConfigError(f"--components must be at least 1, got {self.components}")
        if not 0.0 < self.variance <= 1.0:
            raise ConfigError(f"--variance must be in (0, 1], got {self.variance}: e.g. --variance 0.95")
        if self.pca_batch_size is not None and self.pca_batch_size < 2:
            raise ConfigError(f"--pca-batch-size must be at least 2, got {self.pca_batch_size}")
        if self.cluster_timeout <= 0:
            raise ConfigError(f"--cluster-timeout must be a positive number of seconds, got {self.cluster_timeout}")
        if not self.max_file_mb > 0:
            raise ConfigError(f"--max-file-mb must be a positive number of megabytes, got {self.max_file_mb}: e.g. --max-file-mb 50")
        if not 0.0 <= self.max_remove_fraction <= 1.0:
            raise ConfigError(f"--max-remove-fraction must be in [0, 1], got {self.max_remove_fraction}: e.g. "
                              f"--max-remove-fraction 0.1 (1 allows removing every row)")
        if self.max_errors is not None and self.max_errors < 0:
            raise ConfigError(f"--max-errors must be >= 0, got {self.max_errors}")
        if not self.storage.lock_ttl >= 3:
            raise ConfigError(f"FRUITDASK_STORAGE_LOCK_TTL must be at least 3 seconds, got {self.storage.lock_ttl}: e.g. 180")
        check_lock_wait(self.storage)
        return self

    @property
    def max_file_bytes(self) -> int:
        """``--max-file-mb`` in bytes (MiB)."""
        return int(self.max_file_mb * 2**20)

    def max_errors_allowed(self, n_images: int) -> int | None:
        """``--max-errors`` as a count: a value below 1 is a fraction of the images."""
        if self.max_errors is None:
            return None
        if self.max_errors < 1:
            return math.floor(self.max_errors * n_images)
        return int(self.max_errors)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view, for ``run.json``. Holds no credentials by construction."""
        return dataclasses.asdict(self)


def check_lock_wait(settings: StorageSettings) -> None:
    """Refuse a negative ``--wait-lock`` (:class:`ConfigError`)."""
    if not settings.lock_wait >= 0:
        raise ConfigError(f"--wait-lock must be 0 or more seconds, got {settings.lock_wait:g}: e.g. --wait-lock 600")


def input_root(url: str) -> str:
    """The input as one spelling, so that an image's key (its path relative to this root,
    :func:`fruitdask.lake.keys.image_key`) never depends on how ``--input`` was typed.

    Local: the real absolute path (``T``, ``./T``, ``T/``, a symbolic link to it all give
    ``/abs/T``). Object storage: ``s3://bucket/prefix`` without a trailing slash, ``s3a://``
    written ``s3://`` (the same objects). Idempotent."""
    if not url:
        return url
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" in url:
        protocol, rest = url.split("://", 1)
        return f"{'s3' if protocol == 's3a' else protocol}://{rest.rstrip('/')}"
    return os.path.realpath(os.path.abspath(url))


_ENV_PREFIX = "FRUITDASK_"


def _coerce(name: str, raw: str, type_name: str) -> Any:
    """Turn an environment string into the field's declared type (``int | None`` etc.)."""
    try:
        if type_name.startswith("bool"):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
        if type_name.startswith("tuple"):
            return tuple(x.strip() for x in raw.split(",") if x.strip())
    except ValueError as e:
        raise ConfigError(f"environment variable {_ENV_PREFIX}{name.upper()}={raw!r} is not a valid value") from e
    return raw


def _layer(cls: type, defaults: Any, env: Mapping[str, str], flags: Mapping[str, Any], prefix: str) -> Any:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in ("storage", "kube"):
            continue
        env_key = f"{_ENV_PREFIX}{prefix}{f.name.upper()}"
        default = getattr(defaults, f.name)
        value = default
        if env_key in env:
            value = _coerce(prefix.lower() + f.name, env[env_key], str(f.type))
        flag_key = prefix.lower() + f.name
        if flags.get(flag_key) is not None:
            value = flags[flag_key]
        values[f.name] = value
    return values


def build_config(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> RunConfig:
    """Build the frozen :class:`RunConfig` from CLI flags over environment over defaults.

    Parameters
    ----------
    flags
        Parsed command-line values; ``None`` means "not given". Storage keys are prefixed
        ``storage_`` and Kubernetes keys ``kube_``.
    environ
        The environment to read ``FRUITDASK_*`` from (``os.environ`` when omitted).
    """
    env = os.environ if environ is None else environ
    kube_values = _layer(KubeSettings, KubeSettings(), env, flags, "KUBE_")
    run_values = _layer(RunConfig, RunConfig(), env, flags, "")
    run_values["input"] = input_root(run_values["input"])  # resolved once, here
    cfg = RunConfig(
        **run_values,
        storage=build_storage_settings(flags, env),
        kube=KubeSettings(**kube_values),
    )
    return cfg.validate()


def build_storage_settings(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> StorageSettings:
    """Only the :class:`StorageSettings`: ``storage_*`` flags over ``FRUITDASK_STORAGE_*`` and
    the AWS variables over defaults.

    The commands that only read and write storage (``serve``, ``predict``, ``train``,
    ``report``) build these alone, so a run setting exported for ``run`` (say
    ``FRUITDASK_VARIANCE=2``) is neither read nor validated by them.
    """
    env = os.environ if environ is None else environ
    storage_values = _layer(StorageSettings, StorageSettings(), env, flags, "STORAGE_")
    # The usual AWS variables are honoured too, so a profile or endpoint set for the AWS CLI
    # reaches fruitdask without a second name.
    aws_endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if storage_values["endpoint_url"] is None and aws_endpoint:
        storage_values["endpoint_url"] = aws_endpoint
    if isinstance(storage_values["allowed_regions"], str):
        storage_values["allowed_regions"] = tuple(
            r.strip() for r in storage_values["allowed_regions"].split(",") if r.strip()
        )
    return StorageSettings(**storage_values)
