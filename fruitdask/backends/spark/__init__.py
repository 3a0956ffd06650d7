"""The Spark backend, kept to compare the architecture (``--backend spark``)."""
