"""Evaluation on a world of the family: zero-shot classification, linear probe and retrieval.

Zero-shot classifiers are built with OpenCLIP's ``build_zero_shot_classifier``
(class names x prompt templates, averaged, normalised). The linear probe is
CLIP's protocol: multinomial logistic regression on frozen image features,
the inverse regularisation C chosen by a logarithmic sweep on validation, refit
on train+validation, scored on test. Retrieval is recall@K in both directions
with one caption per image.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch
from open_clip import build_zero_shot_classifier

from ...data.pairs import PairTensors
from .base import ZeroShotTask
from ...embed import encode_images, encode_pairs
from ...models import LoadedModel
from ...evaluate.linear_probe import ProbeConfig, fit_linear_probe

log = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)


@dataclass
class EvalConfig:
    probe_cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0)
    probe_max_iter: int = 1000
    batch_size: int = 512
    device: str = "cpu"


def zeroshot_accuracy(lm: LoadedModel, image_features: np.ndarray, tasks: List[ZeroShotTask],
                      device: str = "cpu") -> Dict[str, float]:
    """Top-1 accuracy per task; ``image_features`` are the split's normalised features."""
    out = {}
    model = lm.model.to(device).eval()
    for task in tasks:
        weights = build_zero_shot_classifier(model, lm.tokenizer, task.classnames, task.templates,
                                             num_classes_per_batch=64, device=device)
        logits = torch.from_numpy(image_features[task.indices]).to(device) @ weights
        pred = logits.argmax(dim=1).cpu().numpy()
        out[task.name] = float((pred == task.labels).mean())
    return out


def retrieval_recall(image_features: np.ndarray, text_features: np.ndarray,
                     ks: Sequence[int] = RECALL_KS) -> Dict[str, float]:
    """Recall@K, image->text and text->image, where pair i's caption is the only match of image i."""
    sim = torch.from_numpy(image_features) @ torch.from_numpy(text_features).T
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        correct = s.diagonal().unsqueeze(1)
        rank = (s >= correct).sum(dim=1) - 1  # other items scored at least as high: ties count against the model
        for k in ks:
            out[f"{name}_r{k}"] = float((rank < k).float().mean())
    return out


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                 test_x: np.ndarray, test_y: np.ndarray, cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
                 max_iter: int = 1000) -> Dict[str, float]:
    """Choose C on validation from ``cs``, refit on train+validation, return test accuracy and the chosen C."""
    return fit_linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, cs=cs,
                            cfg=ProbeConfig(max_iter=max_iter))


def evaluate_model(lm: LoadedModel, splits: Dict[str, PairTensors], tasks: Dict[str, List[ZeroShotTask]],
                   probe_labels: Dict[str, np.ndarray], probe_train: PairTensors, cfg: EvalConfig) -> dict:
    """All metrics for one model on the ``val`` and ``test`` splits.

    Zero-shot and retrieval are measured on each split. The linear probe trains
    on ``probe_train`` (a subset of the training split), picks C on val (its
    val accuracy is reported under ``val``), refits on train+val and is scored
    on test.
    """
    feats = {name: encode_pairs(lm, p, cfg.batch_size, cfg.device) for name, p in splits.items()}
    train_x = encode_images(lm, probe_train.images, cfg.batch_size, cfg.device)  # its captions: unused
    lp = linear_probe(train_x, probe_labels["train"], feats["val"][0], probe_labels["val"],
                      feats["test"][0], probe_labels["test"], cfg.probe_cs, cfg.probe_max_iter)
    out = {}
    for name, (img, txt) in feats.items():
        zs = zeroshot_accuracy(lm, img, tasks[name], cfg.device)
        out[name] = {
            "zeroshot": zs,
            "zeroshot_mean": float(np.mean(list(zs.values()))),
            "linear_probe": lp["val_accuracy"] if name == "val" else lp["accuracy"],
            "linear_probe_C": lp["C"],
            "retrieval": retrieval_recall(img, txt),
        }
    return out
