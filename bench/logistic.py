"""L2-regularized logistic regression fitted by Newton's method from zero:
the training scripts' one fitter (train_cache_verifier.py,
train_model_selector.py). Deterministic, so a rerun reproduces a committed
model."""

from __future__ import annotations

import numpy as np


def fit(
    x: np.ndarray, y: np.ndarray, l2: float = 1.0, newton_steps: int = 50
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(mean, scale, weights, bias) on standardized features; the bias is
    not shrunk."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(newton_steps):
        # Clipped: a separable feature drives logits past what exp holds.
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -60, 60)))
        gradient = z.T @ (p - y) + penalty * w
        hessian = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return mean, scale, w[:-1], float(w[-1])
