"""The public service's limits, probes, drain and privacy (issue #23), without TensorFlow.

The real applications and the command's two servers run in a subprocess
(``tests/serve_fakes.py``: ``fruitdask serve``'s flags and servers, a fake model behind the
real decoder), on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image
from serve_fakes import LABELS, tiny_bundle
from test_serve import call, free_port, metric, post_image

from fruitdask.cli import main
from fruitdask.errors import ModelError


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


JPEG = (REPO / "fruitdask" / "sample_data").rglob("*.jpg").__next__().read_bytes()


# --- item 6: the weights' kind is validated, every source guarded ------------------------


@pytest.mark.parametrize("kind", ["File", "s3", "", None])
def test_a_bundle_whose_weights_kind_is_unknown_is_refused(tmp_path, kind):
    from fruitdask.classifier.bundle import ModelBundle

    model = tiny_bundle(tmp_path / "m", {"kind": kind, "source": "s3://elsewhere/w.h5", "sha256": "ab" * 32})
    with pytest.raises(ModelError, match=f"weights kind {kind!r}"):
        ModelBundle.load(str(model))


@pytest.mark.integration
def test_serve_guards_the_region_of_the_weights_named_in_the_bundle(s3, tmp_path, capsys):
    bucket = s3.bucket("us-weights", "us-east-1")
    model = tiny_bundle(tmp_path / "m", {"kind": "file", "source": f"{bucket}/w.weights.h5", "sha256": "ab" * 32})
    rc = main(["serve", "--model", str(model), "--s3-endpoint", s3.endpoint, "--port", str(free_port())])
    err = capsys.readouterr().err
    assert rc == 1 and "us-east-1" in err and "outside the allowed regions" in err, err
