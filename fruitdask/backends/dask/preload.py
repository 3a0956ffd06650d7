"""Worker preload of a local cluster: start the VGG16 warm-up as the worker process starts.

Passed as ``LocalCluster(preload=[__name__], preload_argv=[...])`` by
:func:`fruitdask.backends.dask.cluster.dask_client` for ``--cluster local``. The warm-up
(TensorFlow's import, the graph for the run's image size and precision) runs in a thread
of the worker from its first second, while the client is still importing, listing and
reading the weights, instead of waiting for the warm-up task that can only be sent once
the client is connected. :func:`fruitdask.features.model.warm_up` holds the model lock, so
a warm-up task or a first partition arriving meanwhile waits for it and reuses its graph.
"""

from __future__ import annotations

import logging
import threading

import click

logger = logging.getLogger(__name__)


def argv(image_size: int, precision: str) -> list[str]:
    """The ``preload_argv`` for a run of this image size and (resolved) precision."""
    return ["--image-size", str(image_size), "--precision", precision]


@click.command()
@click.option("--image-size", type=int, required=True)
@click.option("--precision", type=click.Choice(["float32", "bfloat16"]), required=True)
def dask_setup(worker, image_size: int, precision: str) -> None:
    """Start the warm-up in a daemon thread; the worker registers without waiting for it."""
    from fruitdask.features import model

    def warm() -> None:
        try:
            model.warm_up(image_size, worker.state.nthreads, precision)
        except Exception:  # the first partition builds the model again and reports the error
            logger.exception("warm-up at worker start failed")

    threading.Thread(target=warm, name="fruitdask-warm-up", daemon=True).start()
