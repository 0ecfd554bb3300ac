"""Re-mining ("dynamic" mining): refresh the hard pairs with the model being trained.

HELIP mines hard pairs once, with the starting model. Training moves the
embeddings, so the pairs that confuse the model drift away from the mined
ones. ``--remine-every E`` re-embeds the training pairs with the *current*
model at the start of epochs E, 2E, ... and mines again with the options that
produced the original hard pairs (read from their ``meta.json``); the sampler
and HNML's partner mask then use the new lists.

- Embeddings: the model's own towers through ``helip.embed.encode_batches``,
  over the training Dataset itself (the same transform and tokens training
  reads), in eval mode. Hard pairs mined with external encoders are re-mined
  with the model's towers: those encoders do not change during training.
- Torchrun: rank r encodes shard r of the pairs, an all_gather gives every
  rank the same [N, d] arrays, and ``mine_hard_pairs`` with an output
  directory splits the mining over the ranks and merges it, so every rank
  trains with the same lists.
- Resume: each result is written to ``OUT/remined/epoch_E`` (the hard-pairs
  format of ``helip mine``) and checkpoints record E. A resumed run loads
  that directory instead of recomputing, so it continues with the very lists
  the interrupted run used; a re-mining the interrupted run did after its
  last checkpoint is simply redone.
"""
from __future__ import annotations

import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ..data.indexed import IndexedBatches
from ..embed import encode_batches
from ..errors import ConfigError, InputError
from ..mining import HardPairs, MineConfig, load_hard_pairs, mine_hard_pairs
from ..resumable import barrier, rank_and_world
from .hooks import TrainHook

log = logging.getLogger(__name__)

REMINED_DIR = "remined"
_MINING_KEYS = ("mode", "method", "k", "dup_threshold", "min_similarity", "seed")


def mine_config_from_meta(meta: dict, device: str = "cpu", progress: bool = False) -> MineConfig:
    """The ``MineConfig`` that produced hard pairs with this ``meta.json`` (``helip mine``'s).

    Precision is left on auto: it changes how fast the lists are computed,
    not which lists come out (``MineConfig.search_key``).
    """
    missing = [k for k in _MINING_KEYS if k not in meta]
    if missing:
        raise ConfigError(f"--remine-every re-mines with the options that produced the hard pairs, but their "
                          f"meta.json lacks {', '.join(missing)} (not mined by `helip mine`, e.g. read from the "
                          f"authors' CSV); mine them with `helip mine` or drop --remine-every.")
    cfg = MineConfig(**{k: meta[k] for k in _MINING_KEYS}, device=device, progress=progress)
    cfg.mode = meta.get("requested_mode", cfg.mode)   # auto decides again on the new embeddings
    if "target_recall" in meta.get("choice", {}):
        cfg.target_recall = meta["choice"]["target_recall"]
    pool = meta.get("candidate_pool")
    if cfg.mode == "subset" and isinstance(pool, dict):
        cfg.candidates, cfg.redraw_every = pool["candidates"], pool["redraw_every"]
    if cfg.mode == "ann" and isinstance(pool, dict):   # an nprobe chosen for the target recall is chosen again
        cfg.nlist = pool["nlist"] or 0
        cfg.nprobe = 0 if pool.get("chosen_for_target_recall") else pool["nprobe"]
    return cfg


def embed_dataset(model: torch.nn.Module, dataset, batch_size: int, device: str, workers: int = 0,
                  autocast: Callable[[], Any] = nullcontext) -> Tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings of every pair of a map-style (image, tokens) Dataset, on every rank.

    Each rank encodes its shard (``np.array_split`` order) and the shards are
    all-gathered, so all ranks hold the same arrays.
    """
    rank, world = rank_and_world()
    n = len(dataset)
    rows = np.array_split(np.arange(n), world)[rank]
    batches = [rows[s:s + batch_size].tolist() for s in range(0, len(rows), batch_size)]
    loader = torch.utils.data.DataLoader(IndexedBatches(dataset), batch_sampler=batches, num_workers=workers,
                                         collate_fn=IndexedBatches.collate, pin_memory=device.startswith("cuda"))
    img, txt = encode_batches(model, ((images, tokens) for _, images, tokens in loader), device, autocast)
    if world > 1:
        img, txt = _all_gather_rows(img, n, device), _all_gather_rows(txt, n, device)
    return img, txt


def _all_gather_rows(x: np.ndarray, n: int, device: str) -> np.ndarray:
    """Every rank's ``np.array_split`` shard, in rank order (padded to equal size for the collective)."""
    world = dist.get_world_size()
    sizes = [len(s) for s in np.array_split(np.arange(n), world)]
    padded = torch.zeros(sizes[0], x.shape[1], device=device)  # on the device: NCCL gathers device tensors
    padded[:len(x)] = torch.from_numpy(x).to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)]).cpu().numpy()


def remined_dir(out_dir: Path, epoch: int) -> Path:
    return Path(out_dir) / REMINED_DIR / f"epoch_{epoch:04d}"


class Remining(TrainHook):
    """Re-mining during one training run, as a hook of the loop: when it is due, the lists in use, a record.

    ``epoch`` is the epoch the lists in use were mined at (0: the original
    hard pairs); ``events`` (epoch, step, seconds) go into checkpoints and
    ``train_config.json``.
    """

    def __init__(self, every: int, original: HardPairs, out_dir: Path, device: str, batch_size: int,
                 workers: int = 0, progress: bool = False):
        self.every, self.original, self.out_dir = every, original, Path(out_dir)
        self.device, self.batch_size, self.workers = device, batch_size, workers
        self.mine_cfg = mine_config_from_meta(original.meta, device, progress and rank_and_world()[0] == 0)
        self.epoch = 0
        self.events: List[dict] = []

    def due(self, epoch: int) -> bool:
        return epoch > 0 and epoch % self.every == 0 and epoch != self.epoch

    def on_epoch_start(self, epoch: int, step: int, model: torch.nn.Module, dataset,
                       autocast: Callable[[], Any] = nullcontext) -> Optional[HardPairs]:
        return self.run(model, dataset, epoch, step, autocast) if self.due(epoch) else None

    def run(self, model: torch.nn.Module, dataset, epoch: int, step: int,
            autocast: Callable[[], Any] = nullcontext) -> HardPairs:
        """Embed ``dataset`` with ``model`` (unwrapped, on ``device``), mine, record; the new lists."""
        t0 = time.perf_counter()
        img, txt = embed_dataset(model, dataset, self.batch_size, self.device, self.workers, autocast)
        t_embed = time.perf_counter() - t0
        out = remined_dir(self.out_dir, epoch)
        if rank_and_world()[0] == 0 and out.exists():
            shutil.rmtree(out)  # an interrupted run's, from after its last checkpoint: redone
        barrier()
        extra = {"remined_at": {"epoch": epoch, "step": step},
                 **{k: self.original.meta[k] for k in ("fingerprint", "restricted_to_usable")
                    if k in self.original.meta}}
        hard = mine_hard_pairs(img, txt, self.mine_cfg, out_dir=out, extra_meta=extra)
        seconds = time.perf_counter() - t0
        self.epoch = epoch
        self.events.append({"epoch": epoch, "step": step, "seconds": round(seconds, 3),
                            "embed_seconds": round(t_embed, 3), "mine_seconds": round(seconds - t_embed, 3),
                            "dir": str(out)})
        log.info("re-mined hard pairs at epoch %d (step %d) in %.1fs (embedding %.1fs) -> %s",
                 epoch, step, seconds, t_embed, out)
        return hard

    def state_dict(self) -> dict:
        return {"hard_pairs_epoch": self.epoch, "remine_events": list(self.events)}

    def summary(self) -> dict:
        return {"remining": self.events}

    def load_state_dict(self, state: dict, n: int) -> Optional[HardPairs]:
        """Restore from a checkpoint; the re-mined lists it trained with (None: the original ones)."""
        self.epoch = int(state.get("hard_pairs_epoch", 0))
        self.events = list(state.get("remine_events", []))
        if self.epoch == 0:
            return None
        path = remined_dir(self.out_dir, self.epoch)
        if not (path / "meta.json").is_file():
            raise InputError(f"cannot resume: the checkpoint trained with hard pairs re-mined at epoch {self.epoch}, "
                             f"but {path} is missing or incomplete; start afresh or resume from an earlier "
                             f"checkpoint.")
        hard = load_hard_pairs(path)
        if len(hard) != n:
            raise InputError(f"{path} has {len(hard)} rows but the dataset has {n} pairs.")
        return hard
