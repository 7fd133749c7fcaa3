"""Rank facts and the one collective each window needs: gather every rank's joules on all ranks."""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in a (possibly multi-node) job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node: str = ""

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    @property
    def measures_host(self) -> bool:
        """CPU and DRAM belong to the node: measured once per node, by its local rank 0."""
        return self.local_rank == 0

    @classmethod
    def from_env(cls) -> RankInfo:
        """From torch.distributed when it is up, else torchrun's / SLURM's environment."""
        rank = _env_int(("RANK", "SLURM_PROCID"), 0)
        local = _env_int(("LOCAL_RANK", "SLURM_LOCALID"), 0)
        world = _env_int(("WORLD_SIZE", "SLURM_NTASKS"), 1)
        dist = _dist()
        if dist is not None:
            rank, world = dist.get_rank(), dist.get_world_size()
        return cls(rank, local, world, node_name())


def _env_int(names: tuple[str, ...], default: int) -> int:
    """The first of ``names`` set in the environment, as an integer >= 0 (an error naming it otherwise)."""
    for name in names:
        text = os.environ.get(name, "").strip()
        if text:  # (set but empty: as unset)
            try:
                value = int(text)
            except ValueError:
                value = -1
            if value < 0:
                raise ValueError(f"the environment variable {name}={text!r} must be an integer >= 0 (the launcher "
                                 "sets it: torchrun, Slurm); unset it or set it right") from None
            return value
    return default


NODE_INDEX_VARS = ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID")  # torchrun, Lightning, Slurm


def node_name(index: int | None = None) -> str:
    """This process's node: ``node<i>`` from the launcher's node index (``index``, else torchrun's
    ``GROUP_RANK``, Lightning's ``NODE_RANK`` or Slurm's ``SLURM_NODEID``), else the host name.

    The launcher's index, not the host name, tells nodes apart: two nodes of a job may share a host
    (a test, containers on one machine), and a node's CPU must still be counted once per node.
    """
    if index is None:
        found = next((os.environ[v] for v in NODE_INDEX_VARS if os.environ.get(v, "").strip().isdigit()), None)
        index = int(found) if found is not None else None
    return f"node{index}" if index is not None else socket.gethostname()


def _dist() -> Any:
    """``torch.distributed`` when a process group is initialised, else ``None`` (no torch import)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a process group).

    Collective: every rank must call it at the same point, as with any all-gather.
    """
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (the decision all ranks must share)."""
    return any(gather(bool(flag)))


ALIKE = {"green_alike_on_every_rank": True}
"""``extra=`` of a warning drawn from what every rank shares (the merged joules, the budget's totals): said once for the
job, by rank 0, as Lightning's own callbacks say what every rank decided alike (a warning about a rank's own
device or metrics is said where it happened)."""


class _OnRankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "green_alike_on_every_rank", False)


_ON_RANK_ZERO = _OnRankZero()


def speak_as(rank: RankInfo) -> None:
    """In a process of rank ``rank``: the warnings marked :data:`ALIKE` are dropped unless it is rank 0."""
    logger = logging.getLogger("green_callbacks")
    if rank.is_zero:
        logger.removeFilter(_ON_RANK_ZERO)
    else:
        logger.addFilter(_ON_RANK_ZERO)  # (once: a logger's filters are a set)
