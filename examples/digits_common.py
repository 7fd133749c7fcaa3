"""What the digits examples share: scikit-learn's bundled 8x8 digits as tensors, and a small MLP."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits


def digits(seed: int = 0, val_fraction: float = 0.2):
    """The 1,797 bundled 8x8 digit images, scaled to [0, 1], shuffled and split (train, val)."""
    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)
    x = torch.tensor(x, dtype=torch.float32)[idx] / 16.0
    y = torch.tensor(y, dtype=torch.long)[idx]
    cut = int((1 - val_fraction) * len(x))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def mlp(hidden: int = 64) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
