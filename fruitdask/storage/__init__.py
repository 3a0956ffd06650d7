"""The one package that talks to storage (fsspec: local paths and ``s3://``, each a store).

Everything takes ``storage_options`` explicitly so that worker processes and Spark executors
reach the same endpoint as the driver. Each module owns one thing:

- :mod:`.base`: the :class:`~fruitdask.storage.base.Store` protocol, the seam of every
  store-specific step; :mod:`.stores`: the registry from a URL's scheme to its store;
- :mod:`.local`, :mod:`.s3`: the two stores (everything specific to S3 is in :mod:`.s3`:
  options, delta-rs credentials, bucket regions, error messages, conditional writes, flags);
- :mod:`.urls`: which file system a URL lives on; the protocols fruitdask reads;
- :mod:`.paths`: the output's layout, ``_SUCCESS``, the hidden siblings beside an output;
- :mod:`.options`: the fsspec ``storage_options`` of the configuration's storage settings;
- :mod:`.listing`: the input listing (:func:`iter_images`, :func:`scan_images`, :func:`list_images`);
- :mod:`.files`: reading and writing whole files and prefixes (image bytes only inside tasks);
- :mod:`.target`: :class:`OutputTarget`, a run's output folder updated in place under its lock, and
  :class:`StagedOutput`, a dataset (a model bundle) written whole through staging and committed;
- :mod:`.commit`: the commit protocol that publishes staging, ``_SUCCESS`` last;
- :mod:`.safety`, :mod:`.lease`: what ``--overwrite`` may replace, the copy-aside, the lock;
- :mod:`.regions`: the EU region guard (each store says where a location lives).

The names most callers use are re-exported here (``storage.read_bytes``, ``storage.OutputTarget``).
"""

from __future__ import annotations

from fruitdask.storage.files import (
    download_to_local,
    file_sha256,
    list_files,
    read_bytes,
    read_parquet,
    remove_prefix,
    url_sha256,
    write_file,
    write_parquet_part,
)
from fruitdask.storage.listing import IMAGE_EXTENSIONS, ListedBatch, iter_images, list_images, scan_images
from fruitdask.storage.options import storage_options
from fruitdask.storage.paths import SUCCESS_MARKER, join
from fruitdask.storage.regions import guard_regions
from fruitdask.storage.s3 import bucket_region, normalize_region, split_bucket
from fruitdask.storage.stores import translate
from fruitdask.storage.target import OutputTarget, StagedOutput, committed
from fruitdask.storage.urls import check_protocols, get_fs, is_remote, unsafe_name

__all__ = [
    "IMAGE_EXTENSIONS", "SUCCESS_MARKER", "ListedBatch", "OutputTarget", "StagedOutput", "bucket_region", "check_protocols", "committed",
    "download_to_local", "file_sha256", "get_fs", "guard_regions", "is_remote", "iter_images", "join", "list_files",
    "list_images", "normalize_region", "read_bytes", "read_parquet", "remove_prefix", "scan_images", "split_bucket",
    "storage_options", "translate", "unsafe_name", "url_sha256", "write_file", "write_parquet_part",
]
