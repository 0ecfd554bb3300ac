"""Zero-shot classification and retrieval metrics, defined as CLIP_benchmark defines them.

- top-1 / top-5: the true class is among the k highest logits (``torch.topk``);
  top-5 is reported only with at least 5 classes.
- mean per-class recall: recall of each class that has test images, averaged
  (sklearn's ``balanced_accuracy_score``, which CLIP_benchmark calls).
- retrieval R@k with several captions per image: text->image, a caption's hit
  is its own image in the top k; image->text, an image's hit is any of its
  captions in the top k. Computed as ranks, in blocks so COCO's 5k x 25k
  matrix is never held at once.

Ties count against the model: an item's rank is the number of non-matching
items scoring *at least as high* as the best match, so a match tied with a
non-match is ranked below it. (CLIP_benchmark's ``topk`` breaks ties in an
arbitrary order; counting them in the model's favour would make a set with
repeated captions -- the same text under several images -- score hits the
model cannot tell apart.) This is the pessimistic end of the expected rank
under random tie-breaking; without ties all three agree.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, n_classes: int) -> Dict[str, float]:
    labels = labels.long()
    out: Dict[str, float] = {}
    for k in (1, 5):
        if k > n_classes:
            continue
        top = logits.topk(k, dim=1).indices
        out[f"top{k}"] = float((top == labels[:, None]).any(dim=1).float().mean())
    pred = logits.argmax(dim=1)
    recalls = [float((pred[labels == c] == c).float().mean()) for c in labels.unique().tolist()]
    out["mean_per_class_recall"] = float(np.mean(recalls))
    return out


def retrieval_metrics(image_features: np.ndarray, text_features: np.ndarray, text_to_image: np.ndarray,
                      ks: Sequence[int] = (1, 5, 10), block: int = 1024, device: str = "cpu") -> Dict[str, float]:
    """``text_to_image[t]`` is the index of caption t's image; every image has at least one caption."""
    img = torch.from_numpy(np.ascontiguousarray(image_features, dtype=np.float32)).to(device)
    txt = torch.from_numpy(np.ascontiguousarray(text_features, dtype=np.float32)).to(device)
    owner = torch.from_numpy(np.asarray(text_to_image, dtype=np.int64)).to(device)
    n_img, n_txt = len(img), len(txt)
    t2i_rank = torch.empty(n_txt, dtype=torch.long, device=device)
    for s in range(0, n_txt, block):
        sim = txt[s:s + block] @ img.T                                   # [b, n_img]
        pos = sim.gather(1, owner[s:s + block, None])
        t2i_rank[s:s + block] = (sim >= pos).sum(dim=1) - 1           # ties against the model; -1: itself
    i2t_rank = torch.empty(n_img, dtype=torch.long, device=device)
    for s in range(0, n_img, block):
        sim = img[s:s + block] @ txt.T                                   # [b, n_txt]
        own = owner[None, :] == torch.arange(s, min(s + block, n_img), device=device)[:, None]
        best_pos = sim.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values
        i2t_rank[s:s + block] = ((sim >= best_pos) & ~own).sum(dim=1)  # ties against the model
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).float().mean())
    for k in ks:
        out[f"t2i_r{k}"] = float((t2i_rank < k).float().mean())
    return out
