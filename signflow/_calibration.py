"""Calibrated probabilities: temperature scaling and the expected calibration error (ECE).

A fine-tuned classifier's softmax is rarely a trustworthy probability: with label smoothing the
reference model said 0.88 on average where it was right 99% of the time. Temperature scaling
(Guo et al., 2017) divides the logits by one number `T` fitted on the validation split, by
minimising the negative log-likelihood there (held back when that split has no mistakes, see
`fit_temperature`). Dividing every logit by the same positive number
never changes which class is largest, so accuracy is untouched; only the confidence moves.

`T` is stored in the model file, baked into the exported ONNX graph (logits / T) and recorded in
its metadata, so `signflow predict`, the ONNX file and the MLflow model give the same numbers.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

TEMPERATURE_RANGE = (0.05, 20.0)
"""Temperatures searched."""


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of `logits / temperature`, in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    top = scaled.max(axis=1, keepdims=True)
    return scaled - top - np.log(np.exp(scaled - top).sum(axis=1, keepdims=True))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean -log p(true class) of `softmax(logits / temperature)`."""
    return float(-log_softmax(logits, temperature)[np.arange(len(labels)), labels].mean())


def mean_confidence(logits: np.ndarray, temperature: float) -> float:
    """Mean top-1 probability; it falls as the temperature rises."""
    return float(softmax(logits, temperature).max(axis=1).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature for the validation split's `logits` and `labels`: the one that minimises
    their negative log-likelihood (temperature scaling), raised if needed so that the mean
    confidence on them stays at or below (right + 1) / (images + 2).

    That bound is Laplace's rule of succession: n right answers out of n do not make the next one
    certain. Without it a validation split with no mistakes, which happens on the reference dataset,
    has no likelihood minimum: T runs to the bottom of `TEMPERATURE_RANGE` and every probability to
    1, mistakes included. With mistakes in the split the bound rarely binds. 1.0 (no change) when
    there is nothing to fit on.
    """
    from scipy.optimize import brentq, minimize_scalar  # only training fits; the evaluate step need not import it

    labels = np.asarray(labels)
    if len(labels) == 0 or not np.isfinite(logits).all():
        return 1.0
    low, high = TEMPERATURE_RANGE
    result = minimize_scalar(  # the NLL is convex in 1/T, so a bounded 1-D search finds its minimum
        lambda log_t: negative_log_likelihood(logits, labels, math.exp(log_t)),
        bounds=(math.log(low), math.log(high)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    temperature = math.exp(result.x)
    ceiling = (int((np.argmax(logits, axis=1) == labels).sum()) + 1) / (len(labels) + 2)
    if mean_confidence(logits, temperature) > ceiling:
        if mean_confidence(logits, high) >= ceiling:
            temperature = high
        else:
            temperature = brentq(lambda t: mean_confidence(logits, t) - ceiling, temperature, high, xtol=1e-6)
    return float(round(temperature, 6))


def calibration_bins(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> pd.DataFrame:
    """Per confidence bin (equal width on [0, 1]): images, mean confidence and accuracy."""
    confidence = probabilities.max(1) if len(labels) else np.empty(0)
    correct = probabilities.argmax(1) == labels if len(labels) else np.empty(0, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds (edge_i, edge_i+1]; a confidence of exactly 0 cannot occur for a softmax.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        rows.append(
            {
                "bin": b,
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "images": count,
                "confidence": float(confidence[members].mean()) if count else float("nan"),
                "accuracy": float(correct[members].mean()) if count else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def expected_calibration_error(table: pd.DataFrame) -> float:
    """ECE: the image-weighted mean gap between confidence and accuracy over the bins."""
    total = table["images"].sum()
    if total == 0:
        return float("nan")
    used = table[table["images"] > 0]
    return float((used["images"] * (used["confidence"] - used["accuracy"]).abs()).sum() / total)
