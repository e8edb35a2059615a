"""Optimizer, learning-rate schedule and global gradient clipping."""
