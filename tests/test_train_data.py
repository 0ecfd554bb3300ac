"""`helip train --data` on real-data formats: embed -> mine -> train end to end, unusable pairs never sampled."""
import json

import numpy as np
import pytest
import torch

from helip.app.cli import main
from helip.data.sources import PairDataset, open_pairs
from helip.data.training import restrict_hard_pairs
from helip.mining import load_hard_pairs
from helip.sampler import HardPairBatchSampler

from test_sources import write_dataset

EMPTY, CORRUPT = 3, 11  # the unusable pairs of the dataset below


def _captions(n):
    colours, shapes = ["red", "blue", "green", "yellow"], ["circle", "square", "star", "cross", "ring"]
    return [f"a {colours[i % 4]} {shapes[(i // 4) % 5]} number {i}" for i in range(n)]


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    """A 24-pair CSV with an empty caption and a corrupt image, embedded and mined through the CLI."""
    tmp = tmp_path_factory.mktemp("traindata")
    caps = _captions(24)
    caps[EMPTY] = "  "
    root = write_dataset(tmp / "d", captions=caps, shards=1, corrupt={CORRUPT})
    csv = str(root / "pairs.csv")
    torch.manual_seed(0)  # the randomly initialised model's embeddings, whatever ran before
    assert main(["embed", "--model", "helip-tiny-vit", "--data", csv, "--out", str(tmp / "emb"), "--batch-size", "8",
                 "--max-bad-fraction", "0.2", "--no-progress"]) == 0
    assert main(["mine", "--embeddings", str(tmp / "emb"), "--out", str(tmp / "hp"), "--k", "4",
                 "--min-similarity", "-1", "--dup-threshold", "1"]) == 0  # full rows (random model)
    return tmp, root, csv


def test_train_on_a_csv_with_hard_pairs_never_samples_unusable_pairs(mined, monkeypatch, capsys):
    tmp, root, csv = mined
    read = []
    orig = PairDataset.__getitem__

    def spy(self, i):  # workers=0: every pair the loop reads comes through here, in this process
        read.append(int(i))
        return orig(self, i)

    monkeypatch.setattr(PairDataset, "__getitem__", spy)
    out = tmp / "run"
    assert main(["train", "--model", "helip-tiny-vit", "--data", csv, "--hard-pairs", str(tmp / "hp"), "--out",
                 str(out), "--steps", "3",
                 "--batch-size", "8", "--hard-per-target", "1", "--top-k", "4", "--warmup-steps", "1",
                 "--log-every", "1", "--max-bad-fraction", "0.2"]) == 0
    assert "wrote" in capsys.readouterr().out and (out / "model.pt").is_file()
    assert len(read) == 3 * 8 and not {EMPTY, CORRUPT} & set(read)  # neither as target, partner nor fill
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["hard_pairs_meta"]["restricted_to_usable"] == {"n_dataset": 24, "n_usable": 22}
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["total"]) for r in log)
    assert all(r["partners_per_sample"] > 0 for r in log)  # the hard pairs reached HNML in compact indices


def test_restricted_hard_pairs_keep_partners_and_every_sampler_draw_is_usable(mined):
    tmp, _, csv = mined
    hard = load_hard_pairs(tmp / "hp", open_pairs(csv).fingerprint())
    assert (hard.indices[[EMPTY, CORRUPT]] == -1).all()  # mined without them (skipped.json)
    assert (np.delete(hard.indices, [EMPTY, CORRUPT], axis=0) >= 0).all()
    usable = np.setdiff1d(np.arange(24), [EMPTY, CORRUPT])
    r = restrict_hard_pairs(hard, usable)
    assert r.indices.shape == (22, 4)
    back = np.where(r.indices >= 0, usable[np.maximum(r.indices, 0)], -1)
    assert np.array_equal(back, hard.indices[usable])  # the same partners, renumbered
    # an entry naming an unusable pair is dropped and the row's later entries move up, order kept
    hard.indices = hard.indices.copy()
    hard.indices[0, :3] = [CORRUPT, 5, 7]
    assert restrict_hard_pairs(hard, usable).indices[0, :2].tolist() == [4, 6]
    s = HardPairBatchSampler(r.indices, 8, hard_per_target=2, top_k=4, num_samples=22)
    for epoch in range(5):
        s.set_epoch(epoch)
        drawn = np.concatenate([usable[b] for b in s])
        assert not {EMPTY, CORRUPT} & set(drawn.tolist())


def test_hard_pairs_of_another_dataset_exit_2_with_one_line(mined, tmp_path, capsys):
    tmp, _, _ = mined
    other = write_dataset(tmp_path / "other", captions=_captions(24)[::-1], shards=1)
    rc = main(["train", "--model", "helip-tiny-vit", "--data", str(other / "pairs.jsonl"), "--hard-pairs",
               str(tmp / "hp"),
               "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "8"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "another dataset" in err and "helip embed" in err
    assert not (tmp_path / "run" / "model.pt").exists()
