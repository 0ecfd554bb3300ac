"""helip train at scale: exact kill-and-resume, two-process gloo DDP, accumulation, freezing, checkpoints, CLI."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.multiprocessing as mp

from helip.app.cli import main
from helip.errors import ConfigError
from helip.mining.store import HardPairs
from helip.models import CONFIG_DIR
from helip.sampler import HardPairBatchSampler
from helip.data.indexed import TensorPairs
from helip.training import Trainer, TrainConfig, list_checkpoints, train
from helip.training.checkpoint import check_compatible as _check_compatible

N = 48  # 6 batches of 16 (8 targets + 8 partners) per epoch: the 7-step runs below cross an epoch


def pairs(n: int = N, seed: int = 0) -> TensorPairs:
    g = torch.Generator().manual_seed(seed)
    return TensorPairs(torch.randn(n, 3, 32, 32, generator=g), torch.randint(1, VOCAB, (n, 32), generator=g))


def hard_pairs(n: int = N, k: int = 6, seed: int = 0) -> HardPairs:
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.permutation(np.delete(np.arange(n), i))[:k] for i in range(n)]).astype(np.int32)
    return HardPairs(idx, np.ones_like(idx, dtype=np.float32), {"fingerprint": {"count": n}})


VOCAB = 1000


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, which on a shared,
    oversubscribed CPU costs 5-15x the run time. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _test_config(tmp_path_factory, name: str, patch_dropout: float) -> str:
    cfg = json.loads((CONFIG_DIR / "helip-tiny-vit.json").read_text())
    cfg["vision_cfg"]["patch_dropout"] = patch_dropout
    cfg["text_cfg"]["vocab_size"] = VOCAB
    path = tmp_path_factory.mktemp("cfg") / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """helip-tiny-vit with a 1000-token vocabulary: the synthetic captions use no more, and most of the
    tiny model's weights and optimiser time are its 49k-token embedding. A JSON config path, as users may pass."""
    return _test_config(tmp_path_factory, "helip-test-tiny", 0.0)


@pytest.fixture(scope="module")
def tiny_dropout(tmp_path_factory) -> str:
    """The same with patch dropout, so that exact resume also depends on reseeding the random ops."""
    return _test_config(tmp_path_factory, "helip-test-tiny-dropout", 0.25)


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


class Killed(Exception):
    pass


def kill_after(step: int):
    def hook(s):
        if s == step:
            raise Killed
    return hook


def base_cfg(**kw) -> TrainConfig:
    c = TrainConfig(steps=7, batch_size=16, lr=2e-3, warmup_steps=2, top_k=6, log_every=1, progress=False)
    return replace(c, **kw)


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_dropout):
    data, hard = pairs(), hard_pairs()
    cfg = base_cfg(model=tiny_dropout, save_every=3)
    full = train(cfg, data, tmp_path / "full", hard)
    # killed after step 5: the last checkpoint is step 3, steps 4-5 are lost and redone, step 7 starts epoch 1
    with pytest.raises(Killed):
        train(cfg, data, tmp_path / "run", hard, on_step=kill_after(5))
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [3]
    assert not (tmp_path / "run" / "model.pt").exists()
    # a save killed mid-write leaves only a temporary file, which resume ignores
    (tmp_path / "run" / "checkpoints" / ".step_00000006.pt.x.tmp").write_bytes(b"partial")
    resumed = train(replace(cfg, resume="auto"), data, tmp_path / "run", hard)
    assert resumed.resumed_from == 3
    assert max_diff(weights(full.checkpoint), weights(resumed.checkpoint)) <= 1e-6
    # a second kill right after a checkpoint, resumed from the periodic one, equal too
    with pytest.raises(Killed):
        train(cfg, data, tmp_path / "run2", hard, on_step=kill_after(6))
    again = train(replace(cfg, resume="auto"), data, tmp_path / "run2", hard)
    assert again.resumed_from == 6
    assert max_diff(weights(full.checkpoint), weights(again.checkpoint)) <= 1e-6
    # the log reads as one run: each step once, in order, with throughput
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 8))
    assert [r["total"] for r in log] == pytest.approx([r["total"] for r in full.history], abs=1e-6)
    assert all(r["samples_per_second"] > 0 and "hnml" in r for r in log)


def test_resume_without_reseeding_would_differ(tmp_path, tiny_dropout, monkeypatch):
    """Negative control: the dropout model's weights depend on the random stream the loop reseeds."""
    data, hard = pairs(), hard_pairs()
    cfg = base_cfg(model=tiny_dropout, steps=2)
    a = train(cfg, data, tmp_path / "a", hard)
    monkeypatch.setattr(Trainer, "_seed", lambda self, step, micro: torch.manual_seed(1234 + step))
    b = train(cfg, data, tmp_path / "b", hard)
    assert max_diff(weights(a.checkpoint), weights(b.checkpoint)) > 1e-4


def test_checkpoints_hold_the_training_state_and_load_in_stock_open_clip(tmp_path, tiny):
    res = train(base_cfg(model=tiny, steps=4, save_every=2), pairs(), tmp_path, hard_pairs())
    found = list_checkpoints(tmp_path)
    assert [s for s, _ in found] == [2, 4]
    state = torch.load(found[-1][1], map_location="cpu", weights_only=True)
    assert {"state_dict", "optimizer", "scaler", "step", "sampler_epoch", "rng", "config"} <= set(state)
    assert state["step"] == 4 and state["sampler_epoch"] == 0  # 6 steps per epoch
    stock = open_clip.create_model("helip-test-tiny", pretrained=str(found[-1][1]))
    assert max_diff(stock.state_dict(), weights(res.checkpoint)) == 0.0
    assert not list(tmp_path.rglob("*.tmp"))


def test_interpolate_writes_the_midpoint_of_start_and_trained_and_survives_a_resume(tmp_path, tiny):
    start = tmp_path / "start.pt"
    torch.save(open_clip.create_model("helip-test-tiny").state_dict(), start)
    full = train(base_cfg(model=tiny, pretrained=str(start), steps=4), pairs(), tmp_path / "full", hard_pairs())
    trained, s0 = weights(full.checkpoint), weights(start)
    assert max_diff(trained, s0) > 1e-3  # training moved the weights, so the midpoint is a real test
    cfg = base_cfg(model=tiny, pretrained=str(start), steps=4, save_every=2, interpolate=0.5)
    with pytest.raises(Killed):
        train(cfg, pairs(), tmp_path / "wise", hard_pairs(), on_step=kill_after(2))
    res = train(replace(cfg, resume="auto"), pairs(), tmp_path / "wise", hard_pairs())
    mid = {k: (s0[k] + trained[k]) / 2 if v.is_floating_point() else v for k, v in trained.items()}
    assert max_diff(weights(res.checkpoint), mid) < 1e-6  # the start is the loaded weights, not the resumed ones
    assert max_diff(res.model.state_dict(), mid) < 1e-6
    last = torch.load(list_checkpoints(tmp_path / "wise")[-1][1], map_location="cpu", weights_only=True)
    assert max_diff(last["state_dict"], trained) < 1e-6  # the resumable checkpoint keeps the trained weights
    with pytest.raises(ConfigError, match="interpolate must be in"):
        base_cfg(interpolate=0.0).validate()


def test_resume_with_other_options_is_refused(tmp_path, tiny):
    train(base_cfg(model=tiny, steps=2), pairs(), tmp_path, hard_pairs())
    with pytest.raises(ConfigError, match="batch_size: 16 -> 24"):
        train(base_cfg(model=tiny, steps=2, batch_size=24, resume="auto"), pairs(), tmp_path, hard_pairs())


def test_a_checkpoint_from_before_the_temperature_mode_resumes_in_score_units():
    """Checkpoints written before hard_temperature_mode existed drew in score units: resuming them relative is
    refused."""
    from dataclasses import asdict

    def saved(**kw):
        config = asdict(TrainConfig(**kw))
        del config["hard_temperature_mode"]
        return {"config": config}

    absolute = TrainConfig(hard_temperature=0.01, hard_temperature_mode="absolute")
    _check_compatible(saved(hard_temperature=0.01), absolute, {}, Path("old.pt"))
    with pytest.raises(ConfigError, match="hard_temperature_mode: 'absolute' -> 'relative'"):
        _check_compatible(saved(hard_temperature=0.01), TrainConfig(hard_temperature=0.01), {}, Path("old.pt"))
    # a uniform draw (temperature 0) has no units: either mode resumes it
    _check_compatible(saved(hard_temperature=0.0), TrainConfig(hard_temperature=0.0), {}, Path("old.pt"))
    with pytest.raises(ConfigError, match="hard_temperature_mode"):
        TrainConfig(hard_temperature_mode="kelvin").validate()


def test_feature_caching_accumulation_equals_one_big_batch(tiny):
    """Two micro-batches of 8 with accumulation give the step of one batch of 16, HNML included."""
    data, hard = pairs(), hard_pairs()
    idx = torch.arange(16)
    images, tokens = data.gather(idx.tolist())
    results = []
    for micro in ([(idx, images, tokens)], [(idx[:8], images[:8], tokens[:8]), (idx[8:], images[8:], tokens[8:])]):
        torch.manual_seed(0)
        model = open_clip.create_model("helip-test-tiny")
        cfg = base_cfg(model=tiny, accum_steps=len(micro))
        trainer = Trainer(model, cfg, "cpu", hard_indices=hard.indices)
        out = trainer.step(micro, 0)
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (one, g1), (two, g2) = results
    assert float(one["hnml"]) > 0 and float(one["hnml"]) == pytest.approx(float(two["hnml"]), abs=1e-6)
    assert float(one["contrastive"]) == pytest.approx(float(two["contrastive"]), abs=1e-6)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for name in g1:  # the same gradients, up to float summation order
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-7, msg=name)


def test_accumulation_in_the_loop_uses_accum_steps_micro_batches(tmp_path, tiny):
    seen = []

    class Recording(TensorPairs):
        def gather(self, indices):
            seen.append(list(indices))
            return super().gather(indices)

    data = pairs()
    rec = Recording(data.images, data.tokens)
    # plain batches: 2 micro-batches of 8 per step equal batches of 16, so the runs match
    big = train(base_cfg(model=tiny, steps=3, batch_size=16, hard_per_target=0), data, tmp_path / "big")
    small = train(base_cfg(model=tiny, steps=3, batch_size=8, accum_steps=2, hard_per_target=0), rec,
                  tmp_path / "small")
    assert len(seen) == 6 and all(len(b) == 8 for b in seen)
    # the losses see 16 samples per step (micro-batch-local losses would be near log(8), not log(16))
    assert [r["contrastive"] for r in small.history] == pytest.approx([r["contrastive"] for r in big.history],
                                                                        abs=1e-5)
    # Adam magnifies float-summation noise in near-zero gradients: equal up to a small fraction of a step
    assert max_diff(weights(big.checkpoint), weights(small.checkpoint)) < 1e-4


@pytest.mark.parametrize("tower", ["image", "text"])
def test_freeze_keeps_that_tower_unchanged(tmp_path, tower, tiny):
    torch.manual_seed(0)
    start = tmp_path / "start.pt"
    torch.save(open_clip.create_model("helip-test-tiny").state_dict(), start)
    cfg = base_cfg(model=tiny, steps=2, pretrained=str(start), freeze=tower)
    res = train(cfg, pairs(), tmp_path / "out", hard_pairs())
    before, after = weights(start), weights(res.checkpoint)
    is_image = {k: k.startswith("visual.") for k in before}
    frozen = [k for k in before if is_image[k] == (tower == "image") and k != "logit_scale"]
    trained = [k for k in before if is_image[k] != (tower == "image") and k != "logit_scale"]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, tiny: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    seen = []

    class Recording(TensorPairs):
        def gather(self, indices):
            seen.append([int(i) for i in indices])
            return super().gather(indices)

    data = pairs()
    res = train(base_cfg(model=tiny, steps=7, batch_size=8, save_every=3), Recording(data.images, data.tokens),
                Path(out), hard_pairs())
    torch.save({"batches": seen, "weights": res.model.state_dict()}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_process_gloo_run_follows_the_sampler_partition(tmp_path, tiny):
    # fork: the workers inherit the imports (spawn would re-import torch and open_clip in each)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path), tiny), nprocs=2, join=True,
                       start_method="fork")
    hard = hard_pairs()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)["batches"]
        sampler = HardPairBatchSampler(hard.indices, 8, 1, 6, num_replicas=2, rank=rank, seed=0, drop_last=True)
        expected = []
        for epoch in range(2):  # 24 targets per rank, 4 per batch: 6 batches per epoch, 7 steps cross one
            sampler.set_epoch(epoch)
            expected += list(sampler)
        assert got == expected[:7]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert max_diff(r0["weights"], r1["weights"]) == 0.0  # DDP kept the replicas equal
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 6, 7] and (tmp_path / "model.pt").is_file()
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 8)) and all("hnml" in r for r in log)
    assert max_diff(r0["weights"], weights(tmp_path / "model.pt")) == 0.0


def test_cli_train_refuses_a_used_out_dir_and_resumes(tmp_path, capsys):
    args = ["train", "--data", "world", "--model", "helip-tiny-vit", "--n-train", "64", "--out", str(tmp_path),
            "--batch-size", "32", "--warmup-steps", "1",
            "--save-every", "1", "--precision", "bf16"]
    assert main([*args, "--steps", "1"]) == 0
    assert main([*args, "--steps", "1"]) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert main([*args, "--steps", "1", "--resume", "auto"]) == 0
    assert "resumed from step 1" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "train_config.json").read_text())
    assert cfg["precision_used"] == "fp32" and cfg["resumed_from_step"] == 1
    assert main(["train", "--data", "world", "--model", "helip-tiny-vit", "--n-train", "64", "--out",
                 str(tmp_path / "x"), "--accum-steps", "0"]) == 2
    assert "accum_steps must be at least 1" in capsys.readouterr().err


def test_cli_tensorboard_without_the_package_is_one_clear_error(tmp_path, capsys):
    try:
        import torch.utils.tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    assert main(["train", "--data", "world", "--model", "helip-tiny-vit", "--n-train", "64", "--out", str(tmp_path),
                 "--steps", "1", "--batch-size", "32",
                 "--tensorboard"]) == 2
    assert "pip install tensorboard" in capsys.readouterr().err


def test_any_pair_dataset_through_dataloader_workers_trains_the_same(tmp_path, tiny):
    """The loop's contract with the dataset formats: a map-style Dataset of (image, tokens), read by workers."""

    class PerItem(torch.utils.data.Dataset):  # no batched gather: the generic path
        def __init__(self, p):
            self.p = p

        def __len__(self):
            return len(self.p)

        def __getitem__(self, i):
            return self.p.images[i], self.p.tokens[i]

    data, hard = pairs(), hard_pairs()
    ref = train(base_cfg(model=tiny, steps=3), data, tmp_path / "a", hard)
    other = train(base_cfg(model=tiny, steps=3, workers=2), PerItem(data), tmp_path / "b", hard)
    assert max_diff(weights(ref.checkpoint), weights(other.checkpoint)) == 0.0
