"""The fruit classifier trained on a run's PCA features: training, the portable bundle, prediction."""
