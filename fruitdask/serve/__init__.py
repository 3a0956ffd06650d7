"""``fruitdask serve``: the classifier bundle behind an HTTP API (Starlette on uvicorn).

One process loads the bundle and the VGG16 weights once, then answers
``POST /v1/predict`` with the top-k fruits of a photo. Concurrent requests are
micro-batched into one VGG16 call. The modules, one concern each:

- :mod:`.settings`: the frozen :class:`ServeSettings` (limits, batching, timeouts);
- :mod:`.predictor`: decode + featurize + classify with ``predict``'s own functions;
- :mod:`.answer`: the fruit (:mod:`fruitdask.catalogue`) in the reader's language, and the status
  recognised / uncertain / unknown (:mod:`fruitdask.classifier.openset`);
- :mod:`.page`: the public page at ``/`` (``static/``), under a strict Content-Security-Policy;
- :mod:`.batcher`: the micro-batcher (bounded wait, bounded batch, one inference thread);
- :mod:`.metrics`: Prometheus metrics and the ASGI middleware that records requests;
- :mod:`.app`: the public Starlette application (``/v1/predict``, ``/v1/model``, body limits, JSON errors);
- :mod:`.probes`: ``/healthz``, ``/readyz``, ``/metrics``, ``/drain`` on a port of their own;
- :mod:`.state`: what both applications share (model, batcher, budget, drain), :class:`ApiError`;
- :mod:`.limits`: ``?top=``, the bytes in flight, uploads per client, sizing from the memory limit;
- :mod:`.follow`: a registry as ``--model``: its champion followed (poll + SIGHUP), swapped in between batches;
- :mod:`.runner`: serving a bundle or a registry's champion (region guard, bundle, then both uvicorn servers in one process), and the drain on SIGTERM;
- :mod:`.protocol`: uvicorn's HTTP/1.1 protocol with a request-header timeout;
- :mod:`fruitdask.commands.serve` (outside this package): the ``serve`` sub-command's flags, then :func:`.runner.serve_bundle`.

Starlette, uvicorn, python-multipart and prometheus-client are the ``serve`` extra
(``pip install fruitdask[serve]``); nothing here is imported by the pipeline.
"""

from __future__ import annotations

from fruitdask.serve.settings import ServeSettings

__all__ = ["ServeSettings"]
