"""The SLIP objective: SimCLR loss values, gathering across ranks, augmentation, SLIP+HELIP training and demo."""
import json
import math

import pytest
import torch
import torch.multiprocessing as mp
from slip_gather_worker import gather_worker

from helip.augment import SlipAugment
from helip.app.cli import main
from helip.losses import HardNegativeMarginLoss, HelipLoss, SimCLRLoss, SlipLoss
from helip.slip import HEAD_FILE, SlipConfig, build_slip_training, load_head


def test_simclr_loss_equals_hand_computed_value():
    # two images, two views each; view b of image 1 is already unit length, view a is scaled to test normalisation
    q_a = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    q_b = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = 0.5
    e = math.exp
    # view a of image i must pick b_i among {b_0, b_1, a_other}; cosines: a0.b0=1, a0.b1=.6, a0.a1=0,
    # a1.b0=0, a1.b1=.8; b0.b1=.6
    la0 = -math.log(e(1 / t) / (e(1 / t) + e(.6 / t) + e(0)))
    la1 = -math.log(e(.8 / t) / (e(0) + e(.8 / t) + e(0)))
    lb0 = -math.log(e(1 / t) / (e(1 / t) + e(0) + e(.6 / t)))
    lb1 = -math.log(e(.8 / t) / (e(.6 / t) + e(.8 / t) + e(.6 / t)))
    expected = ((la0 + la1) / 2 + (lb0 + lb1) / 2) / 2
    assert SimCLRLoss(temperature=t)(q_a, q_b).item() == pytest.approx(expected, abs=1e-6)
    # SLIP's default temperature, and the composition with CLIP loss + HNML
    assert SimCLRLoss().temperature == 0.1
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = True
    helip = HelipLoss(hnml=HardNegativeMarginLoss(0.2, 1.0))
    base = helip(img, txt, torch.tensor(10.0), mask)
    slip = SlipLoss(helip, SimCLRLoss(t), ssl_scale=0.5)
    out = slip(img, txt, torch.tensor(10.0), mask, q_a.repeat(2, 1), q_b.repeat(2, 1), output_dict=True)
    assert set(out) == {"contrastive_loss", "hnml_loss", "ssl_loss"}  # weighted terms, as OpenCLIP's losses
    assert out["ssl_loss"].item() == pytest.approx(0.5 * SimCLRLoss(t)(q_a.repeat(2, 1), q_b.repeat(2, 1)).item())
    total = slip(img, txt, torch.tensor(10.0), mask, q_a.repeat(2, 1), q_b.repeat(2, 1))
    assert total.item() == pytest.approx((base + out["ssl_loss"]).item(), abs=1e-6)


def test_simclr_loss_gathers_across_ranks(tmp_path):
    """Two gloo ranks with half the batch each give the single-process loss and gradients."""
    world = 2
    mp.spawn(gather_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "r")), nprocs=world, join=True)
    ranks = [torch.load(f"{tmp_path / 'r'}.{r}") for r in range(world)]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 5, generator=g).requires_grad_()
    b = torch.randn(8, 5, generator=g).requires_grad_()
    single = SimCLRLoss(0.2)(a, b)
    single.backward()
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(single.item(), abs=1e-6)
    # each rank's loss is its share; gradients through the gathered keys make rank grads world x the global ones
    assert torch.allclose(torch.cat([r["ga"] for r in ranks]) / world, a.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["gb"] for r in ranks]) / world, b.grad, atol=1e-6)


def test_slip_augment_makes_independent_normalised_views():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    aug = SlipAugment((32, 32), mean, std)
    raw = torch.rand(6, 3, 32, 32)
    x = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.manual_seed(0)
    v1, v2 = aug(x), aug(x)
    assert v1.shape == x.shape and not torch.equal(v1, v2) and not torch.equal(v1, x)
    # in range after undoing the normalisation: pixels stay in [0, 1]
    back = v1 * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5
    # one draw per image, not one per batch: identical inputs get different views
    same = aug(x[:1].repeat(4, 1, 1, 1))
    assert len({tuple(v.flatten()[:50].tolist()) for v in same}) == 4
    torch.manual_seed(0)
    assert torch.equal(aug(x), v1)   # seeded: reproducible


@pytest.fixture(scope="module")
def slip_demo(tmp_path_factory, monkeypatch_module):
    """`helip demo --objective slip` on a demo smaller than --quick (shared: it is this file's slowest step)."""
    from dataclasses import replace

    from helip.app import demo

    def tiny(cls):
        c = cls(n_train=256, n_val=64, n_test=64, n_probe_train=128)
        c.pretrain = replace(c.pretrain, steps=3, batch_size=32, warmup_steps=1, log_every=1)
        c.continued = replace(c.continued, steps=2, batch_size=32, warmup_steps=1, top_k=8, log_every=1)
        c.mine = replace(c.mine, k=8)
        c.progress = False
        return c

    monkeypatch_module.setattr(demo.DemoConfig, "quick", classmethod(tiny))
    out, cache = tmp_path_factory.mktemp("slip_demo"), tmp_path_factory.mktemp("slip_cache")
    assert main(["demo", "--quick", "--objective", "slip", "--out", str(out), "--cache-dir", str(cache)]) == 0
    return out, cache


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp_ = pytest.MonkeyPatch()
    yield mp_
    mp_.undo()


def test_demo_runs_with_slip_objective(slip_demo):
    out, cache = slip_demo
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["objective"] == "slip"
    assert results["meta"]["continued_training"]["objective"] == "slip"
    for v in ("pretrained", "baseline", "helip"):
        assert 0 <= results[v]["zeroshot_mean"] <= 1
    last = json.loads((out / "helip" / "train_log.jsonl").read_text().splitlines()[-1])
    assert {"contrastive", "hnml", "ssl"} <= set(last)
    assert (out / "helip" / HEAD_FILE).is_file() and (out / "baseline" / HEAD_FILE).is_file()
    heads = list(cache.glob(f"pretrain-*/{HEAD_FILE}"))
    assert len(heads) == 1   # the starting model was SLIP-pretrained, and its head went on to continued training
    assert (load_head(heads[0]).mlp_dim, load_head(out / "helip" / HEAD_FILE).mlp_dim) == (256, 256)


def test_slip_training_with_helip_from_the_cli(slip_demo, tmp_path, capsys):
    out, cache = slip_demo
    world = ["--n-train", "256"]   # the demo's training split, so its hard pairs fit
    slip = ["--objective", "slip", "--simclr-mlp-dim", "32", "--simclr-out-dim", "16", "--ssl-scale", "0.5"]
    run = tmp_path / "slip"
    assert main(["train", "--data", "world", "--model", "helip-tiny-vit", *world, "--out", str(run), "--steps", "3",
                 "--batch-size", "32", "--top-k", "8",
                 "--hard-pairs", str(out / "hard_pairs"), *slip]) == 0
    logs = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    last = logs[-1]
    assert last["step"] == 3 and {"contrastive", "hnml", "ssl"} <= set(last) and last["partners_per_sample"] > 0
    assert last["total"] == pytest.approx(last["contrastive"] + last["hnml"] + last["ssl"], abs=1e-4)  # ssl weighted
    cfg = json.loads((run / "train_config.json").read_text())
    assert cfg["objective"] == "slip" and cfg["slip"]["ssl_scale"] == 0.5
    head = load_head(run / HEAD_FILE)
    assert (head.in_dim, head.mlp_dim, head.out_dim) == (64, 32, 16)   # no --pretrained: a fresh head
    import open_clip
    open_clip.create_model("helip-tiny-vit", pretrained=str(run / "model.pt"))   # the CLIP part: stock OpenCLIP

    # continuing from a SLIP run picks up the head beside --pretrained
    from helip.models import load_model
    lm = load_model("helip-tiny-vit", str(run / "model.pt"))
    model, _ = build_slip_training(lm.model, HelipLoss(), SlipConfig(), str(run / "model.pt"))
    assert all(torch.equal(a, b) for a, b in zip(model.head.state_dict().values(), head.state_dict().values()))

    # bad SLIP options: one line, exit 2
    capsys.readouterr()
    assert main(["train", "--data", "world", "--model", "helip-tiny-vit", *world, "--out", str(tmp_path / "bad"),
                 "--steps", "1", *slip,
                 "--ssl-temperature", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ssl_temperature must be positive" in err and "\n" not in err
    assert main(["train", "--data", "world", "--model", "helip-tiny-vit", *world, "--out", str(tmp_path / "bad"),
                 "--steps", "1", "--objective", "slip",
                 "--slip-head", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
