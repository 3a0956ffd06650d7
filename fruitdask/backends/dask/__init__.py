"""The Dask backend, with its clusters (local, ``tcp://``, Kubernetes)."""
