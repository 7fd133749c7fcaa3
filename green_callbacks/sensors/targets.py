"""Which GPUs a sensor measures: the indices a ``gpus`` setting names (the same rules for every vendor), and one
device found with the handle that reads it, or the reason it cannot be read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from green_callbacks.units import brief

GPU_CHOICES = ('"auto"', '"all"', "a list of device indices")


@dataclass(frozen=True)
class GpuTarget:
    """One device of this process (its index in the framework's numbering) and the handle that measures it."""

    index: int
    handle: Any  # None: not measurable (a MIG instance, a partition, an unknown id); ``reason`` says why
    name: str
    uuid: str
    reason: str = ""
    bus: str = ""  # its PCI address where the UUID alone may not tell cards apart (amdsmi's, without a unique id)

    @property
    def label(self) -> str:
        return f"gpu{self.index}"

    @property
    def measurable(self) -> bool:
        return self.handle is not None


def choose_indices(gpus: Any, cuda_indices: Any, visible: int, local_rank: str | None) -> list[int]:
    """The device indices ``gpus`` names, out of ``visible`` devices (the same rules for every vendor).

    ``"auto"``: the trainer's devices (``cuda_indices``), else this rank's ``LOCAL_RANK`` device,
    else device 0; ``"all"``: every visible device; a list: those indices, checked.
    """
    if gpus == "all":
        return list(range(visible))
    if gpus == "auto":
        if cuda_indices is not None:
            return list(cuda_indices)
        if local_rank is not None and visible:
            return [int(local_rank) % visible]
        return [0] if visible else []
    if isinstance(gpus, str):
        raise ValueError(f"gpus={brief(gpus)} is not valid; choose {', '.join(GPU_CHOICES)}")
    from green_callbacks.validation import check_gpus  # (validation imports the sensors)

    chosen = check_gpus(gpus) or []  # integers >= 0, each once: [0.5] was read as GPU 0
    bad = [i for i in chosen if not 0 <= i < visible]
    if bad:
        raise ValueError(
            f"gpus={brief(list(gpus))}: device(s) {bad} do not exist; this process sees "
            f"{visible} GPU(s), valid indices are {list(range(visible))}"
        )
    return chosen
