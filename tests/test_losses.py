"""HNML on hand-computed cases, its gradient, the partner mask, and the composition with ClipLoss."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip import ClipLoss

from helip.losses import HardNegativeMarginLoss, HelipLoss, hard_partner_mask

# Three samples with 2-d unit features, chosen so every cosine is a round number:
#   I0 = (1, 0)      T0 = (1, 0)
#   I1 = (0, 1)      T1 = (0.8, 0.6)
#   I2 = (0.6, 0.8)  T2 = (0, 1)
# s(I_a, T_b) = I_a . T_b:
#            T0    T1    T2
#   I0  [  1.0,  0.8,  0.0 ]
#   I1  [  0.0,  0.6,  1.0 ]
#   I2  [  0.6,  0.96, 0.8 ]
IMG = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
TXT = [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]


def feats(rows, scale=None, dtype=torch.float32, requires_grad=False):
    x = torch.tensor(rows, dtype=dtype)
    if scale is not None:  # the loss normalises: positive per-row scales must not matter
        x = x * torch.tensor(scale, dtype=dtype)[:, None]
    return x.requires_grad_(requires_grad)


def mask_of(n, pairs):
    m = torch.zeros(n, n, dtype=torch.bool)
    for a, b in pairs:
        m[a, b] = True
    return m


def test_hnml_hand_computed_two_partners():
    # margin 0.3, partners (0,1) and (1,0):
    # HNML_0 (j=1): max(0, .3 + s(I0,T1) - s(I0,T0)) = max(0, .3 + .8 - 1) = 0.1
    #             + max(0, .3 + s(I1,T0) - s(I0,T0)) = max(0, .3 + 0 - 1)  = 0    (inactive hinge)
    #             = 0.1
    # HNML_1 (j=0): max(0, .3 + s(I1,T0) - s(I1,T1)) = max(0, .3 + 0 - .6)  = 0    (inactive hinge)
    #             + max(0, .3 + s(I0,T1) - s(I1,T1)) = max(0, .3 + .8 - .6) = 0.5
    #             = 0.5
    # sample 2 has no partner, so it is left out of the mean even though s(I2,T1)=0.96 > s(I2,T2)=0.8
    # mean = (0.1 + 0.5) / 2 = 0.3
    m = mask_of(3, [(0, 1), (1, 0)])
    loss = HardNegativeMarginLoss(margin=0.3, weight=1.0)(feats(IMG), feats(TXT), m)
    assert loss.item() == pytest.approx(0.3, abs=1e-6)
    # weight scales the term: 2 * 0.3
    loss2 = HardNegativeMarginLoss(margin=0.3, weight=2.0)(feats(IMG), feats(TXT), m)
    assert loss2.item() == pytest.approx(0.6, abs=1e-6)
    # features are normalised inside: arbitrary positive row scales give the same value
    loss3 = HardNegativeMarginLoss(margin=0.3, weight=2.0)(
        feats(IMG, scale=[3.0, 0.5, 7.0]), feats(TXT, scale=[0.2, 4.0, 1.5]), m)
    assert loss3.item() == pytest.approx(0.6, abs=1e-6)


def test_hnml_hand_computed_mean_over_partners():
    # partners (0,1), (0,2), (1,0); margin 0.3
    # HNML_0: j=1 -> 0.1 (as above)
    #         j=2 -> max(0, .3 + s(I0,T2) - 1) = max(0, .3 + 0 - 1) = 0
    #              + max(0, .3 + s(I2,T0) - 1) = max(0, .3 + .6 - 1) = max(0, -.1) = 0
    #         mean over its 2 partners = (0.1 + 0) / 2 = 0.05
    # HNML_1: j=0 -> 0.5 (as above)
    # row 2 of the mask is empty: sample 2 is not in the mean
    # total = (0.05 + 0.5) / 2 = 0.275
    m = mask_of(3, [(0, 1), (0, 2), (1, 0)])
    loss = HardNegativeMarginLoss(margin=0.3, weight=1.0)(feats(IMG), feats(TXT), m)
    assert loss.item() == pytest.approx(0.275, abs=1e-6)
    # a float mask means the same thing as a bool mask
    loss_f = HardNegativeMarginLoss(margin=0.3, weight=1.0)(feats(IMG), feats(TXT), m.float())
    assert loss_f.item() == pytest.approx(0.275, abs=1e-6)


def test_hnml_all_hinges_inactive_is_zero():
    # margin 0.05, partner (0,1) only (a directed mask, so only sample 0 is in the mean):
    #   HNML_0 = max(0, .05 + s(I0,T1) - s(I0,T0)) + max(0, .05 + s(I1,T0) - s(I0,T0))
    #          = max(0, .05 + .8 - 1) + max(0, .05 + 0 - 1) = 0 + 0 = 0
    # partner (1,0) only:
    #   HNML_1 = max(0, .05 + s(I1,T0) - s(I1,T1)) + max(0, .05 + s(I0,T1) - s(I1,T1))
    #          = max(0, .05 + 0 - .6) + max(0, .05 + .8 - .6) = 0 + 0.25 = 0.25
    loss = HardNegativeMarginLoss(margin=0.05)(feats(IMG), feats(TXT), mask_of(3, [(0, 1)]))
    assert loss.item() == 0.0
    loss = HardNegativeMarginLoss(margin=0.05)(feats(IMG), feats(TXT), mask_of(3, [(1, 0)]))
    assert loss.item() == pytest.approx(0.25, abs=1e-6)


def test_hnml_gradient_hand_derived():
    # Two samples, partner (0,1) only, margin 0.3, weight 1.5:
    #   L = 1.5 * [ relu(.3 + s(I0,T1) - s(I0,T0)) + relu(.3 + s(I1,T0) - s(I0,T0)) ]
    #     = 1.5 * [ relu(.3 + .8 - 1) + relu(.3 + 0 - 1) ] = 1.5 * 0.1 = 0.15; only the first hinge is active.
    # On unit vectors u: dL/dI0_hat = 1.5 (T1 - T0) = 1.5 (-0.2, 0.6),  dL/dT1_hat = 1.5 I0 = (1.5, 0),
    #                    dL/dT0_hat = -1.5 I0.
    # The loss normalises x -> x/|x|; for x = r u the chain rule gives dL/dx = (Id - u u^T) dL/du / r.
    # We feed I0 = 2 * (1, 0) (r = 2) and unit T0, T1:
    #   dL/dI0 = (Id - e1 e1^T) (-0.3, 0.9) / 2 = (0, 0.45)
    #   dL/dT1 = g - (g . T1) T1 with g = (1.5, 0): (1.5, 0) - 1.2 * (0.8, 0.6) = (0.54, -0.72)
    #   dL/dT0 = (Id - e1 e1^T) (-1.5, 0) = (0, 0)
    #   dL/dI1 = 0 (its only term is the inactive hinge)
    img = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    txt = torch.tensor([[1.0, 0.0], [0.8, 0.6]], dtype=torch.float64, requires_grad=True)
    loss = HardNegativeMarginLoss(margin=0.3, weight=1.5)(img, txt, mask_of(2, [(0, 1)]))
    assert loss.item() == pytest.approx(0.15, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(img.grad, torch.tensor([[0.0, 0.45], [0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(txt.grad, torch.tensor([[0.0, 0.0], [0.54, -0.72]], dtype=torch.float64))


def test_hnml_gradcheck():
    g = torch.Generator().manual_seed(0)
    b, d = 6, 5
    img = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
    mask = mask_of(b, [(0, 1), (1, 0), (2, 3), (2, 4), (5, 0)])
    fn = HardNegativeMarginLoss(margin=0.5, weight=0.7)
    assert fn(img, txt, mask).item() > 0  # some hinges are active, so the gradient is not trivially zero
    assert torch.autograd.gradcheck(lambda i, t: fn(i, t, mask), (img, txt), eps=1e-6, atol=1e-6)


def test_hnml_no_partners_is_exact_zero_with_a_graph():
    img = feats(IMG, requires_grad=True)
    txt = feats(TXT, requires_grad=True)
    loss = HardNegativeMarginLoss(margin=0.3, weight=1.0)(img, txt, torch.zeros(3, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert img.grad is not None and torch.count_nonzero(img.grad) == 0
    assert txt.grad is not None and torch.count_nonzero(txt.grad) == 0


# ---------------------------------------------------------------- hard_partner_mask

# batch positions:    0  1  2  3
BATCH = [5, 2, 7, 0]
HARD = np.full((10, 3), -1, dtype=np.int32)
HARD[5] = [2, 9, 0]   # lists 2 (pos 1) at rank 1 and 0 (pos 3) at rank 3
HARD[2] = [8, 1, 4]   # nobody in the batch
HARD[7] = [7, -1, -1]  # lists itself: must never give a diagonal entry
HARD[0] = [3, 4, 7]   # lists 7 (pos 2) at rank 3


def as_set(mask):
    return {(int(a), int(b)) for a, b in torch.nonzero(mask)}


def test_hard_partner_mask_directed():
    m = hard_partner_mask(BATCH, HARD, top_k=3, symmetric=False)
    assert m.dtype == torch.bool and m.shape == (4, 4)
    assert as_set(m) == {(0, 1), (0, 3), (3, 2)}


def test_hard_partner_mask_symmetric():
    m = hard_partner_mask(BATCH, HARD, top_k=3, symmetric=True)
    assert as_set(m) == {(0, 1), (1, 0), (0, 3), (3, 0), (3, 2), (2, 3)}
    assert torch.equal(m, m.T)
    assert not m.diagonal().any()


def test_hard_partner_mask_respects_top_k():
    assert as_set(hard_partner_mask(BATCH, HARD, top_k=1, symmetric=False)) == {(0, 1)}
    assert as_set(hard_partner_mask(BATCH, HARD, top_k=2, symmetric=False)) == {(0, 1)}
    assert as_set(hard_partner_mask(BATCH, HARD, top_k=1, symmetric=True)) == {(0, 1), (1, 0)}
    # default symmetric=True
    assert as_set(hard_partner_mask(BATCH, HARD, top_k=2)) == {(0, 1), (1, 0)}


def test_hard_partner_mask_diagonal_false_even_with_repeated_index():
    m = hard_partner_mask([7, 3], HARD, top_k=3)
    assert as_set(m) == set()


# ---------------------------------------------------------------- HelipLoss

def _clip_batch(b=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    return img, txt, torch.tensor(10.0)


def _reference_clip(img, txt, scale):
    # symmetric InfoNCE, written out
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_helip_loss_is_contrastive_plus_hnml():
    img, txt, scale = _clip_batch()
    mask = mask_of(6, [(0, 1), (1, 0), (2, 5), (5, 2)])
    hnml = HardNegativeMarginLoss(margin=0.5, weight=0.8)
    loss = HelipLoss(ClipLoss(), hnml)
    out = loss(img, txt, scale, mask, output_dict=True)
    assert set(out) == {"contrastive_loss", "hnml_loss"}  # OpenCLIP's contract: weighted terms, no total
    torch.testing.assert_close(out["contrastive_loss"], ClipLoss()(img, txt, scale))
    torch.testing.assert_close(out["contrastive_loss"], _reference_clip(img, txt, scale))
    torch.testing.assert_close(out["hnml_loss"], hnml(img, txt, mask))
    assert out["hnml_loss"].item() > 0
    # without output_dict: the sum, which is also what open_clip_train makes of the dict
    torch.testing.assert_close(loss(img, txt, scale, mask), out["contrastive_loss"] + out["hnml_loss"])
    torch.testing.assert_close(sum(out.values()), out["contrastive_loss"] + out["hnml_loss"])


def test_helip_loss_without_hnml_is_clip_loss():
    img, txt, scale = _clip_batch(seed=1)
    out = HelipLoss(ClipLoss(), None)(img, txt, scale, mask_of(6, [(0, 1)]), output_dict=True)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(HelipLoss(ClipLoss(), None)(img, txt, scale), ClipLoss()(img, txt, scale))
    # HNML configured but no mask for this batch: the contrastive loss alone
    out = HelipLoss(ClipLoss(), HardNegativeMarginLoss())(img, txt, scale, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(HelipLoss(ClipLoss(), HardNegativeMarginLoss())(img, txt, scale),
                               ClipLoss()(img, txt, scale))


def test_helip_loss_backward():
    img, txt, scale = _clip_batch(seed=2)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    HelipLoss(ClipLoss(), HardNegativeMarginLoss(margin=0.5))(img, txt, scale, mask_of(6, [(0, 1), (1, 0)])).backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
