"""Sharding an evaluation over processes started by `accelerate launch` (or torchrun).

Every process evaluates every `world_size`-th pending sample and appends its records to its own
shard file in the (shared) run directory; after a barrier the main process reads all shards, puts
the records in question-file order and computes the metrics. Per-sample work does not depend on
the sharding (one sample per forward pass), so the numbers equal a single-process run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence, TypeVar

import torch

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass
class ProcessInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    _state: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self._state is not None and self.world_size > 1:
            self._state.wait_for_everyone()

    def shard(self, items: Sequence[T]) -> list[T]:
        return list(items[self.rank :: self.world_size])


def process_info(device: str | None = None) -> ProcessInfo:
    """This process's place in a launched group (a single process when nothing was launched)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        dev = (
            torch.device(device)
            if device
            else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        )
        return ProcessInfo(0, 1, dev)
    from accelerate import PartialState

    state = PartialState(cpu=(device == "cpu"))
    dev = torch.device("cpu") if device == "cpu" else state.device  # one accelerator per process
    logger.info("process %d of %d on %s", state.process_index, state.num_processes, dev)
    return ProcessInfo(state.process_index, state.num_processes, dev, state)
