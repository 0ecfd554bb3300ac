"""Linear probe: CLIP's protocol on frozen image features.

Multinomial logistic regression (scikit-learn, L-BFGS), its inverse
regularisation strength C chosen on a validation split, then refit on
train+validation and scored once on test. CLIP's paper sweeps C over
[1e-6, 1e6] on a log scale and then narrows it with a parametric binary
search; :func:`sweep_c` does the same (decades first, then halving
log-steps around the best), so the number of fits stays small (13 + 2 per
refinement) instead of CLIP's 96-point grid.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

log = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    c_min: float = 1e-6
    c_max: float = 1e6
    refine_steps: int = 3          # log10 step 0.5, 0.25, 0.125 around the best decade
    max_iter: int = 1000
    val_fraction: float = 0.2      # held out of train when a dataset has no validation split
    seed: int = 0


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> LogisticRegression:
    clf = LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # large C on separable data: fine for a probe
        clf.fit(x, y)
    return clf


def select_c(train_x, train_y, val_x, val_y, cs: Sequence[float], max_iter: int = 1000,
             scores: Optional[Dict[float, float]] = None) -> Tuple[float, float]:
    """The first C of ``cs`` with the best validation accuracy; ``scores`` collects every fit."""
    scores = {} if scores is None else scores
    best_c, best_acc = None, -1.0
    for c in cs:
        if c not in scores:
            scores[c] = float(_fit(train_x, train_y, c, max_iter).score(val_x, val_y))
        if scores[c] > best_acc:
            best_c, best_acc = c, scores[c]
    return best_c, best_acc


def sweep_c(train_x, train_y, val_x, val_y, cfg: ProbeConfig) -> Tuple[float, float, Dict[float, float]]:
    """Decade sweep over [c_min, c_max], then binary-search-like refinement in log10(C)."""
    lo, hi = round(math.log10(cfg.c_min)), round(math.log10(cfg.c_max))
    scores: Dict[float, float] = {}
    best_c, best_acc = select_c(train_x, train_y, val_x, val_y, [10.0 ** e for e in range(lo, hi + 1)],
                                cfg.max_iter, scores)
    step = 0.5
    for _ in range(cfg.refine_steps):
        e = math.log10(best_c)
        best_c, best_acc = select_c(train_x, train_y, val_x, val_y,
                                    [best_c, 10.0 ** (e - step), 10.0 ** (e + step)], cfg.max_iter, scores)
        step /= 2
    return best_c, best_acc, scores


def fit_linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, cs: Optional[Sequence[float]] = None,
                     cfg: Optional[ProbeConfig] = None) -> Dict[str, float]:
    """Choose C on validation (from ``cs``, or by :func:`sweep_c`), refit on train+val, score on test."""
    cfg = cfg or ProbeConfig()
    if cs is not None:
        best_c, best_acc = select_c(train_x, train_y, val_x, val_y, cs, cfg.max_iter)
        n_fits = len(cs)
    else:
        best_c, best_acc, scores = sweep_c(train_x, train_y, val_x, val_y, cfg)
        n_fits = len(scores)
    clf = _fit(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]), best_c, cfg.max_iter)
    return {"accuracy": float(clf.score(test_x, test_y)), "C": float(best_c), "val_accuracy": float(best_acc),
            "n_fits": n_fits}


def holdout_split(y: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split of indices into (train, val): each class keeps at least one training image."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(fraction * len(idx))) if len(idx) > 1 else 0
        n_val = min(n_val, len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
