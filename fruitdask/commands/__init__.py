"""The sub-commands of ``python -m fruitdask``: one module each, shared flags in :mod:`.options`."""
