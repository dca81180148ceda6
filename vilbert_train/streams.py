"""Resumable per-task batch streams.

Each task's batches come from a permutation drawn from (seed, task id, task epoch) with its own generator, so
the data order does not depend on the global RNG and a resumed run continues at the exact batch it stopped at.
Under DDP every rank reads its own slice of the same permutation (padded by wrapping, as DistributedSampler).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset, default_collate


class TaskStream:
    def __init__(self, dataset: Dataset, batch_size: int, seed: int, task_id: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        self.dataset, self.batch_size, self.seed, self.task_id = dataset, batch_size, seed, task_id
        self.rank, self.world_size, self.num_workers, self.shuffle = rank, world_size, num_workers, shuffle
        self.per_rank = math.ceil(len(dataset) / world_size)
        self.num_batches = math.ceil(self.per_rank / batch_size)
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out
        self._iterator = None

    def __len__(self) -> int:
        return self.num_batches

    def _indices(self) -> list[int]:
        count = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.task_id * 10_007 + self.epoch)
            order = torch.randperm(count, generator=generator).tolist()
        else:
            order = list(range(count))
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / count))[:total] if total > count else order
        return order[self.rank:total:self.world_size]

    def _batches(self) -> list[list[int]]:
        indices = self._indices()
        return [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]

    def _start(self) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        batches = self._batches()[self.position:]
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                            collate_fn=default_collate, generator=torch.Generator().manual_seed(self.seed),
                            pin_memory=torch.cuda.is_available())
        self._iterator = iter(loader)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next batch, starting a new (task-)epoch when this one is used up, as the reference restarts its
        loader iterator."""
        if self.position >= self.num_batches:
            self.epoch += 1
            self.position = 0
            self._iterator = None
        if self._iterator is None:
            self._start()
        batch = next(self._iterator)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._iterator = None


def eval_batches(dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0):
    """Every example once (this rank's share, no padding), in order."""
    indices = list(range(rank, len(dataset), world_size))
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=default_collate,
                      generator=torch.Generator().manual_seed(0))
