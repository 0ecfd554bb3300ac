"""HardPairBatchSampler: batch composition, determinism, sharding, fallbacks and argument checks."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from helip.errors import ConfigError, InputError
from helip.sampler import HardPairBatchSampler


def permutation_lists(n: int, k: int, seed: int = 0) -> np.ndarray:
    """[n, k] hard-pair lists: row i holds k distinct indices other than i (no padding)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        others = np.delete(np.arange(n), i)
        rows.append(rng.permutation(others)[:k])
    return np.asarray(rows, dtype=np.int32)


def ragged_lists(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Like permutation_lists, but each row keeps a random number (0..k) of entries, -1 padded."""
    hard = permutation_lists(n, k, seed)
    rng = np.random.default_rng(seed + 100)
    for i, m in enumerate(rng.integers(0, k + 1, size=n)):
        hard[i, m:] = -1
    return hard


def batches_of(sampler):
    return [list(map(int, b)) for b in sampler]


def check_batches(sampler, hard, h, top_k, exact_structure):
    """Invariants shared by all configurations; with ``exact_structure`` also that every batch is
    exactly [t1, p1..ph, t2, p1..ph, ...] (the case where lists are long enough to never run dry)."""
    batches = batches_of(sampler)
    assert len(batches) == len(sampler)
    shard = sampler.shard()
    per = sampler.targets_per_batch
    for b, batch in enumerate(batches):
        if b < len(batches) - 1:
            assert len(batch) == sampler.batch_size
        else:
            assert 0 < len(batch) <= sampler.batch_size
        assert len(set(batch)) == len(batch), f"duplicate index in batch {b}"
        assert all(0 <= j < sampler.n for j in batch)
        targets = [int(t) for t in shard[b * per:(b + 1) * per]]
        pos = [batch.index(t) for t in targets]
        assert pos == sorted(pos) and pos[0] == 0, "targets in shard order, first element is a target"
        # partners between consecutive targets come from the first top_k of the earlier target's list
        for t, p0, p1 in zip(targets, pos, pos[1:]):
            partners = batch[p0 + 1:p1]
            assert len(partners) <= h
            assert set(partners) <= set(hard[t, :top_k].tolist()), (t, partners)
        if exact_structure:
            assert pos == [a * (1 + h) for a in range(len(targets))]
            t, p0 = targets[-1], pos[-1]
            assert set(batch[p0 + 1:p0 + 1 + h]) <= set(hard[t, :top_k].tolist())
    return batches


@pytest.mark.parametrize("h", [1, 2, 3])
def test_batches_are_targets_followed_by_their_partners(h):
    n, top_k = 60, 10
    hard = permutation_lists(n, 30)
    bs = 4 * (1 + h)
    s = HardPairBatchSampler(hard, batch_size=bs, hard_per_target=h, top_k=top_k, seed=3)
    batches = check_batches(s, hard, h, top_k, exact_structure=True)
    # every index is a target exactly once per epoch
    shard = s.shard()
    assert sorted(shard.tolist()) == list(range(n))
    targets = [b[a * (1 + h)] for b in batches for a in range(len(b) // (1 + h))]
    assert targets == shard.tolist()
    # partners are not always the first entries of a list: they are drawn from all of the top_k
    positions = Counter()
    for b in batches:
        for a in range(len(b) // (1 + h)):
            t = b[a * (1 + h)]
            for p in b[a * (1 + h) + 1:(a + 1) * (1 + h)]:
                positions[int(np.where(hard[t] == p)[0][0])] += 1
    assert max(positions) < top_k and max(positions) >= h + 2


def test_partners_only_from_first_top_k():
    n = 40
    hard = permutation_lists(n, 30, seed=1)
    s = HardPairBatchSampler(hard, batch_size=8, hard_per_target=1, top_k=3)
    for epoch in range(5):
        s.set_epoch(epoch)
        for b in s:
            for a in range(0, len(b), 2):
                assert b[a + 1] in hard[b[a], :3]


def test_short_and_missing_lists_keep_invariants():
    n, h, top_k = 50, 2, 4
    hard = ragged_lists(n, 6, seed=2)
    assert (hard[:, 0] == -1).any() and (hard[:, top_k - 1] >= 0).any()
    s = HardPairBatchSampler(hard, batch_size=9, hard_per_target=h, top_k=top_k, seed=5)
    batches = check_batches(s, hard, h, top_k, exact_structure=False)
    flat_targets = s.shard().tolist()
    assert sorted(flat_targets) == list(range(n))
    assert all(len(b) == 9 for b in batches[:-1])


def test_last_batch_and_drop_last():
    n, bs, h = 62, 8, 1            # 4 targets per batch: 15 full batches + 2 targets left
    hard = permutation_lists(n, 20)
    keep = HardPairBatchSampler(hard, batch_size=bs, hard_per_target=h, top_k=10, drop_last=False)
    drop = HardPairBatchSampler(hard, batch_size=bs, hard_per_target=h, top_k=10, drop_last=True)
    bk, bd = batches_of(keep), batches_of(drop)
    assert len(keep) == len(bk) == 16 and len(drop) == len(bd) == 15
    assert [len(b) for b in bk] == [8] * 15 + [4]
    assert all(len(b) == 8 for b in bd)
    assert bk[:15] == bd  # same epoch, same batches; drop_last only drops the remainder
    check_batches(keep, hard, h, 10, exact_structure=True)


def test_deterministic_in_seed_and_epoch():
    hard = permutation_lists(48, 20)
    make = lambda seed=0: HardPairBatchSampler(hard, batch_size=8, hard_per_target=1, top_k=10, seed=seed)
    a, b = make(), make()
    first = batches_of(a)
    assert first == batches_of(b)
    assert first == batches_of(a)  # iterating again gives the same epoch
    a.set_epoch(1)
    second = batches_of(a)
    assert second != first
    assert sorted(a.shard().tolist()) == list(range(48))
    b.set_epoch(1)
    assert batches_of(b) == second
    a.set_epoch(0)
    assert batches_of(a) == first
    assert batches_of(make(seed=1)) != first


@pytest.mark.parametrize("n,replicas", [(60, 2), (60, 3), (61, 2), (62, 3)])
def test_distributed_shards(n, replicas):
    hard = permutation_lists(n, 20)
    h, top_k = 1, 10
    samplers = [HardPairBatchSampler(hard, batch_size=8, hard_per_target=h, top_k=top_k, num_replicas=replicas,
                                     rank=r, seed=7) for r in range(replicas)]
    for s in samplers:
        s.set_epoch(2)
    shards = [s.shard().tolist() for s in samplers]
    per_rank = -(-n // replicas)
    assert all(len(sh) == per_rank for sh in shards)
    union = [t for sh in shards for t in sh]
    assert set(union) == set(range(n))
    if n % replicas == 0:
        assert len(union) == n  # disjoint
    else:
        assert len(union) - len(set(union)) == per_rank * replicas - n  # only the wrap-around padding repeats
    assert len({len(s) for s in samplers}) == 1
    for s, sh in zip(samplers, shards):
        batches = check_batches(s, hard, h, top_k, exact_structure=True)
        # each target of this rank's batches belongs to this rank, and its partner sits right after it
        targets = [b[a] for b in batches for a in range(0, len(b), 2)]
        assert targets == sh
        for b in batches:
            for a in range(0, len(b), 2):
                assert b[a + 1] in hard[b[a], :top_k]
    # every rank yields the same number of full-size batches (the same count of optimiser steps)
    assert len({len(batches_of(s)) for s in samplers}) == 1
    assert len({tuple(map(len, batches_of(s))) for s in samplers}) == 1


def test_ranks_differ_and_are_deterministic():
    hard = permutation_lists(60, 20)
    r0 = HardPairBatchSampler(hard, batch_size=8, num_replicas=2, rank=0, top_k=10)
    r1 = HardPairBatchSampler(hard, batch_size=8, num_replicas=2, rank=1, top_k=10)
    assert batches_of(r0) != batches_of(r1)
    assert batches_of(r1) == batches_of(HardPairBatchSampler(hard, batch_size=8, num_replicas=2, rank=1, top_k=10))


def test_plain_shuffled_batches_without_hard_pairs():
    s = HardPairBatchSampler(None, batch_size=8, num_samples=60, seed=1)
    batches = batches_of(s)
    assert len(batches) == len(s) == 8
    assert [len(b) for b in batches] == [8] * 7 + [4]
    flat = [j for b in batches for j in b]
    assert sorted(flat) == list(range(60))
    assert flat == s.shard().tolist()
    assert flat != list(range(60))  # shuffled
    s.set_epoch(1)
    flat1 = [j for b in s for j in b]
    assert sorted(flat1) == list(range(60)) and flat1 != flat


def test_hard_per_target_zero_is_plain_batches():
    hard = permutation_lists(40, 10)
    s = HardPairBatchSampler(hard, batch_size=8, hard_per_target=0, seed=1)
    flat = [j for b in s for j in b]
    assert flat == s.shard().tolist() and sorted(flat) == list(range(40))


def test_rows_without_hard_pairs_get_random_fill():
    n = 40
    hard = np.full((n, 5), -1, dtype=np.int32)
    s = HardPairBatchSampler(hard, batch_size=8, hard_per_target=1, top_k=5, seed=4)
    batches = batches_of(s)
    assert len(batches) == len(s) == 10
    shard = s.shard().tolist()
    for b, batch in enumerate(batches):
        assert len(batch) == 8
        assert len(set(batch)) == 8
        assert batch[:4] == shard[4 * b:4 * b + 4]  # targets first, then random fill
        assert all(0 <= j < n for j in batch)


def test_bad_arguments():
    hard = permutation_lists(20, 5)
    with pytest.raises(ConfigError, match="batch_size"):
        HardPairBatchSampler(hard, batch_size=2, hard_per_target=2)
    HardPairBatchSampler(hard, batch_size=3, hard_per_target=2)  # just enough room
    with pytest.raises(ConfigError, match="rank"):
        HardPairBatchSampler(hard, batch_size=4, num_replicas=2, rank=2)
    with pytest.raises(ConfigError, match="rank"):
        HardPairBatchSampler(hard, batch_size=4, rank=-1)
    with pytest.raises(InputError, match="mine hard pairs"):
        HardPairBatchSampler(hard, batch_size=4, num_samples=21)
    HardPairBatchSampler(hard, batch_size=4, num_samples=20)
    with pytest.raises(ConfigError):
        HardPairBatchSampler(None, batch_size=4)
    with pytest.raises(ConfigError, match="larger than the dataset"):
        HardPairBatchSampler(hard, batch_size=22)
    with pytest.raises(ConfigError, match="top_k"):
        HardPairBatchSampler(hard, batch_size=4, top_k=0)
    with pytest.raises(InputError):
        HardPairBatchSampler(hard[:, 0], batch_size=4)


@pytest.mark.parametrize("h", [1, 3])
def test_hard_fraction_mixes_groups_and_lone_targets(h):
    n, bs, top_k = 90, 16, 10
    hard = permutation_lists(n, 30)
    s = HardPairBatchSampler(hard, batch_size=bs, hard_per_target=h, top_k=top_k, seed=1, hard_fraction=0.5)
    groups = (bs // 2) // (1 + h)
    assert s.groups_per_batch == groups and s.targets_per_batch == bs - groups * h
    batches = batches_of(s)
    shard, per = s.shard(), s.targets_per_batch
    targets_seen = []
    for b, batch in enumerate(batches):
        assert len(set(batch)) == len(batch)
        targets = [int(t) for t in shard[b * per:(b + 1) * per]]
        g = min(groups, len(targets))
        # [t1, partners.., t2, partners.., ..., t_g, partners.., lone targets...]
        for a in range(g):
            assert batch[a * (1 + h)] == targets[a]
            assert set(batch[a * (1 + h) + 1:(a + 1) * (1 + h)]) <= set(hard[targets[a], :top_k].tolist())
        assert batch[g * (1 + h):] == targets[g:]
        targets_seen += targets
    assert sorted(targets_seen) == list(range(n))  # every pair is a target once per epoch
    # the extremes: fraction 0 is plain batches of targets, fraction 1 the unmixed sampler
    plain = HardPairBatchSampler(hard, batch_size=bs, hard_per_target=h, seed=1, hard_fraction=0.0)
    assert batches_of(plain)[0] == plain.shard()[:bs].tolist()
    assert batches_of(HardPairBatchSampler(hard, batch_size=bs, hard_per_target=h, seed=1, hard_fraction=1.0)) == \
        batches_of(HardPairBatchSampler(hard, batch_size=bs, hard_per_target=h, seed=1))
    with pytest.raises(ConfigError, match="hard_fraction"):
        HardPairBatchSampler(hard, batch_size=bs, hard_fraction=1.5)


def partner_ranks(sampler, hard, epochs=range(3)):
    """For every target followed by a partner (hard_per_target=1): the partner's position in the target's list."""
    ranks = []
    for e in epochs:
        sampler.set_epoch(e)
        for batch in sampler:
            for t, p in zip(batch[0::2], batch[1::2]):
                row = hard[t].tolist()
                if p in row:
                    ranks.append(row.index(p))
    return np.array(ranks)


def test_temperature_draws_partners_by_score():
    n, k = 400, 5
    hard = permutation_lists(n, k)
    scores = np.tile(np.linspace(0.9, 0.5, k, dtype=np.float32), (n, 1))  # best first, 0.1 apart

    def make(t, seed=0):
        return HardPairBatchSampler(hard, batch_size=40, hard_per_target=1, top_k=k, seed=seed,
                                    hard_scores=scores, hard_temperature=t, temperature_mode="absolute")

    # tiny T: the best partner unless it is already in the batch; T=0 (uniform): about 1 in k
    cold, uniform = partner_ranks(make(1e-3), hard), partner_ranks(make(0.0), hard)
    assert (cold == 0).mean() > 0.9
    assert abs((uniform == 0).mean() - 1 / k) < 0.05
    # large T: close to uniform over the k places
    hot = partner_ranks(make(1e3), hard)
    hot = np.bincount(hot, minlength=k) / len(hot)
    assert np.abs(hot - 1 / k).max() < 0.04
    # in between: the first draw follows softmax(score / T)
    s = make(0.1)
    rng = np.random.default_rng(0)
    first = np.bincount([int(np.flatnonzero(hard[3] == s._draw_order(3, rng)[0])[0]) for _ in range(20000)],
                        minlength=k) / 20000
    want = np.exp(scores[3] / 0.1) / np.exp(scores[3] / 0.1).sum()
    assert np.abs(first - want).max() < 0.015
    # deterministic per (seed, epoch, rank), and the draws do depend on the seed
    assert batches_of(make(0.1)) == batches_of(make(0.1))
    assert batches_of(make(0.1)) != batches_of(make(0.1, seed=1))
    check_batches(make(0.1), hard, 1, k, exact_structure=False)


def first_draws(sampler, hard, row, k, rng, draws=20000):
    """Share of draws in which each of row's first k places comes first."""
    return np.bincount([int(np.flatnonzero(hard[row] == sampler._draw_order(row, rng)[0])[0]) for _ in range(draws)],
                       minlength=hard.shape[1])[:k] / draws


def test_relative_temperatures_draw_by_the_median_spread_or_each_rows_own():
    """relative: P(j) ~ exp((s_j - s_1) / (T * median_i(s_1 - s_k))); per_target: each row's own s_1 - s_k."""
    n, k, t = 60, 6, 0.5
    hard = permutation_lists(n, k + 2)
    rng = np.random.default_rng(1)
    scores = np.sort(rng.uniform(0, 1, size=(n, k + 2)), axis=1)[:, ::-1].astype(np.float32)
    scores[1] = 0.3 + 0.001 * scores[0]  # the same shape of scores as row 0 in a far narrower range...
    scores[2] = 0.3 + 0.001 * scores[3]  # ...and row 3's
    spreads = (scores[:, 0] - scores[:, k - 1]).astype(np.float64)  # only the first top_k places count
    rng = np.random.default_rng(0)

    def make(mode):
        return HardPairBatchSampler(hard, batch_size=8, hard_per_target=1, top_k=k, hard_scores=scores,
                                    hard_temperature=t, temperature_mode=mode)

    def softmax(row, unit):
        sr = scores[row, :k].astype(np.float64)
        e = np.exp((sr - sr[0]) / (t * unit))
        return e / e.sum()

    per, rel = make("per_target"), make("relative")
    assert rel.spread_unit == pytest.approx(np.median(spreads), rel=1e-6)
    for row in (0, 3):
        assert np.abs(first_draws(per, hard, row, k, rng) - softmax(row, spreads[row])).max() < 0.015
        assert np.abs(first_draws(rel, hard, row, k, rng) - softmax(row, np.median(spreads))).max() < 0.015
    # per_target: a narrow row draws like the wide row of the same shape
    assert np.abs(first_draws(per, hard, 1, k, rng) - first_draws(per, hard, 0, k, rng)).max() < 0.02
    # relative: one unit for all rows, so the narrow row (spread 1/1000 of the typical) draws almost uniformly,
    # as the absolute temperature in score units does
    near_uniform = first_draws(rel, hard, 1, k, rng, 6000)
    assert np.abs(near_uniform - 1 / k).max() < 0.03 and first_draws(per, hard, 1, k, rng)[0] > 0.3


@pytest.mark.parametrize("mode", ["relative", "per_target"])
@pytest.mark.parametrize("a,b", [(4.0, -2.5), (0.25, 3.0), (1.0, 0.75)])
def test_relative_temperature_is_invariant_to_an_affine_rescaling_of_the_scores(a, b, mode):
    """s -> a*s + b (a > 0) draws the same batches; dyadic scores keep the rescaling exact in float32."""
    n, k = 80, 10
    hard = ragged_lists(n, k, seed=2)
    scores = np.random.default_rng(3).integers(0, 256, size=(n, k)).astype(np.float32) / 256
    scores = -np.sort(-scores, axis=1)

    def make(sc, how=mode):
        return HardPairBatchSampler(hard, batch_size=16, hard_per_target=2, top_k=8, seed=4, hard_scores=sc,
                                    hard_temperature=0.3, temperature_mode=how)

    rescaled = (a * scores + b).astype(np.float32)
    assert np.array_equal((rescaled - b) / a, scores)  # exact, so any difference below is the sampler's
    for epoch in range(3):
        same, moved = make(scores), make(rescaled)
        same.set_epoch(epoch)
        moved.set_epoch(epoch)
        assert batches_of(same) == batches_of(moved)
    # the absolute temperature is not scale-free: the same rescaling changes its draws
    if a != 1.0:
        assert batches_of(make(scores, "absolute")) != batches_of(make(rescaled, "absolute"))
    # and the draws do depend on the scores: reversing their order within the rows changes the batches
    assert batches_of(make(scores)) != batches_of(make(-scores))


@pytest.mark.parametrize("mode", ["relative", "per_target"])
def test_relative_temperature_with_zero_spread_draws_uniformly(mode):
    """A row whose valid scores are all equal carries no ranking: it is drawn as with temperature 0."""
    n, k = 70, 8
    hard = ragged_lists(n, k, seed=6)
    flat = np.where(hard >= 0, 0.42, -np.inf).astype(np.float32)  # padding's scores are never read
    uniform = HardPairBatchSampler(hard, batch_size=12, hard_per_target=1, top_k=k, seed=7)
    relative = HardPairBatchSampler(hard, batch_size=12, hard_per_target=1, top_k=k, seed=7, hard_scores=flat,
                                    hard_temperature=0.05, temperature_mode=mode)
    assert batches_of(relative) == batches_of(uniform)
    # one row with spread among flat rows: only that row's draw follows the scores
    scores = flat.copy()
    full = np.flatnonzero((hard >= 0).sum(1) == k)[0]
    scores[full] = np.linspace(1.0, 0.0, k)
    mixed = HardPairBatchSampler(hard, batch_size=12, hard_per_target=1, top_k=k, seed=7, hard_scores=scores,
                                 hard_temperature=0.01, temperature_mode=mode)
    assert mixed.flat.sum() == n - 1 and not mixed.flat[full]
    rng = np.random.default_rng(0)
    firsts = Counter(int(mixed._draw_order(full, rng)[0]) for _ in range(300))
    assert firsts[int(hard[full, 0])] > 295  # T = 0.01 of the spread: the best partner almost always


def test_temperature_mode_is_checked():
    with pytest.raises(ConfigError, match="temperature_mode"):
        HardPairBatchSampler(permutation_lists(20, 4), batch_size=8, temperature_mode="kelvin")


def test_temperature_needs_scores():
    hard = ragged_lists(30, 4)
    with pytest.raises(ConfigError, match="scores"):
        HardPairBatchSampler(hard, batch_size=8, hard_temperature=0.1)
    with pytest.raises(ConfigError, match="scores"):  # the authors' CSV has none: NaN
        HardPairBatchSampler(hard, batch_size=8, hard_temperature=0.1, hard_scores=np.full(hard.shape, np.nan))
    with pytest.raises(ConfigError, match="hard_temperature"):
        HardPairBatchSampler(hard, batch_size=8, hard_temperature=-1.0)
    # -1 padding with -inf scores is fine: padded places are never drawn
    scores = np.where(hard >= 0, 0.5, -np.inf)
    s = HardPairBatchSampler(hard, batch_size=8, hard_temperature=0.1, hard_scores=scores, top_k=4)
    check_batches(s, hard, 1, 4, exact_structure=False)


def test_set_hard_pairs_changes_the_partners_not_the_targets():
    n = 60
    a, b = permutation_lists(n, 10, seed=0), permutation_lists(n, 10, seed=1)
    s = HardPairBatchSampler(a, batch_size=8, hard_per_target=1, top_k=10, seed=2)
    before = batches_of(s)
    s.set_hard_pairs(b)
    after = batches_of(s)
    assert [x[0::2] for x in before] == [x[0::2] for x in after]  # same targets in the same order
    assert before != after
    check_batches(s, b, 1, 10, exact_structure=True)
    with pytest.raises(InputError):
        s.set_hard_pairs(b[:10])
