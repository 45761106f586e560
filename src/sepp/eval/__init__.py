"""Evaluation of frozen backbones: feature extraction, weighted kNN monitor, linear probe."""
