"""metrics.csv (one row per epoch) and TensorBoard events of a training run, on the main process only."""
from __future__ import annotations

import csv
from pathlib import Path

METRIC_COLUMNS = ["epoch", "step", "loss", "lr", "samples_per_s", "epoch_seconds", "knn_top1",
                  "pairs", "pair_precision", "pair_coverage"]


class MetricsLog:
    """Appends one row per epoch; a resumed run keeps the rows up to its checkpoint's epoch. The columns are
    ``METRIC_COLUMNS`` and then ``extra_columns`` (the method's ``metric_columns``)."""

    def __init__(self, out: Path, resume_epoch: int, enabled: bool, extra_columns: tuple[str, ...] = ()):
        self.enabled = enabled
        self.path = out / "metrics.csv"
        self.columns = METRIC_COLUMNS + [c for c in extra_columns if c not in METRIC_COLUMNS]
        self.tb = None
        if not enabled:
            return
        rows = []
        if self.path.exists() and resume_epoch > 0:
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= resume_epoch]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in self.columns} for r in rows)
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency

            self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_epoch + 1 if resume_epoch else None)
        except Exception:  # tensorboard missing or broken: the CSV is the record
            self.tb = None

    def write(self, row: dict):
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow({k: row.get(k, "") for k in self.columns})
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and v != "":
                    self.tb.add_scalar(f"train/{k}", v, row["epoch"])
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()
