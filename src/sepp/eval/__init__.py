"""Evaluation of frozen backbones: the labelled splits and their fast input form, weighted kNN (the training
monitor and `sepp eval knn`), linear probe, fine-tuning, transfer, embedding pictures, seed statistics."""
from sepp.eval.embed_plot import ALGORITHMS
from sepp.eval.linear import PROTOCOLS
from sepp.eval.stats import SCORES

RUN_EVALS = (*SCORES, "embed_plot")  # what `sepp run` can evaluate: every score, and the embedding picture

# Config keys whose values name an entry of a registry of this package (checked by sepp.engine.setup.resolve).
CONFIG_CHOICES = {"eval.linear_protocol": PROTOCOLS, "eval.embed_algorithm": ALGORITHMS, "run.evals": RUN_EVALS}
