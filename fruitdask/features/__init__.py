"""Featurization: images in, VGG16 feature vectors out (the same code on every backend)."""
