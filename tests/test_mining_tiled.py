"""The CPU's tiled exact search (tiled.py) with tiles far smaller than the data, so that every path runs:
several target blocks, column offers across blocks, seeded bounds, dense first sights, resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helip.mining import load_hard_pairs, mine_hard_pairs
from helip.mining import tiled
from helip.mining.exact import search_exact

from test_mining import K, _tied_embeddings, assert_no_borderline, brute_force, check_against_reference, \
    make_embeddings
from test_mining_modes import clustered


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 7 x 11 (not multiples of each other or of N) and seed cells of ~25 pairs."""
    monkeypatch.setattr(tiled, "TILE_ROWS", 7)
    monkeypatch.setattr(tiled, "TILE_COLS", 11)
    monkeypatch.setattr(tiled, "SEED_CELL_SIZE", 25)


@pytest.mark.parametrize("method", ["hpm", "text", "image"])
def test_symmetric_tiled_run_matches_brute_force(method, small_tiles):
    img, txt = make_embeddings()
    ref_idx, ref_scores, ct, ci, score = brute_force(img, txt, K, method)
    assert_no_borderline(ct, ci, score, ref_idx, 0.98, 0.0, K)
    hp = mine_hard_pairs(img, txt, k=K, method=method, progress=False)
    check_against_reference(hp, ref_idx, ref_scores, K)


@pytest.mark.parametrize("method", ["hpm", "text", "image"])
def test_tiled_ties_are_broken_by_index(method, small_tiles):
    img, txt = _tied_embeddings()
    ref_idx, *_ = brute_force(img, txt, 6, method)
    hp = mine_hard_pairs(img, txt, k=6, method=method, progress=False)
    for i, top in enumerate(ref_idx):
        assert hp.indices[i, :len(top)].tolist() == top, f"row {i}"


@pytest.fixture(params=[1, 3])
def workers(request):
    """torch's thread count, which sets the number of tile worker threads (3: tiles dealt out unevenly)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("min_similarity", [0.0, -1.0])
def test_tiled_searches_equal_the_block_search(small_tiles, min_similarity, workers):
    """Symmetric (all targets) and per-row (any targets, as the recall sample and torchrun shards use)
    against exact.search_exact, on clustered data with duplicates; the seeded floors must be in use.
    With one worker thread and with several (row offers merged under the lock)."""
    img, txt = clustered(n=400)
    t = torch.nn.functional.normalize(torch.from_numpy(txt), dim=1)
    i = torch.nn.functional.normalize(torch.from_numpy(img), dim=1)
    rules = ("hpm", 0.98, min_similarity)
    ref_i, ref_s = search_exact(t, i, np.arange(400), 8, *rules, 64)
    sym = tiled.SymmetricSearch(t, i, 8, *rules)
    sym.advance(400)
    assert torch.isfinite(sym.top.floor).float().mean() > 0.9
    assert (sym.top.floor <= torch.from_numpy(ref_s[:, -1])).all(), "a floor above the final k-th loses pairs"
    rows = np.random.default_rng(0).choice(400, 37, replace=False)
    for (got_i, got_s), want in ((sym.result(slice(0, 400)), slice(None)),
                                 (tiled.search_rows(t, i, rows, 8, *rules), rows)):
        assert (got_i == ref_i[want]).all()
        np.testing.assert_allclose(got_s, ref_s[want], atol=1e-6, rtol=0)
    assert torch.get_num_threads() == workers, "the search restores torch's thread count"


def test_symmetric_run_resumes_after_a_kill(tmp_path, monkeypatch, small_tiles):
    img, txt = clustered(n=300)
    opts = dict(k=6, chunk_size=70, progress=False)
    whole = mine_hard_pairs(img, txt, out_dir=tmp_path / "whole", **opts)
    calls = []
    original = tiled.SymmetricSearch.advance

    def dying(self, stop, on_block=lambda n: None):
        calls.append((self.done, stop))
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, stop, on_block)

    monkeypatch.setattr(tiled.SymmetricSearch, "advance", dying)
    with pytest.raises(KeyboardInterrupt):
        mine_hard_pairs(img, txt, out_dir=tmp_path / "resumed", **opts)
    partial = tmp_path / "resumed" / ".partial"
    assert len(list(partial.glob("chunk_*.npz"))) == 2 and (partial / "symmetric_state.npz").is_file()
    assert not (tmp_path / "resumed" / "meta.json").exists()
    calls.clear()

    def counting(self, stop, on_block=lambda n: None):
        calls.append((self.done, stop))
        return original(self, stop, on_block)

    monkeypatch.setattr(tiled.SymmetricSearch, "advance", counting)
    mine_hard_pairs(img, txt, out_dir=tmp_path / "resumed", **opts)
    assert calls[0] == (140, 210), "the resumed run continues after the two saved chunks"
    assert not partial.exists()
    for name in ("hard_pairs.npy", "hard_scores.npy"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    assert (load_hard_pairs(tmp_path / "resumed").indices == whole.indices).all()
