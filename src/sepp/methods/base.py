"""The method contract (docs/ARCHITECTURE.md): what the trainer, mining and evaluation rely on.

:class:`Method` is the one description of a method: the class attributes and hooks below are all that the
layers above ask of one; each hook has a default (mostly a no-op), so a method overrides only what it uses.
"""
from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from sepp.data.recipes import Recipe


class Method(nn.Module):
    """Base of every SSL method, built as ``cls(backbone, feat_dim, **hyperparameters)``: the constructor's
    keyword-only arguments are the method's hyperparameters, their defaults the paper's ImageNet values (the
    config section ``<name>:`` is derived from them, see :func:`sepp.methods.resolve`).

    A subclass sets ``backbone`` (images -> pooled ``[B, feat_dim]`` features, what kNN, the linear probe and
    mining use) and ``projector`` (features -> embedding, mining's ``mine.features=projector``), and
    implements ``forward(x1, x2, ids1, ids2, x3=None, ids3=None) -> {"loss": ..., ...}`` on the batch contract
    (nn.Module's own check reports a subclass that forgets it); extra entries of the dict are logged.

    Class attributes:

    - ``augmentation``: the paper's :class:`~sepp.data.recipes.Recipe` (every method sets it);
    - ``sync_bn``: the paper synchronises BN across devices, so SyncBatchNorm is the default under DDP on CUDA
      (``model.sync_bn`` unset);
    - ``has_negatives``: the loss has negatives, so ``sepp.mask_negatives`` / ``sepp.batch_positives`` may
      hand it known positives (``set_known_positives``); config resolution refuses them otherwise;
    - ``choices``: hyperparameter -> its allowed values, checked when the config is resolved;
    - ``metric_columns``: the keys ``epoch_metrics()`` may return (columns of ``metrics.csv``).
    """

    augmentation: ClassVar[Recipe]
    sync_bn: ClassVar[bool] = False
    has_negatives: ClassVar[bool] = False
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {}
    metric_columns: ClassVar[tuple[str, ...]] = ()
    backbone: nn.Module
    projector: nn.Module

    @property
    def requires_sync_bn(self) -> bool:
        """Whether this instance's own hyperparameters ask for SyncBatchNorm under DDP whatever
        ``model.sync_bn`` says (MoCo-v2's ``bn="sync"``); False by default."""
        return False

    def after_step(self, progress: float) -> None:
        """Called after every optimizer step with the run's progress in [0, 1] (momentum / EMA updates);
        nothing by default."""

    def param_groups(self, base_lr: float) -> list[dict]:
        """Optimizer groups: one per child module with trainable parameters (backbone, projector,
        predictor, ... in the order they were assigned), each at ``base_lr``. A group with ``"fix_lr": True``
        keeps ``base_lr`` when the schedule changes the rate (SimSiam's predictor)."""
        groups = []
        for name, child in self.named_children():
            params = [p for p in child.parameters() if p.requires_grad]
            if params:
                groups.append({"name": name, "params": params, "lr": base_lr})
        return groups

    def set_known_positives(self, i, j, num_images: int, positives: bool = False) -> None:
        """Register known positive pairs (int64 endpoints ``i``, ``j``, tensors or arrays, among
        ``num_images`` images); from then on a view of an anchor's own image or of a known partner is never
        one of its negatives, or with ``positives`` is a further positive. Called by the trainer before
        training and after each re-mining, only when ``has_negatives``; nothing by default."""

    def set_labels(self, labels) -> None:
        """Dataset labels indexed by image id (int array, -1 = unknown), or None; called once by the trainer
        before training, for label-based monitors only (never for the loss). Ignored by default."""

    def epoch_metrics(self) -> dict[str, float]:
        """Values to log in the epoch's row of ``metrics.csv`` (keys among ``metric_columns``), called once per
        epoch on every process (it may all-reduce); none by default."""
        return {}
