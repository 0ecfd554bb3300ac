"""Re-mining during training (--remine-every): the lists follow the model, resume exactly, agree across ranks."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from helip.app.cli import main
from helip.embed import encode_pairs
from helip.errors import ConfigError
from helip.mining import HardPairs, load_hard_pairs, mine_hard_pairs
from helip.models import load_model
from helip.training.remine import Remining, remined_dir
from helip.training import TrainConfig, train
# fixtures and helpers of the training tests (one_thread is autouse there and here)
from test_train import (Killed, _free_port, base_cfg, hard_pairs, kill_after, max_diff, one_thread,  # noqa: F401
                        pairs, tiny, tiny_dropout, weights)


def mined_with(model: str, data, state_dict=None) -> HardPairs:
    """Hard pairs as helip mines them (k=6, exact), with the model train() starts from or a checkpoint's weights."""
    torch.manual_seed(0)  # train() seeds the same way before building the model
    lm = load_model(model)
    if state_dict is not None:
        lm.model.load_state_dict(state_dict)
    img, txt = encode_pairs(lm, data)
    return mine_hard_pairs(img, txt, k=6, progress=False)


def test_remining_follows_the_model_and_resumes_exactly(tmp_path, tiny_dropout, monkeypatch):
    data = pairs()
    hard = mined_with(tiny_dropout, data)
    # 6 steps per epoch: re-mined at the start of epoch 1 (after step 6) and epoch 2 (after step 12)
    cfg = base_cfg(model=tiny_dropout, steps=14, remine_every=1, save_every=3)
    full = train(cfg, data, tmp_path / "full", hard)
    events = json.loads((tmp_path / "full" / "train_config.json").read_text())["remining"]
    assert [(e["epoch"], e["step"]) for e in events] == [(1, 6), (2, 12)]
    assert all(e["seconds"] >= e["embed_seconds"] >= 0 for e in events)
    # the lists of epoch 1 are what mining with the weights after step 6 gives, and they differ from the original
    after6 = weights(tmp_path / "full" / "checkpoints" / "step_00000006.pt")["state_dict"]
    remined = load_hard_pairs(remined_dir(tmp_path / "full", 1))
    assert np.array_equal(remined.indices, mined_with(tiny_dropout, data, after6).indices)
    assert not np.array_equal(remined.indices, hard.indices)
    assert remined.meta["remined_at"] == {"epoch": 1, "step": 6}
    # and they change training: without re-mining the weights differ
    static = train(replace(cfg, remine_every=0, save_every=0), data, tmp_path / "static", hard)
    assert max_diff(weights(full.checkpoint), weights(static.checkpoint)) > 1e-4

    # killed after step 8: resumed from step 6, the checkpoint before the first re-mining, which is redone
    with pytest.raises(Killed):
        train(cfg, data, tmp_path / "a", hard, on_step=kill_after(8))
    a = train(replace(cfg, resume="auto"), data, tmp_path / "a", hard)
    assert a.resumed_from == 6
    assert max_diff(weights(full.checkpoint), weights(a.checkpoint)) <= 1e-6
    # killed after step 10: resumed from step 9, which trained with the epoch-1 lists; they are restored
    with pytest.raises(Killed):
        train(cfg, data, tmp_path / "b", hard, on_step=kill_after(10))
    b = train(replace(cfg, resume="auto"), data, tmp_path / "b", hard)
    assert b.resumed_from == 9
    assert max_diff(weights(full.checkpoint), weights(b.checkpoint)) <= 1e-6
    resumed_events = json.loads((tmp_path / "b" / "train_config.json").read_text())["remining"]
    assert [(e["epoch"], e["step"]) for e in resumed_events] == [(1, 6), (2, 12)]
    # negative control: resuming from step 9 with the original lists instead would not reproduce the run
    monkeypatch.setattr(Remining, "load_state_dict", lambda self, state, n: None)
    c = train(replace(cfg, resume=str(tmp_path / "b" / "checkpoints" / "step_00000009.pt")), data,
              tmp_path / "b", hard)
    assert max_diff(weights(full.checkpoint), weights(c.checkpoint)) > 1e-4


def test_remining_needs_hard_pairs_mined_by_helip(tmp_path, tiny, capsys):
    data = pairs()
    with pytest.raises(ConfigError, match="needs hard pairs"):
        train(base_cfg(model=tiny, remine_every=1), data, tmp_path / "a", None)
    with pytest.raises(ConfigError, match="needs hard pairs"):
        train(base_cfg(model=tiny, remine_every=1, hard_per_target=0), data, tmp_path / "b", mined_with(tiny, data))
    with pytest.raises(ConfigError, match="meta.json lacks"):  # no mining options recorded
        train(base_cfg(model=tiny, remine_every=1), data, tmp_path / "c", hard_pairs())
    with pytest.raises(ConfigError, match="remine_every"):
        TrainConfig(remine_every=-1).validate()
    with pytest.raises(ConfigError, match="hard_temperature"):
        TrainConfig(hard_temperature=-0.1).validate()
    assert main(["train", "--data", "world", "--model", "helip-tiny-vit", "--n-train", "64", "--out",
                 str(tmp_path / "cli"), "--batch-size", "32",
                 "--remine-every", "1"]) == 2
    assert "--remine-every" in capsys.readouterr().err


def _ddp_worker(rank: int, world: int, port: int, out: str, model: str, hard: HardPairs) -> None:
    import os

    import torch.distributed as dist

    from helip.sampler import HardPairBatchSampler

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    used = []
    original = HardPairBatchSampler.set_hard_pairs

    def recording(self, indices, scores=None):
        used.append(np.array(indices))
        original(self, indices, scores)

    HardPairBatchSampler.set_hard_pairs = recording
    # 24 targets per rank, 4 per batch: 6 steps per epoch, re-mined once, after step 6
    train(base_cfg(model=model, steps=8, batch_size=8, save_every=6, remine_every=1), pairs(), Path(out), hard)
    np.save(Path(out) / f"lists_rank{rank}.npy", np.stack(used))
    dist.destroy_process_group()


def test_two_process_gloo_run_remines_the_same_lists_on_every_rank(tmp_path, tiny):
    data = pairs()
    hard = mined_with(tiny, data)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path), tiny, hard), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (np.load(tmp_path / f"lists_rank{r}.npy") for r in range(2))
    assert len(r0) == 2  # the original lists, then the re-mined ones
    assert np.array_equal(r0, r1)
    assert np.array_equal(r0[0], hard.indices) and not np.array_equal(r0[1], hard.indices)
    # what each rank encoded and gathered is the whole dataset in order: one process mining with the
    # weights after step 6 finds the same lists
    after6 = weights(tmp_path / "checkpoints" / "step_00000006.pt")["state_dict"]
    assert np.array_equal(r0[1], mined_with(tiny, data, after6).indices)
    assert np.array_equal(r0[1], load_hard_pairs(remined_dir(tmp_path, 1)).indices)


@pytest.mark.parametrize("options", [{"mode": "exact", "method": "text", "k": 5},
                                     {"mode": "subset", "candidates": 50, "redraw_every": 30, "seed": 3, "k": 4},
                                     {"mode": "ann", "nlist": 6, "nprobe": 2, "k": 4, "min_similarity": -1.0}])
def test_the_options_read_back_from_meta_mine_the_same_lists(options):
    from helip.training.remine import mine_config_from_meta

    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((120, 8)), rng.standard_normal((120, 8))
    first = mine_hard_pairs(img, txt, progress=False, **options)
    again = mine_hard_pairs(img, txt, mine_config_from_meta(first.meta))
    assert np.array_equal(first.indices, again.indices)
    # a different option would change them: the comparison can fail
    other = mine_hard_pairs(img, txt, mine_config_from_meta(first.meta), k=first.k, method="image")
    assert not np.array_equal(first.indices, other.indices)
