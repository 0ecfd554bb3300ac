"""Exact hard pair mining against an independent brute force, plus the on-disk formats."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helip.embed import load_embeddings
from helip.errors import ConfigError, InputError, StaleError
from helip.io import fingerprint
from helip.mining import HardPairs, load_hard_pairs, mine_hard_pairs, read_csv, save_hard_pairs, write_csv

N, D, K = 60, 8, 10

# Planted near-duplicates: (copy, original) -> which modalities are (almost) copied.
FULL_DUP = (10, 3)     # image and text copied
TEXT_DUP = (20, 5)     # text copied, image only moderately similar
IMAGE_DUP = (30, 7)    # image copied, text only moderately similar
PLANTED = (FULL_DUP, TEXT_DUP, IMAGE_DUP)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_embeddings(seed: int = 0):
    """Random [n, d] image/text embeddings with a shared offset (so many cosines are positive)
    and the three planted near-duplicates above."""
    n, d = N, D
    rng = np.random.default_rng(seed)
    common_i, common_t = rng.normal(size=d), rng.normal(size=d)
    img = rng.normal(size=(n, d)) + 0.6 * common_i
    txt = rng.normal(size=(n, d)) + 0.6 * common_t
    c, o = FULL_DUP
    img[c] = img[o] + 1e-3 * rng.normal(size=d)
    txt[c] = txt[o] + 1e-3 * rng.normal(size=d)
    c, o = TEXT_DUP
    txt[c] = txt[o] + 1e-3 * rng.normal(size=d)
    img[c] = img[o] + 0.4 * rng.normal(size=d)     # image cosine high but clearly below 0.98
    c, o = IMAGE_DUP
    img[c] = img[o] + 1e-3 * rng.normal(size=d)
    txt[c] = txt[o] + 0.4 * rng.normal(size=d)
    return img.astype(np.float32), txt.astype(np.float32)


def brute_force(img, txt, k, method="hpm", dup_threshold=0.98, min_similarity=0.0):
    """Independent float64 reference: returns (list of index lists, list of score lists), best first."""
    ci = _unit(img) @ _unit(img).T
    ct = _unit(txt) @ _unit(txt).T
    score = {"hpm": ct * ci, "text": ct, "image": ci}[method]
    n = len(img)
    all_idx, all_scores = [], []
    for i in range(n):
        cands = [j for j in range(n)
                 if j != i
                 and ct[i, j] <= dup_threshold and ci[i, j] <= dup_threshold
                 and ct[i, j] > min_similarity and ci[i, j] > min_similarity]
        cands.sort(key=lambda j: -score[i, j])
        top = cands[:k]
        all_idx.append(top)
        all_scores.append([score[i, j] for j in top])
    return all_idx, all_scores, ct, ci, score


def assert_no_borderline(ct, ci, score, ref_idx, dup_threshold, min_similarity, k, eps=1e-5):
    """The reference is float64 and the library float32 (errors ~1e-7 here): make sure the test data has
    no value so close to a threshold, or a top-k tie, that the two could legitimately disagree."""
    off = ~np.eye(len(ct), dtype=bool)
    for c in (ct[off], ci[off]):
        assert np.abs(c - dup_threshold).min() > eps
        assert np.abs(c - min_similarity).min() > eps
    for i, top in enumerate(ref_idx):
        if len(top) == k:  # the k-th must be clearly ahead of the (k+1)-th
            row = np.sort(score[i, [j for j in range(len(ct)) if j != i]])[::-1]
            kth = score[i, top[-1]]
            after = row[row < kth - 1e-12]
            if len(after):
                assert kth - after[0] > eps


def check_against_reference(hp: HardPairs, ref_idx, ref_scores, k):
    assert hp.indices.shape == (N, k) and hp.indices.dtype == np.int32
    assert hp.scores.shape == (N, k) and hp.scores.dtype == np.float32
    for i in range(N):
        m = len(ref_idx[i])
        got = hp.indices[i]
        assert set(got[:m].tolist()) == set(ref_idx[i]), f"row {i}"
        np.testing.assert_allclose(hp.scores[i, :m], ref_scores[i], atol=1e-5, rtol=0)
        # padding
        assert (got[m:] == -1).all(), f"row {i}"
        assert np.isneginf(hp.scores[i, m:]).all(), f"row {i}"
        # best first
        assert (np.diff(hp.scores[i, :m]) <= 1e-7).all()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("block_size", [1, 7, 1000])
@pytest.mark.parametrize("method", ["hpm", "text", "image"])
def test_exact_mining_matches_brute_force(method, block_size, precision):
    img, txt = make_embeddings()
    ref_idx, ref_scores, ct, ci, score = brute_force(img, txt, K, method)
    assert_no_borderline(ct, ci, score, ref_idx, 0.98, 0.0, K)
    # the data must exercise both full rows and padded rows
    lengths = [len(r) for r in ref_idx]
    assert min(lengths) < K and max(lengths) == K

    hp = mine_hard_pairs(img, txt, k=K, method=method, progress=False, block_size=block_size, precision=precision)
    check_against_reference(hp, ref_idx, ref_scores, K)
    assert hp.meta["precision"] == precision
    assert hp.meta["method"] == method and hp.meta["k"] == K and hp.meta["n"] == N
    assert hp.meta["padded_rows"] == sum(length < K for length in lengths)


@pytest.mark.parametrize("method", ["hpm", "text", "image"])
def test_low_precision_fallback_keeps_results_exact(method):
    """With almost no slack most rows cannot be certified from the fp16 pass; the fp32 fallback must make
    them exact anyway, and with the default slack the certificate holds for most rows of clustered data."""
    from helip.mining.exact import search_exact, search_exact_lowp
    import torch

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, 32))
    x = centres[rng.integers(20, size=600)]
    txt = torch.nn.functional.normalize(torch.tensor(x + 0.5 * rng.normal(size=x.shape), dtype=torch.float32), dim=1)
    img = torch.nn.functional.normalize(torch.tensor(x + 0.7 * rng.normal(size=x.shape), dtype=torch.float32), dim=1)
    rows = np.arange(600)
    ref_i, ref_s = search_exact(txt, img, rows, 8, method, 0.98, 0.0, 128)
    for slack, most_certified in ((1, False), (0, True)):
        stats = {}
        got_i, got_s = search_exact_lowp(txt, img, rows, 8, method, 0.98, 0.0, 128, precision="fp16",
                                         slack=slack, stats=stats)
        assert (np.sort(got_i, 1) == np.sort(ref_i, 1)).all()
        np.testing.assert_allclose(got_s, ref_s, atol=1e-5)
        if most_certified:
            assert stats["fallback_rows"] < 0.2 * len(rows)
        else:
            assert stats["fallback_rows"] > 0  # the fallback path ran


def _tied_embeddings(n=80, d=8, seed=5):
    """Unit rows with four entries of +-0.5: every cosine is a multiple of 0.25 and every score a multiple
    of 1/16, exact in any summation order and in fp16, so scores tie exactly and often."""
    rng = np.random.default_rng(seed)

    def rows():
        x = np.zeros((n, d), dtype=np.float32)
        for i in range(n):
            x[i, rng.choice(d, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
        return x
    return rows(), rows()


@pytest.mark.parametrize("mode_opts", [{"precision": "fp32"}, {"precision": "fp16"}, {"block_size": 7},
                                       {"mode": "subset", "candidates": 10**6}])
@pytest.mark.parametrize("method", ["hpm", "text", "image"])
def test_exact_ties_are_broken_by_index(method, mode_opts):
    img, txt = _tied_embeddings()
    ref_idx, ref_scores, *_ = brute_force(img, txt, 6, method)  # stable sort: equal scores by index
    # the data must have ties that cross the k-th place
    crossing = sum(1 for i, top in enumerate(ref_idx) if len(top) == 6 and
                   sum(1 for j in range(len(img)) if j not in top and j != i
                       and abs(_score(img, txt, i, j, method) - ref_scores[i][-1]) < 1e-9
                       and _valid(img, txt, i, j)) > 0)
    assert crossing > 10
    hp = mine_hard_pairs(img, txt, k=6, method=method, progress=False, **mode_opts)
    for i, top in enumerate(ref_idx):
        assert hp.indices[i, :len(top)].tolist() == top, f"row {i}"


def _valid(img, txt, i, j, dup=0.98, lo=0.0):
    ct, ci = float(txt[i] @ txt[j]), float(img[i] @ img[j])
    return lo < ct <= dup and lo < ci <= dup


def _score(img, txt, i, j, method):
    ct, ci = float(txt[i] @ txt[j]), float(img[i] @ img[j])
    return {"hpm": ct * ci, "text": ct, "image": ci}[method]


def test_non_default_thresholds_match_brute_force():
    img, txt = make_embeddings(seed=1)
    ref_idx, ref_scores, ct, ci, score = brute_force(img, txt, K, "hpm", dup_threshold=0.9, min_similarity=0.2)
    assert_no_borderline(ct, ci, score, ref_idx, 0.9, 0.2, K)
    hp = mine_hard_pairs(img, txt, k=K, dup_threshold=0.9, min_similarity=0.2, progress=False, block_size=7)
    check_against_reference(hp, ref_idx, ref_scores, K)


def test_rows_exclude_self_duplicates_and_repeats():
    img, txt = make_embeddings()
    hp = mine_hard_pairs(img, txt, k=K, progress=False, block_size=7)
    for i, row in enumerate(hp.indices):
        valid = row[row >= 0]
        assert i not in valid
        assert len(set(valid.tolist())) == len(valid)
        assert (row[len(valid):] == -1).all(), "padding only at the end"
    for a, b in PLANTED:
        assert b not in hp.indices[a] and a not in hp.indices[b]


def test_planted_duplicates_would_rank_first_without_the_threshold():
    """Sanity check of the test above: the planted pairs are strong candidates, excluded only by
    the near-duplicate rule (with dup_threshold=1 they come first)."""
    img, txt = make_embeddings()
    hp = mine_hard_pairs(img, txt, k=K, dup_threshold=1.0, progress=False)
    for a, b in PLANTED:
        assert hp.indices[a, 0] == b and hp.indices[b, 0] == a


def test_padding_when_few_candidates_qualify():
    # 10 points evenly on a circle (same for image and text): the neighbours at +-36 deg have
    # cosine cos(36) = 0.809, those at +-72 deg cos(72) = 0.309, all others are <= cos(108) < 0.
    # So every row has exactly 4 candidates: i+-1 with score 0.809^2, i+-2 with score 0.309^2.
    n = 10
    ang = 2 * np.pi * np.arange(n) / n
    x = np.stack([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32)
    hp = mine_hard_pairs(x, x.copy(), k=6, progress=False)
    c1, c2 = np.cos(np.pi / 5), np.cos(2 * np.pi / 5)
    for i in range(n):
        assert set(hp.indices[i, :2].tolist()) == {(i + 1) % n, (i - 1) % n}
        assert set(hp.indices[i, 2:4].tolist()) == {(i + 2) % n, (i - 2) % n}
        np.testing.assert_allclose(hp.scores[i, :4], [c1 ** 2, c1 ** 2, c2 ** 2, c2 ** 2], atol=1e-5)
        assert (hp.indices[i, 4:] == -1).all()
        assert np.isneginf(hp.scores[i, 4:]).all()
    assert hp.meta["padded_rows"] == n


def test_min_similarity_boundary_is_excluded():
    # Same 2-d points for image and text: e0=(1,0), e1=(0,1), e2=(1,1)/sqrt2, e3=(-1,0.2)/|.|
    # cos(e0,e1) = 0 exactly (excluded: cosines <= min_similarity=0 do not count),
    # cos(e0,e2) = 0.7071 -> score 0.5, cos(e0,e3) = -1/sqrt(1.04) = -0.9806 -> score 0.9615 (but excluded:
    # unlike the target in both modalities, not hard).
    x = np.array([[1, 0], [0, 1], [1, 1], [-1, 0.2]], dtype=np.float32)
    hp = mine_hard_pairs(x, x.copy(), k=3, progress=False)
    assert hp.indices[0].tolist() == [2, -1, -1]
    np.testing.assert_allclose(hp.scores[0, 0], 0.5, atol=1e-6)
    # with the lowest min_similarity every other pair counts, and the doubly-unlike pair scores highest
    hp = mine_hard_pairs(x, x.copy(), k=3, min_similarity=-1.0, progress=False)
    assert hp.indices[0].tolist() == [3, 2, 1]
    np.testing.assert_allclose(hp.scores[0], [1 / 1.04, 0.5, 0.0], atol=1e-6)


def test_row_count_mismatch_is_input_error():
    img, txt = make_embeddings()
    with pytest.raises(InputError, match="helip embed"):
        mine_hard_pairs(img, txt[:-1], k=5, progress=False)


def test_k_too_large_is_config_error():
    img, txt = make_embeddings()
    mine_hard_pairs(img, txt, k=N - 1, progress=False)  # the largest legal k
    with pytest.raises(ConfigError, match="--k"):
        mine_hard_pairs(img, txt, k=N, progress=False)


@pytest.mark.parametrize("which", ["image", "text"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_is_input_error(which, bad):
    img, txt = make_embeddings()
    (img if which == "image" else txt)[4, 2] = bad
    with pytest.raises(InputError, match="helip embed") as e:
        mine_hard_pairs(img, txt, k=5, progress=False)
    assert which in str(e.value)


def test_unknown_method_is_config_error():
    img, txt = make_embeddings()
    with pytest.raises(ConfigError, match="hpm"):
        mine_hard_pairs(img, txt, k=5, method="caption", progress=False)


# ---------------------------------------------------------------- hard pairs on disk

def _captions(n, tag="a"):
    return [f"caption {tag} {i}" for i in range(n)]


def test_save_load_round_trip_with_fingerprint(tmp_path):
    img, txt = make_embeddings()
    hp = mine_hard_pairs(img, txt, k=K, progress=False)
    fp = fingerprint(_captions(N))
    hp.meta["fingerprint"] = fp
    out = save_hard_pairs(tmp_path / "hp", hp)
    assert (out / "meta.json").is_file()

    back = load_hard_pairs(out, expected_fingerprint=fp)
    np.testing.assert_array_equal(back.indices, hp.indices)
    np.testing.assert_array_equal(back.scores, hp.scores)  # -inf padding survives
    assert back.indices.dtype == np.int32 and back.scores.dtype == np.float32
    assert back.meta == json.loads(json.dumps(hp.meta))
    assert back.k == K and len(back) == N

    # no expectation: loads without checking
    np.testing.assert_array_equal(load_hard_pairs(out).indices, hp.indices)


def test_load_hard_pairs_refuses_another_dataset(tmp_path):
    img, txt = make_embeddings()
    hp = mine_hard_pairs(img, txt, k=K, progress=False)
    hp.meta["fingerprint"] = fingerprint(_captions(N))
    save_hard_pairs(tmp_path, hp)
    # same size, different captions
    with pytest.raises(StaleError, match="helip mine"):
        load_hard_pairs(tmp_path, expected_fingerprint=fingerprint(_captions(N, tag="b")))
    # different size
    with pytest.raises(StaleError):
        load_hard_pairs(tmp_path, expected_fingerprint=fingerprint(_captions(N + 1)))


def test_load_hard_pairs_without_fingerprint_in_meta(tmp_path):
    img, txt = make_embeddings()
    hp = mine_hard_pairs(img, txt, k=K, progress=False)
    save_hard_pairs(tmp_path, hp)
    with pytest.raises(InputError, match="fingerprint"):
        load_hard_pairs(tmp_path, expected_fingerprint=fingerprint(_captions(N)))


def test_load_hard_pairs_incomplete_directory(tmp_path):
    img, txt = make_embeddings()
    hp = mine_hard_pairs(img, txt, k=K, progress=False)
    save_hard_pairs(tmp_path, hp)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(InputError):
        load_hard_pairs(tmp_path)
    with pytest.raises(InputError):
        load_hard_pairs(tmp_path / "does-not-exist")


def test_csv_round_trip_keeps_padding(tmp_path):
    img, txt = make_embeddings()
    hp = mine_hard_pairs(img, txt, k=K, progress=False)
    short = hp.indices[:, -1] < 0
    assert short.any() and (~short).any()  # both kinds of rows present

    path = write_csv(tmp_path / "hard.csv", hp)
    lines = path.read_text().splitlines()
    assert len(lines) == N
    # authors' format: target first, no -1 written
    first = [int(v) for v in lines[0].split(",")]
    assert first[0] == 0 and first[1:] == [int(j) for j in hp.indices[0] if j >= 0]
    assert all("-1" not in line.split(",") for line in lines)

    back = read_csv(path)
    np.testing.assert_array_equal(back.indices, hp.indices)
    assert back.indices.dtype == np.int32
    assert np.isnan(back.scores).all() and back.scores.shape == hp.indices.shape


def test_read_csv_rejects_non_integers(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("0,1,2\n1,x,0\n")
    with pytest.raises(InputError, match="bad.csv:2"):
        read_csv(p)


# ---------------------------------------------------------------- load_embeddings

def _small_embeddings(n=12, d=4):
    rng = np.random.default_rng(3)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)


def _write_embeddings(path, img, txt, meta):
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "image.npy", img)
    np.save(path / "text.npy", txt)
    (path / "meta.json").write_text(json.dumps(meta))


def test_load_embeddings_happy_path(tmp_path):
    img, txt = _small_embeddings()
    fp = fingerprint(_captions(12))
    _write_embeddings(tmp_path / "emb", img, txt, {"n": 12, "fingerprint": fp})
    i2, t2, meta = load_embeddings(tmp_path / "emb", expected_fingerprint=fp)
    np.testing.assert_array_equal(i2, img)
    np.testing.assert_array_equal(t2, txt)
    assert meta["n"] == 12


def test_load_embeddings_missing_directory(tmp_path):
    with pytest.raises(InputError, match="helip embed"):
        load_embeddings(tmp_path / "nowhere")


def test_load_embeddings_row_mismatch(tmp_path):
    img, txt = _small_embeddings()
    _write_embeddings(tmp_path, img, txt[:11], {"n": 12, "fingerprint": fingerprint(_captions(12))})
    with pytest.raises(InputError, match="helip embed"):
        load_embeddings(tmp_path)


def test_load_embeddings_stale_fingerprint(tmp_path):
    img, txt = _small_embeddings()
    _write_embeddings(tmp_path, img, txt, {"n": 12, "fingerprint": fingerprint(_captions(12))})
    with pytest.raises(StaleError, match="helip embed"):
        load_embeddings(tmp_path, expected_fingerprint=fingerprint(_captions(12, tag="other")))
