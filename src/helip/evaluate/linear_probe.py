"""Linear probe: CLIP's protocol on frozen image features.

Multinomial logistic regression (scikit-learn, L-BFGS), its inverse
regularisation strength C chosen on a validation split, then refit on
train+validation and scored once on test. CLIP's paper sweeps C over
[1e-6, 1e6] on a log scale and then narrows it with a parametric binary
search; :func:`sweep_c` does the same (decades first, then halving
log-steps around the best), so the number of fits stays small (13 + 2 per
refinement) instead of CLIP's 96-point grid.

Speed: the fits are warm-started along the C path (each from the solution at
the nearest C already fitted; the decades in increasing order), which is what
makes a sweep take seconds instead of minutes -- a large C on nearly separable
features needs many L-BFGS iterations from zero, few from the next smaller C.

Edges: when the best C is the smallest or largest decade, the sweep is
widened by up to ``widen_decades`` decades on that side while it stays there;
refinement never leaves the decades swept. A C still at the edge of the
widened range is logged and reported (``C_at_edge`` in the result).
"""
from __future__ import annotations

import copy
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
    widen_decades: int = 3         # decades added beyond c_min/c_max while the best C sits at that edge
    warm_start: bool = True        # start each fit from the nearest C's solution (False: from zero)


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int,
         init: Optional[LogisticRegression] = None) -> LogisticRegression:
    """One fit at C; with ``init`` (a fitted probe on the same classes), started from its solution."""
    if init is not None:
        clf = copy.deepcopy(init)
        clf.set_params(C=c, max_iter=max_iter, warm_start=True)
    else:
        clf = LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # large C on separable data: fine for a probe
        clf.fit(x, y)
    return clf


def _nearest(models: Dict[float, LogisticRegression], c: float) -> Optional[LogisticRegression]:
    if not models:
        return None
    return models[min(models, key=lambda k: (abs(math.log10(k) - math.log10(c)), k))]


def select_c(train_x, train_y, val_x, val_y, cs: Sequence[float], max_iter: int = 1000,
             scores: Optional[Dict[float, float]] = None,
             models: Optional[Dict[float, LogisticRegression]] = None) -> Tuple[float, float]:
    """The first C of ``cs`` with the best validation accuracy; ``scores`` collects every fit.

    With ``models`` (a dict, filled here), each fit is warm-started from the
    fitted probe at the nearest C.
    """
    scores = {} if scores is None else scores
    best_c, best_acc = None, -1.0
    for c in cs:
        if c not in scores:
            clf = _fit(train_x, train_y, c, max_iter, _nearest(models, c) if models is not None else None)
            scores[c] = float(clf.score(val_x, val_y))
            if models is not None:
                models[c] = clf
        if scores[c] > best_acc:
            best_c, best_acc = c, scores[c]
    return best_c, best_acc


def sweep_c(train_x, train_y, val_x, val_y, cfg: ProbeConfig,
            models: Optional[Dict[float, LogisticRegression]] = None) -> Tuple[float, float, Dict[float, float]]:
    """Decade sweep over [c_min, c_max] (widened at an edge holding the best C, see the module's
    docstring), then binary-search-like refinement in log10(C) inside the decades swept."""
    lo, hi = round(math.log10(cfg.c_min)), round(math.log10(cfg.c_max))
    scores: Dict[float, float] = {}
    if models is None and cfg.warm_start:
        models = {}
    fit = lambda cs: select_c(train_x, train_y, val_x, val_y, cs, cfg.max_iter, scores, models)  # noqa: E731
    best_c, best_acc = fit([10.0 ** e for e in range(lo, hi + 1)])
    for _ in range(cfg.widen_decades):
        e = round(math.log10(best_c))
        if e == hi:
            hi += 1
        elif e == lo and lo < hi and scores[10.0 ** lo] > scores[10.0 ** (lo + 1)]:
            lo -= 1  # (smaller C wins ties, so only a strictly better smallest decade points further down)
        else:
            break
        best_c, best_acc = fit([10.0 ** x for x in range(lo, hi + 1)])  # (the decades fitted before are reused)
    step = 0.5
    for _ in range(cfg.refine_steps):
        e = math.log10(best_c)
        best_c, best_acc = fit([best_c, *(10.0 ** x for x in (e - step, e + step) if lo <= x <= hi)])
        step /= 2
    return best_c, best_acc, scores


def fit_linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, cs: Optional[Sequence[float]] = None,
                     cfg: Optional[ProbeConfig] = None) -> Dict[str, float]:
    """Choose C on validation (from ``cs``, or by :func:`sweep_c`), refit on train+val, score on test."""
    cfg = cfg or ProbeConfig()
    models: Optional[Dict[float, LogisticRegression]] = {} if cfg.warm_start else None
    if cs is not None:
        best_c, best_acc = select_c(train_x, train_y, val_x, val_y, sorted(cs), cfg.max_iter, models=models)
        n_fits, tried = len(cs), sorted(cs)
    else:
        best_c, best_acc, scores = sweep_c(train_x, train_y, val_x, val_y, cfg, models)
        n_fits, tried = len(scores), sorted(scores)
    scored = [(c, scores[c]) for c in tried] if cs is None else None
    edge = None
    if len(tried) > 1 and best_c >= tried[-1]:
        edge = "max"
    elif len(tried) > 1 and best_c <= tried[0] and (scored is None or scored[0][1] > scored[1][1]):
        edge = "min"   # a tie with the next C (a flat curve) is no sign that smaller would do better
    if edge:
        log.warning("linear probe: the chosen C=%.3g is the %s of the Cs tried (%.3g..%.3g); validation accuracy "
                    "may still improve beyond it (widen --probe-c-min/--probe-c-max)", best_c,
                    "largest" if edge == "max" else "smallest", tried[0], tried[-1])
    all_y = np.concatenate([train_y, val_y])
    init = models.get(best_c) if models else None
    if init is not None and not np.array_equal(np.unique(all_y), init.classes_):
        init = None  # validation has classes training had not: other coefficient shapes
    clf = _fit(np.concatenate([train_x, val_x]), all_y, best_c, cfg.max_iter, init)
    return {"accuracy": float(clf.score(test_x, test_y)), "C": float(best_c), "val_accuracy": float(best_acc),
            "n_fits": n_fits, "C_range": [float(tried[0]), float(tried[-1])], "C_at_edge": edge}


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
