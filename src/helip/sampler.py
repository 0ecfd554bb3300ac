"""HardPairBatchSampler: batches in which each target sits beside its hard pairs.

The released HELIP sampler streams target, partner, target, partner...; this one
builds whole batches so it can promise what a contrastive loss needs:

- every pair is a *target* exactly once per epoch (per rank shard, see below);
- each target is followed by ``hard_per_target`` partners drawn without
  replacement from the first ``top_k`` entries of its hard-pair list:
  uniformly (the released sampler), or, with ``hard_temperature`` T > 0, by
  the mining scores (``hard_scores``), so a small T favours the hardest
  partners and a large T approaches the uniform draw. T's unit is set by
  ``temperature_mode``:

  - ``"relative"`` (helip's default): the median, over targets, of a target's
    score spread s_1 - s_k over its valid top-k list (s_1 / s_k its highest /
    lowest score); P(j) ~ exp(s_j / (T * median spread)). The same T means the
    same sharpness at any score scale (invariant to s -> a*s + b, a > 0), while
    a target whose k partners are nearly equally hard still draws them nearly
    uniformly and one with a clear hardest partner favours it;
  - ``"per_target"``: each target's own spread,
    P(j) ~ exp((s_j - s_1) / (T * (s_1 - s_k))): every target equally sharp
    (also scale-free; measured a point worse than the others on the built-in
    world's validation split, see benchmarks/RESULTS.md);
  - ``"absolute"``: score units, P(j) ~ exp(s_j / T), whose meaning depends on
    how spread the scores of the data at hand are.

  In the relative modes a target whose k scores are all equal (or that has a
  single partner) draws uniformly, as does every target when no spread is
  positive;
- no index appears twice in a batch (a duplicate would be its own negative);
  a partner already in the batch is replaced by the next draw from the list,
  and places no list can fill are filled with random pairs (the released
  code's random fallback, without its off-by-one);
- fixed batch size, so every rank gets the same number of batches;
- deterministic in (seed, epoch, rank); ``set_epoch`` as DistributedSampler.

With ``num_replicas > 1`` the shuffled targets are split into equal contiguous
shards (padded by wrapping around, like DistributedSampler), and each rank
builds its batches from its own targets, so a target and its partners are
always on the same rank, where the margin loss sees them together.

With ``hard_pairs=None`` or ``hard_per_target=0`` it yields plain shuffled
batches: the baseline of a fair comparison runs through the same code.

``hard_fraction`` < 1 mixes the two: only that share of a batch's places goes
to target + partner groups, the rest to targets without partners, so a batch
keeps the diverse, easy negatives that random batches give (coarse attributes)
beside the hard ones.

``set_hard_pairs`` swaps in new lists (re-mining, ``helip.training.remine``); the order
of targets does not depend on them, only the partners drawn.
"""
from __future__ import annotations

from typing import Iterator, List, Optional

import numpy as np
from torch.utils.data import Sampler

from . import defaults
from .errors import ConfigError, InputError

TEMPERATURE_MODES = ("relative", "per_target", "absolute")


class HardPairBatchSampler(Sampler[List[int]]):
    def __init__(
        self,
        hard_pairs: Optional[np.ndarray],
        batch_size: int,
        hard_per_target: int = defaults.HARD_PER_TARGET,
        top_k: int = defaults.TOP_K,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        num_samples: Optional[int] = None,
        hard_fraction: float = defaults.HARD_FRACTION,
        hard_scores: Optional[np.ndarray] = None,
        hard_temperature: float = 0.0,
        temperature_mode: str = defaults.HARD_TEMPERATURE_MODE,
    ):
        """Batches from raw hard-pair lists [N, k] (``hard_pairs=None``: plain shuffled batches).

        Given only index lists, partners are drawn uniformly (``hard_temperature=0``,
        the paper's draw); ``from_hard_pairs`` builds the sampler ``helip train``
        uses, with the mining scores and helip's default partner temperature.
        """
        if hard_pairs is None:
            if num_samples is None:
                raise ConfigError("HardPairBatchSampler needs hard_pairs or num_samples.")
            hard_per_target = 0
            self.n = int(num_samples)
        else:
            hard_pairs = np.asarray(hard_pairs)
            if hard_pairs.ndim != 2:
                raise InputError(f"hard_pairs must be [N, k], got shape {hard_pairs.shape}.")
            self.n = len(hard_pairs)
            if num_samples is not None and num_samples != self.n:
                raise InputError(f"hard pairs have {self.n} rows but the dataset has {num_samples} pairs; "
                                 f"mine hard pairs for this dataset.")
        if batch_size < 1 + hard_per_target:
            raise ConfigError(f"batch_size {batch_size} cannot hold a target and {hard_per_target} partners.")
        if not 0 <= rank < num_replicas:
            raise ConfigError(f"rank {rank} is outside 0..{num_replicas - 1}.")
        if not 0.0 <= hard_fraction <= 1.0:
            raise ConfigError(f"hard_fraction must be in [0, 1], got {hard_fraction}.")
        if top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {top_k}.")
        if hard_temperature < 0:
            raise ConfigError(f"hard_temperature must be 0 (uniform) or positive, got {hard_temperature}.")
        if temperature_mode not in TEMPERATURE_MODES:
            raise ConfigError(f"temperature_mode must be one of {', '.join(TEMPERATURE_MODES)}, "
                              f"got {temperature_mode!r}.")
        if self.n < batch_size:
            raise ConfigError(f"batch_size {batch_size} is larger than the dataset ({self.n} pairs).")
        self.batch_size = batch_size
        self.hard_per_target = hard_per_target
        self.top_k = top_k
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.temperature = float(hard_temperature) if hard_per_target > 0 else 0.0
        self.temperature_mode = temperature_mode
        self.hard = self.logits = self.flat = self.spread_unit = None
        if hard_pairs is not None:
            self.set_hard_pairs(hard_pairs, hard_scores)
        if hard_fraction >= 1.0:  # the remainder places are random fill, as without mixing
            self.groups_per_batch = batch_size // (1 + hard_per_target)
            self.targets_per_batch = self.groups_per_batch
        else:
            self.groups_per_batch = int(hard_fraction * batch_size) // (1 + hard_per_target)
            self.targets_per_batch = batch_size - self.groups_per_batch * hard_per_target
        self.targets_per_rank = -(-self.n // num_replicas)  # ceil: shards padded by wrap-around

    @classmethod
    def from_hard_pairs(cls, hard_pairs, batch_size: int, *, hard_per_target: int = defaults.HARD_PER_TARGET,
                        top_k: int = defaults.TOP_K, hard_fraction: float = defaults.HARD_FRACTION,
                        hard_temperature: float = defaults.HARD_TEMPERATURE,
                        temperature_mode: str = defaults.HARD_TEMPERATURE_MODE, num_replicas: int = 1,
                        rank: int = 0, seed: int = 0, drop_last: bool = True,
                        num_samples: Optional[int] = None) -> "HardPairBatchSampler":
        """The sampler of ``helip train`` for a ``HardPairs`` (indices and scores), with helip's defaults.

        ``hard_pairs=None`` gives the baseline's plain shuffled batches (then
        ``num_samples`` is required). ``drop_last=True`` as in training: every
        batch has ``batch_size`` pairs.
        """
        return cls(None if hard_pairs is None else hard_pairs.indices, batch_size,
                   hard_per_target if hard_pairs is not None else 0, top_k, num_replicas=num_replicas, rank=rank,
                   seed=seed, drop_last=drop_last, num_samples=num_samples, hard_fraction=hard_fraction,
                   hard_scores=None if hard_pairs is None else hard_pairs.scores, hard_temperature=hard_temperature,
                   temperature_mode=temperature_mode)

    def set_hard_pairs(self, hard_pairs: np.ndarray, hard_scores: Optional[np.ndarray] = None) -> None:
        """Use these lists from now on (same N); scores are needed only with a temperature."""
        hard_pairs = np.asarray(hard_pairs)
        if hard_pairs.ndim != 2 or len(hard_pairs) != self.n:
            raise InputError(f"hard_pairs must be [{self.n}, k], got shape {hard_pairs.shape}.")
        self.hard = hard_pairs[:, :self.top_k]
        self.logits = None
        if self.temperature > 0:
            if hard_scores is None or np.shape(hard_scores) != hard_pairs.shape:
                raise ConfigError("a hard-pair temperature needs the mining scores (hard_scores.npy) beside the "
                                  "indices; re-mine with helip, or use temperature 0 (--hard-temperature 0: "
                                  "uniform choice).")
            scores = np.asarray(hard_scores[:, :self.top_k], dtype=np.float32)
            if np.isnan(scores[self.hard >= 0]).any():
                raise ConfigError("a hard-pair temperature needs mining scores, but these hard pairs have none "
                                  "(e.g. read from the authors' CSV); use temperature 0 (--hard-temperature 0: uniform "
                                  "choice).")
            self.logits = self._logits(scores)

    def _logits(self, scores: np.ndarray) -> np.ndarray:
        """Per-row log-probabilities (up to a constant) of each top-k place.

        Computed once per list (not per draw), so the draw stays one Gumbel
        sort. Absolute: score / T, in float32 as before, so runs measured with
        it are reproduced exactly. Relative modes: (s_j - s_1) / (T * unit), in
        float64, the unit being the median of the rows' spreads s_1 - s_k
        (``self.spread_unit``) or the row's own; subtracting the row's s_1
        changes no draw. ``self.flat`` marks the rows with no spread, drawn
        uniformly.
        """
        self.flat = self.spread_unit = None
        if self.temperature_mode == "absolute":
            return scores / self.temperature
        valid = self.hard >= 0
        s = scores.astype(np.float64)
        top = np.where(valid, s, -np.inf).max(axis=1, keepdims=True)
        spread = top - np.where(valid, s, np.inf).min(axis=1, keepdims=True)
        # zero spread, a single valid place, or none: no score information, so the row is drawn uniformly
        self.flat = ~(spread[:, 0] > 0)
        if self.temperature_mode == "relative":
            self.spread_unit = float(np.median(spread[~self.flat, 0])) if (~self.flat).any() else 0.0
            unit = np.full_like(spread, self.spread_unit if self.spread_unit > 0 else 1.0)
        else:
            unit = np.where(self.flat[:, None], 1.0, spread)
        with np.errstate(invalid="ignore", divide="ignore"):  # padded places may hold -inf or NaN: never drawn
            return (s - top) / (self.temperature * unit)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        full, rest = divmod(self.targets_per_rank, self.targets_per_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def shard(self) -> np.ndarray:
        """This rank's targets for the current epoch, in order."""
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        total = self.targets_per_rank * self.num_replicas
        if total > self.n:
            perm = np.concatenate([perm, perm[: total - self.n]])
        return perm[self.rank * self.targets_per_rank:(self.rank + 1) * self.targets_per_rank]

    def __iter__(self) -> Iterator[List[int]]:
        targets = self.shard()
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, 1])
        per = self.targets_per_batch
        for b in range(len(self)):
            chunk = targets[b * per:(b + 1) * per]
            groups = min(len(chunk), self.groups_per_batch)
            size = self.batch_size if len(chunk) == per else len(chunk) + groups * self.hard_per_target
            yield self._batch(chunk, size, rng, groups)

    def _batch(self, chunk: np.ndarray, size: int, rng: np.random.Generator, groups: int) -> List[int]:
        """The first ``groups`` targets of ``chunk`` get partners; the rest stand alone."""
        chosen = set(int(t) for t in chunk)  # targets first, so no partner can take a target's place
        batch: List[int] = []
        for g, t in enumerate(chunk):
            t = int(t)
            if t in batch:  # only possible when a tiny dataset wraps around
                continue
            batch.append(t)
            if self.hard is None or self.hard_per_target == 0 or g >= groups:
                continue
            taken = 0
            for j in self._draw_order(t, rng):
                if taken == self.hard_per_target or len(chosen) >= size:
                    break
                j = int(j)
                if j not in chosen:
                    chosen.add(j)
                    batch.append(j)
                    taken += 1
        # random fill for places no hard list could fill (and remainder places)
        missing = size - len(batch)
        while missing > 0:
            for j in rng.integers(0, self.n, size=2 * missing + 8):
                j = int(j)
                if j not in chosen:
                    chosen.add(j)
                    batch.append(j)
                    missing -= 1
                    if missing == 0:
                        break
        return batch

    def _draw_order(self, t: int, rng: np.random.Generator) -> np.ndarray:
        """Target t's list in the order partners are taken: a random permutation, uniform or by temperature.

        With a temperature, sorting the logits plus Gumbel noise draws the list
        without replacement with P(j first) proportional to exp(logit_j) (the
        Gumbel-max trick; no exp, so any small T is safe). A row with zero
        score spread (relative modes) is drawn as without a temperature.
        """
        row = self.hard[t]
        ok = row >= 0
        if self.logits is None or (self.flat is not None and self.flat[t]):
            return rng.permutation(row[ok])
        keys = self.logits[t][ok] + rng.gumbel(size=int(ok.sum()))
        return row[ok][np.argsort(-keys, kind="stable")]
