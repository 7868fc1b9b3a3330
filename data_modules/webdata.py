"""WebDataset shards (tar files of ``<key>.json`` + ``<key>.img<i>.png``) as a Lightning DataModule.

Why not a plain ``wds.WebDataset`` pipeline: exact resume and equal batch counts on every rank need
to know where each sample sits. So shards are indexed once (tar headers only: a seek per member,
no image bytes read), and each epoch is a deterministic plan:

1. The epoch's sample order is a function of (seed, epoch): shards are shuffled, then samples within
   each shard; several sources are interleaved by weight.
2. Rank ``r`` of ``W`` takes every ``W``-th planned sample, truncated so all ranks hold the same
   number, and cuts them into batches.
3. Worker ``w`` of ``K`` builds batches ``start + w, start + w + K, …``; PyTorch's DataLoader reads
   workers round-robin, so a rank sees the same batch order for any number of workers.

The stream position is (epoch, samples of the epoch's plan consumed by all ranks together). Ranks
step together and take the plan round-robin, so the consumed samples are always a prefix of the
plan: restoring the position hands the rest of the plan to however many ranks there are now, with
any batch size, and skips straight there without decoding anything before it. Bad samples are dropped from their batch and counted by reason
(truncated shard, invalid or non-UTF-8 json, missing field, wrong field type, missing, empty,
undecodable or oversized image, image/placeholder mismatch); batch counts stay equal across ranks.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from glob import glob
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from r1v3.data_modules.collate import VLMCollator
from r1v3.data_modules.samples import decode_sample, index_shard

log = logging.getLogger(__name__)
# Lightning warns that a mid-epoch resume cannot restore the dataloader's position; this data
# module restores it itself (its state_dict rides in the checkpoint), so the warning is misleading.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")

Sources = str | list[str] | dict[str, float] | None


def expand_shards(spec: str) -> list[str]:
    """A directory, a glob or a brace pattern (``train-{000000..000009}.tar``) → sorted tar paths."""
    import braceexpand

    paths: list[str] = []
    for part in braceexpand.braceexpand(spec):
        if os.path.isdir(part):
            paths += sorted(glob(os.path.join(part, "*.tar")))
        elif any(c in part for c in "*?["):
            paths += sorted(glob(part))
        else:
            paths.append(part)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing or not paths:
        raise FileNotFoundError(f"no shards found for {spec!r}" + (f" (missing {missing[0]})" if missing else ""))
    return paths


@dataclass
class Source:
    shards: list[str]
    weight: float
    index: list[list[tuple[str, dict]]]  # per shard

    @property
    def size(self) -> int:
        return sum(len(s) for s in self.index)


def load_sources(spec: Sources) -> list[Source]:
    if spec is None:
        return []
    weighted = spec.items() if isinstance(spec, dict) else [(s, 1.0) for s in ([spec] if isinstance(spec, str) else spec)]
    sources = []
    for pattern, weight in weighted:
        shards = expand_shards(pattern)
        sources.append(Source(shards, float(weight), [index_shard(p) for p in shards]))
    return sources


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(p)) for p in parts])


def _source_order(source: Source, seed: int, cycle: int, shuffle: bool) -> list[tuple[int, int]]:
    shard_ids = list(range(len(source.shards)))
    if shuffle:
        shard_ids = list(_rng(seed, cycle, 1).permutation(shard_ids))
    order = []
    for s in shard_ids:
        members = np.arange(len(source.index[s]))
        if shuffle:
            members = _rng(seed, cycle, 2, s).permutation(members)
        order += [(s, int(m)) for m in members]
    return order


def epoch_plan(sources: Sequence[Source], seed: int, epoch: int, shuffle: bool,
               length: int | None = None) -> list[tuple[int, int, int]]:
    """The epoch's global sample order as (source, shard, member) triples."""
    if len(sources) == 1 and length is None:
        return [(0, s, m) for s, m in _source_order(sources[0], seed, epoch, shuffle)]
    if not shuffle and length is None:  # evaluation: every sample of every source once, in order
        return [(i, s, m) for i, src in enumerate(sources) for s, m in _source_order(src, seed, epoch, False)]
    length = length or sum(src.size for src in sources)
    weights = np.array([src.weight for src in sources], dtype=float)
    picks = _rng(seed, epoch, 3).choice(len(sources), size=length, p=weights / weights.sum())
    # Each source cycles through its own reshuffled order; the cycle count carries over epochs
    # deterministically because it is derived from (epoch, position), not from stored state.
    plan, cursors = [], {}
    for src_id in picks:
        src = sources[src_id]
        pos = cursors.get(src_id, epoch * length)  # distinct offsets per epoch
        cycle, within = divmod(pos, src.size)
        order = _source_order(src, seed + 7919 * src_id, cycle, shuffle)
        plan.append((int(src_id), *order[within]))
        cursors[src_id] = pos + 1
    return plan


class ShardStream(IterableDataset):
    """Batches of one rank's share of an epoch plan. See the module docstring."""

    def __init__(self, sources: list[Source], batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, samples_per_epoch: int | None = None,
                 collate: Callable | None = None, rank: int = 0, world_size: int = 1):
        self.sources, self.batch_size, self.seed, self.shuffle = sources, batch_size, seed, shuffle
        self.drop_last, self.samples_per_epoch, self.collate = drop_last, samples_per_epoch, collate
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        # (epoch, samples of its plan already consumed, batches that took in the saved run)
        self.skip: tuple[int, int, int] = (0, 0, 0)

    def skipped(self, epoch: int) -> int:
        return self.skip[1] if self.skip[0] == epoch else 0

    def rank_plan(self, epoch: int) -> list[tuple[int, int, int]]:
        plan = epoch_plan(self.sources, self.seed, epoch, self.shuffle, self.samples_per_epoch)[self.skipped(epoch):]
        if self.drop_last:
            per_rank = len(plan) // self.world_size
        else:  # evaluation: every sample once; ranks short of one wrap around, as DistributedSampler does
            per_rank = math.ceil(len(plan) / self.world_size)
            plan = plan + plan[: per_rank * self.world_size - len(plan)]
        return plan[self.rank::self.world_size][:per_rank]

    def num_batches(self, epoch: int = 0) -> int:
        """Batches in this rank's share of ``epoch``, counting those a resumed run consumed before
        its interruption: the epoch length Lightning's loop expects, whatever the world size then."""
        n = len(self.rank_plan(epoch))
        left = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return left + (self.skip[2] if self.skip[0] == epoch else 0)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        plan = self.rank_plan(self.epoch)
        n_batches = len(plan) // self.batch_size if self.drop_last else math.ceil(len(plan) / self.batch_size)
        handles: dict[tuple[int, int], Any] = {}
        try:
            for j in range(worker, n_batches, workers):
                refs = plan[j * self.batch_size:(j + 1) * self.batch_size]
                skipped: Counter = Counter()
                samples = []
                for ref in refs:
                    sample, reason = self._read(ref, handles)
                    if sample is None:
                        skipped[reason] += 1
                    else:
                        samples.append(sample)
                if self.collate is None:
                    batch = {"samples": samples, "skipped": dict(skipped)}
                elif samples:
                    batch = self.collate(samples, skipped)
                else:
                    batch = {"inputs": None, "meta": {}, "skipped": dict(skipped)}
                # After this batch, every rank has consumed this many samples of the epoch's plan.
                # and the epoch's batches so far, as Lightning's loop counts them over restarts.
                consumed = self.skipped(self.epoch) + (j + 1) * self.batch_size * self.world_size
                batches = (self.skip[2] if self.skip[0] == self.epoch else 0) + j + 1
                batch["position"] = torch.tensor([self.epoch, consumed, batches])
                yield batch
        finally:
            for f in handles.values():
                f.close()

    def _read(self, ref, handles) -> tuple[dict | None, str]:
        src_id, shard_id, member_id = ref
        src = self.sources[src_id]
        key, members = src.index[shard_id][member_id]
        if (src_id, shard_id) not in handles:
            handles[(src_id, shard_id)] = open(src.shards[shard_id], "rb")
        f = handles[(src_id, shard_id)]

        def read(ext):
            offset, size = members[ext]
            f.seek(offset)
            return f.read(size)

        return decode_sample(key, members, read)


class StatefulLoader:
    """A DataLoader over a ShardStream that knows its epoch and where to resume."""

    def __init__(self, stream: ShardStream, num_workers: int = 0, epoch_fn: Callable[[], int] | None = None):
        self.stream, self.num_workers, self.epoch_fn = stream, num_workers, epoch_fn
        self.resume: tuple[int, int, int] | None = None  # (epoch, samples consumed, batches that took)

    def __len__(self) -> int:
        epoch = self.epoch_fn() if self.epoch_fn else self.stream.epoch
        if self.resume is not None:
            self.stream.skip = self.resume
        return self.stream.num_batches(epoch)

    def __iter__(self):
        epoch = self.epoch_fn() if self.epoch_fn else self.stream.epoch
        self.stream.epoch = epoch
        if self.resume is not None:
            self.stream.skip = self.resume  # ignored in another epoch
            self.resume = None
        elif self.stream.skip[0] != epoch:
            self.stream.skip = (epoch, 0, 0)
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            persistent_workers=False)  # workers must see each epoch's settings
        yield from loader
        if self.epoch_fn is None:
            self.stream.epoch += 1


class WebDataModule(LightningDataModule):
    def __init__(
        self,
        train: Sources = None,
        val: Sources = None,
        test: Sources = None,
        predict: Sources = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        max_prompt_length: int = 1024,
        on_overlong: Literal["error", "skip"] = "error",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_tiles: int | None = None,
        system_prompt: str | None = None,
        shuffle_images_control: bool = False,
        processor_path: str | None = None,
    ):
        """Streams image-text WebDataset shards for training, validation, test and prediction.

        Args:
            train: Shards for training: a directory, glob or brace pattern, a list of them, or a
                mapping ``{pattern: weight}`` to mix several sources.
            val: Shards for validation (same forms; not shuffled).
            test: Shards for testing.
            predict: Shards for prediction.
            batch_size: Samples per batch on each rank.
            val_batch_size: Batch size for validation/test/predict (default: ``batch_size``).
            num_workers: DataLoader worker processes per rank.
            seed: Seed of the sample order; the order is a function of (seed, epoch, rank).
            samples_per_epoch: Planned samples per epoch (default: all samples of all sources).
            max_prompt_length: Longest prompt in tokens, image tokens included.
            on_overlong: What a longer prompt does: ``error`` stops with a message, ``skip`` drops
                and counts the sample.
            min_pixels: Qwen2.5-VL: smallest image area after resizing (unset: the checkpoint's).
            max_pixels: Qwen2.5-VL: largest image area after resizing (unset: the checkpoint's).
            max_tiles: InternVL: most tiles per image, plus a thumbnail (1 = no tiling; unset: the
                checkpoint's own setting, up to 12 in InternVL3).
            system_prompt: Optional system message for every prompt.
            shuffle_images_control: Control runs only: train on questions paired with other
                samples' images, to show the model reads the image.
            processor_path: Processor to collate with when no LightningModule provides one.
        """
        super().__init__()
        self.save_hyperparameters()
        self.specs = {"train": train, "val": val, "test": test, "predict": predict}
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.seed, self.samples_per_epoch = num_workers, seed, samples_per_epoch
        self.collate_options = dict(max_prompt_length=max_prompt_length, on_overlong=on_overlong,
                                    system_prompt=system_prompt, min_pixels=min_pixels,
                                    max_pixels=max_pixels, max_tiles=max_tiles)
        self.shuffle_images_control = shuffle_images_control
        self.processor_path = processor_path
        self.processor = None
        self.collate_mode = "sft"
        self._sources: dict[str, list[Source]] = {}
        self._consumed: tuple[int, int, int] | None = None  # (epoch, samples consumed, batches that took)
        self._loaders: dict[str, StatefulLoader] = {}

    # -- wiring -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if self.processor is None:
            if module is not None and getattr(module, "processor", None) is not None:
                self.processor = module.processor
            elif self.processor_path:
                from r1v3.backbone import load_processor

                self.processor = load_processor(self.processor_path)
            else:
                raise ValueError("WebDataModule needs a processor: use it with an r1v3 stage or set processor_path")
        if module is not None:
            self.collate_mode = getattr(module, "collate_mode", self.collate_mode)
        for split, spec in self.specs.items():
            if spec is not None and split not in self._sources:
                self._sources[split] = load_sources(spec)

    def _rank(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def _loader(self, split: str) -> StatefulLoader:
        if split not in self._sources:
            raise ValueError(f"no {split} shards configured (set --data.init_args.{split})")
        training = split == "train"
        rank, world = self._rank()
        module = self.trainer.lightning_module if self.trainer is not None else None
        collate = VLMCollator(self.processor, mode=self.collate_mode, family=getattr(module, "family", None),
                              image_check=getattr(module, "image_token_check", None),
                              shuffle_images=training and self.shuffle_images_control,
                              seed=self.seed, **self.collate_options)
        stream = ShardStream(self._sources[split], self.batch_size if training else self.val_batch_size,
                             seed=self.seed, shuffle=training, drop_last=training,
                             samples_per_epoch=self.samples_per_epoch if training else None,
                             collate=collate, rank=rank, world_size=world)
        epoch_fn = (lambda: self.trainer.current_epoch) if (training and self.trainer is not None) else None
        loader = StatefulLoader(stream, self.num_workers, epoch_fn)
        if training and self._consumed is not None:
            loader.resume = self._consumed
        self._loaders[split] = loader
        return loader

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        # No val shards during fit simply means no validation loop.
        return self._loader("val") if "val" in self._sources else []

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("predict")

    # -- position tracking: a batch counts as consumed when it reaches the training step -------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is None or self.trainer.training:
            self.mark_consumed(batch)
        return batch

    def mark_consumed(self, batch: dict) -> None:
        self._consumed = tuple(int(x) for x in batch["position"])

    def state_dict(self) -> dict:
        rank, world = self._rank()
        state = {"seed": self.seed, "world_size": world, "batch_size": self.batch_size}
        if self._consumed is not None:
            state["epoch"], state["consumed_samples"], state["epoch_batches"] = self._consumed
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; the world size and batch size may differ from the saved run's
        (the rest of the epoch is re-split over the ranks there are now), the seed may not."""
        if "next_batch" in state:  # saved before positions counted samples: batches x batch size x ranks
            state = dict(state, consumed_samples=state["next_batch"] * state["batch_size"] * state["world_size"])
        if "consumed_samples" not in state:
            return
        if state.get("seed") != self.seed:
            raise ValueError(f"cannot resume the data stream exactly: seed was {state.get('seed')} when saved "
                             f"and is {self.seed} now")
        done = state.get("epoch_batches", state["consumed_samples"] // (state["batch_size"] * state["world_size"]))
        self._consumed = (state["epoch"], state["consumed_samples"], done)
        rank, world = self._rank()
        if (state.get("world_size"), state.get("batch_size")) != (world, self.batch_size) and self.trainer is not None:
            # Lightning reads an epoch's length once per loader; the resumed epoch's (its batches
            # before the restart plus the rest re-split) is not the next epochs', so reload then.
            self.trainer.reload_dataloaders_every_n_epochs = 1
        if "train" in self._loaders:
            self._loaders["train"].resume = self._consumed
