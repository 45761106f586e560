"""Semantic-pair mining: embed un-augmented images, exact or FAISS cosine k-NN over the whole dataset,
top-k + threshold pair selection, statistics, diagnostic oracle pairs, mining with a model being trained or
with any encoder file."""
from sepp.mining.oracle import ORACLES
from sepp.mining.search import BACKENDS, PRECISIONS

# Config keys whose values name an entry of a registry of this package (checked by sepp.engine.setup.resolve).
CONFIG_CHOICES = {"mine.backend": BACKENDS, "mine.precision": PRECISIONS, "mine.oracle": ("none", *ORACLES)}
