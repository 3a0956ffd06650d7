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

from fruitdask.features.settings import FeatureSettings

logger = logging.getLogger(__name__)


def argv(settings: FeatureSettings) -> list[str]:
    """The ``preload_argv`` for a run of these settings (their precision resolved): Dask hands
    a preload strings only, so the settings travel as their own JSON."""
    return ["--feature-settings", settings.to_json()]


@click.command()
@click.option("--feature-settings", "settings_json", required=True)
def dask_setup(worker, settings_json: str) -> None:
    """Start the warm-up in a daemon thread; the worker registers without waiting for it."""
    from fruitdask.features import model

    settings = FeatureSettings.from_json(settings_json)

    def warm() -> None:
        try:
            model.warm_up(settings, worker.state.nthreads)
        except Exception:  # the first partition builds the model again and reports the error
            logger.exception("warm-up at worker start failed")

    threading.Thread(target=warm, name="fruitdask-warm-up", daemon=True).start()
