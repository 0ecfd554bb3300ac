"""Subset and ANN modes, resumable chunked runs, and a two-process (gloo) sharded run."""

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from helip.errors import InputError
from helip.mining import load_hard_pairs, mine_hard_pairs
from helip.mining import mine as mine_module
from helip.mining.ann import recall_at_k


def clustered(n=1200, d=16, clusters=30, seed=0):
    """Pairs in clusters, text and image correlated through a shared latent, plus exact duplicates."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(clusters, 8))[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, 8))
    txt = z @ rng.normal(size=(8, d)) + 0.5 * rng.normal(size=(n, d))
    img = z @ rng.normal(size=(8, d)) + 0.5 * rng.normal(size=(n, d))
    txt[1], img[1] = txt[0], img[0]  # a near-duplicate pair
    return img.astype(np.float32), txt.astype(np.float32)


def assert_valid_rows(indices, n):
    for i, row in enumerate(indices):
        valid = row[row >= 0]
        assert i not in valid
        assert len(set(valid.tolist())) == len(valid)
        assert (row[len(valid):] == -1).all(), "padding only at the end"
        assert valid.max(initial=-1) < n


@pytest.mark.parametrize("mode,opts", [("subset", {"candidates": 300, "redraw_every": 250}),
                                       ("ann", {"nprobe": 4})])
def test_approximate_modes_give_valid_deterministic_rows(mode, opts):
    img, txt = clustered()
    a = mine_hard_pairs(img, txt, k=8, mode=mode, progress=False, seed=3, **opts)
    b = mine_hard_pairs(img, txt, k=8, mode=mode, progress=False, seed=3, **opts)
    assert_valid_rows(a.indices, len(img))
    assert (a.indices == b.indices).all()
    assert 0 not in a.indices[1] and 1 not in a.indices[0]  # near-duplicates excluded
    assert "recall_estimate" in a.meta and 0 <= a.meta["recall_estimate"]["recall_at_k"] <= 1


def test_ann_recall_is_high_and_estimate_is_honest():
    img, txt = clustered()
    exact = mine_hard_pairs(img, txt, k=8, progress=False)
    ann = mine_hard_pairs(img, txt, k=8, mode="ann", nprobe=6, progress=False)
    recall = recall_at_k(ann.indices, exact.indices)
    assert recall > 0.9
    assert abs(ann.meta["recall_estimate"]["recall_at_k"] - recall) < 0.1
    # where ANN found the same pair, it scored it exactly as exact mode did
    same = ann.indices == exact.indices
    assert np.allclose(ann.scores[same], exact.scores[same], atol=1e-6)


def test_ann_probing_every_cell_equals_exact_including_ties():
    """With every cell probed, the per-cell top-k lists merged per target must be exact mode's rows."""
    img, txt = clustered(n=400)
    img[7], txt[7] = img[5], txt[5]  # 5 and 7 tie exactly as partners of every other pair (and are duplicates)
    img[9], txt[9] = -img[5], txt[5]  # same caption, other image: a caption-only near-duplicate of 5 and 7
    exact = mine_hard_pairs(img, txt, k=12, progress=False)
    ann = mine_hard_pairs(img, txt, k=12, mode="ann", nlist=10, nprobe=10, progress=False)
    assert (ann.indices == exact.indices).all()
    # the same pairs, scored by matrix products of other shapes: equal up to float32 rounding
    np.testing.assert_allclose(ann.scores, exact.scores, atol=1e-6, rtol=0)
    assert ann.meta["recall_estimate"]["recall_at_k"] == 1.0


def test_ann_merge_across_cells_breaks_ties_by_index():
    """Pairs 1 and 2 tie exactly as target 0's partner but sit in different cells; k=1 must keep 1."""
    from helip.mining.ann import search_ann

    v = torch.tensor([[1.0, 0, 0, 0], [1, 0.5, 0, 0], [1, -0.5, 0, 0], [0.2, 0, 1, 0]])
    v = torch.nn.functional.normalize(v, dim=1)
    probes = np.array([[0, 1], [0, 1], [1, 0], [1, 0]], dtype=np.int32)
    for members in ([np.array([0, 1]), np.array([2, 3])], [np.array([0, 2]), np.array([1, 3])]):
        idx, sc = search_ann(v, v, np.array([0]), 1, "hpm", 0.98, 0.0, 8, {"probes": probes, "members": members})
        assert idx[0, 0] == 1 and sc[0, 0] == pytest.approx(0.8)


@pytest.mark.parametrize("threads", [1, 3])
def test_ann_on_worker_threads_equals_one_thread(threads):
    """The candidate cells are dealt out to torch's thread count of workers, merges under a lock: the same
    result as cell by cell on one thread (small blocks, so cells take several merges each)."""
    from helip.mining.ann import build_cells, group, search_ann

    img, txt = clustered(n=900)
    t = torch.nn.functional.normalize(torch.from_numpy(txt), dim=1)
    i = torch.nn.functional.normalize(torch.from_numpy(img), dim=1)
    cells = build_cells(t, i, "hpm", 20, 5, seed=0)
    cells["members"] = group(cells["probes"][:, 0], 20)
    rows = np.random.default_rng(1).permutation(900)[:700]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = search_ann(t, i, rows, 7, "hpm", 0.98, 0.0, 16, cells)
        torch.set_num_threads(threads)
        got = search_ann(t, i, rows, 7, "hpm", 0.98, 0.0, 16, cells)
        assert torch.get_num_threads() == threads, "the search restores torch's thread count"
    finally:
        torch.set_num_threads(before)
    assert (got[0] == ref[0]).all()
    assert (got[1] == ref[1]).all()


def test_subset_with_full_pool_equals_exact():
    img, txt = clustered(n=300)
    exact = mine_hard_pairs(img, txt, k=5, progress=False)
    sub = mine_hard_pairs(img, txt, k=5, mode="subset", candidates=10_000, progress=False)
    assert (sub.indices == exact.indices).all()


def test_resume_after_kill_gives_identical_files(tmp_path, monkeypatch):
    img, txt = clustered(n=700)
    opts = dict(k=6, mode="ann", nprobe=4, chunk_size=100, progress=False, extra_meta={"fingerprint": {"count": 700}})
    whole = mine_hard_pairs(img, txt, out_dir=tmp_path / "whole", **opts)

    calls = {"n": 0}
    original = mine_module._Run.search

    def dying(self, rows, on_block=lambda n: None, mode=None, **kw):
        if mode is None:
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt("simulated kill")
        return original(self, rows, on_block, mode, **kw)

    monkeypatch.setattr(mine_module._Run, "search", dying)
    with pytest.raises(KeyboardInterrupt):
        mine_hard_pairs(img, txt, out_dir=tmp_path / "resumed", **opts)
    partial = tmp_path / "resumed" / ".partial"
    assert len(list(partial.glob("chunk_*.npz"))) == 3
    assert not (tmp_path / "resumed" / "meta.json").exists(), "an interrupted run must not look complete"
    monkeypatch.setattr(mine_module._Run, "search", original)
    resumed_calls = []
    monkeypatch.setattr(mine_module._Run, "search",
                        lambda self, rows, on_block=lambda n: None, mode=None, **kw:
                        resumed_calls.append(mode) or original(self, rows, on_block, mode, **kw))
    mine_hard_pairs(img, txt, out_dir=tmp_path / "resumed", **opts)
    assert resumed_calls.count(None) == 4, "only the 4 unfinished chunks are searched again"
    assert not partial.exists()
    for name in ("hard_pairs.npy", "hard_scores.npy"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    assert (load_hard_pairs(tmp_path / "resumed").indices == whole.indices).all()


def test_unwritable_output_and_zero_rows(tmp_path):
    img, txt = clustered(n=50)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(InputError, match="cannot write"):
        mine_hard_pairs(img, txt, k=3, out_dir=blocker / "out", progress=False)
    img[7] = 0
    with pytest.raises(InputError, match="row 7"):
        mine_hard_pairs(img, txt, k=3, progress=False)


def _worker(rank, world, init_file, out_dir, mode):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    img, txt = clustered(n=500)
    mine_hard_pairs(img, txt, k=5, mode=mode, nprobe=4, chunk_size=64, out_dir=out_dir, progress=False)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("mode", ["exact", "ann"])
def test_two_process_gloo_run_equals_single_process(tmp_path, mode):
    img, txt = clustered(n=500)
    single = mine_hard_pairs(img, txt, k=5, mode=mode, nprobe=4, chunk_size=64, progress=False)
    out = tmp_path / "sharded"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out), mode), nprocs=2, join=True)
    sharded = load_hard_pairs(out)
    assert sharded.meta["world_size"] == 2
    assert (sharded.indices == single.indices).all()
    # the workers use 1 thread and this process may use 2: GEMMs may round differently in the last bit
    np.testing.assert_allclose(sharded.scores, single.scores, rtol=0, atol=1e-6)
    assert not (out / ".partial").exists()
