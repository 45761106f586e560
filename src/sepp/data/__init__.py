"""Datasets with indices, augmentation recipes and transforms, epoch plans and loaders."""
