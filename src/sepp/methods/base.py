"""The method contract (docs/ARCHITECTURE.md): what the trainer, mining and evaluation rely on."""
from __future__ import annotations

from torch import nn


class Method(nn.Module):
    """Base of every SSL method. A subclass sets ``backbone`` (images -> pooled ``[B, feat_dim]`` features) and
    ``projector`` (features -> embedding) and implements ``forward(x1, x2, ids1, ids2, x3=None, ids3=None) ->
    {"loss": ..., ...}`` (nn.Module's own check reports a subclass that forgets it); the rest has defaults it may
    override.

    Class attributes: ``sync_bn`` (the paper synchronises BN across devices, so SyncBatchNorm is the
    default under DDP on CUDA, ``model.sync_bn``). A method whose loss has negatives also defines
    ``set_known_positives(i, j, num_images, positives=False)`` (``sepp.mask_negatives`` /
    ``sepp.batch_positives``); optional: ``set_labels(labels)`` and ``epoch_metrics() -> dict``.
    """

    sync_bn: bool = False
    backbone: nn.Module
    projector: nn.Module

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

    @classmethod
    def has_negatives(cls) -> bool:
        """Whether the loss has negatives that known positives can mask or turn into positives."""
        return hasattr(cls, "set_known_positives")
