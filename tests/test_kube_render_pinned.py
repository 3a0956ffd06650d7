"""The Kubernetes objects of ``--cluster kubernetes``, pinned byte for byte.

test_kube_spec.py checks what the objects mean; this file only notices that they changed
(key order included, as ``json.dumps`` writes them), so that a refactoring of the builders
in ``fruitdask/backends/dask/kube*.py`` cannot change a deployment unnoticed. The digests
were taken before ``make_cluster_spec`` was split into its parts (issue #12). When a change
of the objects is intended, check it in test_kube_spec.py and update the digest here.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from fruitdask.backends.dask.kube_connect import cluster_resources
from fruitdask.config import KubeSettings

CASES = {
    "default": (KubeSettings(), {}, "869273962a82b5f07ccd1ffcfa632e590dc048610741a94db539ec33b0621f57"),
    "everything-set": (
        KubeSettings(name="fruits-b", namespace="ml", image="reg.example/fd:1", n_workers=5, worker_cpu="1500m",
                     worker_memory="12G", service_account=None, region="eu-central-1", tls_secret="tls-x"),
        # HOME may not be overridden: the pinned objects keep the image's own.
        {"FRUITDASK_STORAGE_ENDPOINT_URL": "http://s3:9000", "HOME": "/elsewhere", "EXTRA": "1"},
        "c7ff2338d4389597b7df62dc4eef39d3819675af58b868757a23635ede7e8678",
    ),
    "one-small-worker": (
        KubeSettings(n_workers=1, worker_cpu="4", worker_memory="512Mi", connect_existing=True), {"A": "b"},
        "36dca7c97566a711ee605a712182c13e6ff731e1b9d2b694dad17636006b0c0e",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_rendered_objects_are_unchanged(case):
    settings, env, digest = CASES[case]
    text = json.dumps(cluster_resources(settings, env))
    assert hashlib.sha256(text.encode()).hexdigest() == digest, (
        "the Kubernetes objects changed; if that is intended, check them in test_kube_spec.py and update the digest"
    )
