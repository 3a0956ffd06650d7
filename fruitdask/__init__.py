"""fruitdask: Fruits-360 images to VGG16 features and PCA, on Dask (or Spark to compare)."""

from __future__ import annotations

__version__ = "0.1.0"
