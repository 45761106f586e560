"""Plots and markdown reports of training runs."""
