"""The worker's runtime cache (fruitdask.features.model): the weights are read while the warm-up
still builds the graph, and one trace serves every batch size."""

from __future__ import annotations

import threading

import numpy as np

from fruitdask.features import model
from fruitdask.features.settings import FeatureSettings

#: Sizes no other test builds at, so the process-wide caches start empty for these tests.
LOAD_SIZE, TRACE_SIZE = 40, 48


class RecordingSource:
    """A WeightsSource whose ``load`` says whether the model lock was held while it ran."""

    def __init__(self, sha256: str) -> None:
        self.sha256 = sha256
        self.arrays = model._random(seed=3)
        self.loading = threading.Event()
        self.lock_held: list[bool] = []

    def load(self) -> list[np.ndarray]:
        self.lock_held.append(model._LOCK.locked())
        self.loading.set()
        return list(self.arrays)


def test_weights_are_read_while_the_warm_up_builds():
    """The model lock held (as the warm-up holds it while it builds): a partition's thread
    reads the weights meanwhile, once, then waits for the lock; a second thread only waits."""
    source = RecordingSource("test-load-beside-build")
    settings = FeatureSettings(source.sha256, LOAD_SIZE, "avg", 4, "float32")
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(model.cached_runtime(source, settings))) for _ in range(2)]
    with model._LOCK:
        for t in threads:
            t.start()
        assert source.loading.wait(60), "the weights were not read while the model lock was held"
        assert got == []  # the model itself waits for the lock
    for t in threads:
        t.join(120)
    assert source.lock_held == [True] and model.load_counts()[source.sha256] == 1
    assert len(got) == 2 and got[0] is got[1]
    for have, want in zip(got[0].model.get_weights(), source.arrays, strict=True):
        np.testing.assert_array_equal(have, want)


def test_the_warm_graph_is_traced_once_for_every_batch_size():
    """warm_up traces the graph for any batch size and runs nothing; batches of 3, 1 and 2
    images then use that one trace (Keras alone traces again at a second batch size)."""
    settings = FeatureSettings("test-one-trace", TRACE_SIZE, "avg", 4, "float32")
    used = model.warm_counts().get("used", 0)
    assert model.warm_up(settings, None) > 0
    vgg = model.cached_runtime(RecordingSource(settings.weights_key), settings).model
    assert model.warm_counts()["used"] == used + 1  # the model is the warm graph
    x = np.random.default_rng(0).uniform(0, 255, (3, TRACE_SIZE, TRACE_SIZE, 3)).astype(np.float32)
    outs = [vgg.predict_on_batch(x[:n]) for n in (3, 1, 2)]
    assert vgg.predict_function.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(outs[1], outs[0][:1], rtol=1e-4, atol=1e-4)
