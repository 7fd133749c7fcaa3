"""Throughput per joule: the samples (and tokens) trained in each interval, counted per batch without a device sync.

A batch's samples are its leading dimension (:func:`~green_callbacks.records.batch_size`): shape
metadata, free on any device. Tokens are counted where the batch is a mapping with ``input_ids``:
the sum of its ``attention_mask`` where present (padding is not work), else ``input_ids.numel()``.
On the CPU the sum is taken at once; on an accelerator ``mask.sum()`` is queued into a running
device tensor (asynchronous, no sync), read once per interval, at the point, where the meter has
already synchronised the device for its window edge. So no batch waits for the device.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from green_callbacks.process import never_raises
from green_callbacks.records import batch_size, throughput_metrics, uncollated


class BatchCounter:
    """Samples and tokens since the last :meth:`take`; tokens stay ``None`` until a batch carries ``input_ids``."""

    def __init__(self) -> None:
        self.samples = 0
        self.tokens: int | None = None
        self._device_tokens: Any = None  # a 0-d device tensor: the queued attention-mask sums

    def add(self, batch: Any) -> None:
        if type(batch) in (list, tuple) and batch:  # the usual (inputs, targets): a few attribute reads
            shape = getattr(batch[0], "shape", None)
            if shape:
                self.samples += int(shape[0])
                return
        self.samples += batch_size(batch)
        if isinstance(batch, Mapping):
            self._count_tokens(batch)
        elif type(batch) in (list, tuple) and batch and isinstance(batch[0], Mapping):
            for part in batch if uncollated(batch) else batch[:1]:  # samples; or (inputs, labels): the inputs'
                self._count_tokens(part)

    def _on_device(self, total: Any) -> None:
        """A mask's sum queued on the device, read in :meth:`take`."""
        if self._device_tokens is None:
            self._device_tokens = total
        else:
            self._device_tokens.add_(total)
        self.tokens = self.tokens or 0

    def _count_tokens(self, batch: Mapping[str, Any]) -> None:
        mask, ids = batch.get("attention_mask"), batch.get("input_ids")
        rows = mask if isinstance(mask, list | tuple) and mask else None
        # a torch tensor's device has a type; numpy's (2.x) device is the string 'cpu': summed at once
        if hasattr(mask, "sum") and _accelerated(mask):
            self._on_device(mask.sum())
        elif rows is not None and hasattr(rows[0], "sum") and _accelerated(rows[0]):  # ragged rows on the device
            self._on_device(functools.reduce(lambda a, b: a + b, (r.sum() for r in rows)))
        elif hasattr(mask, "sum"):
            self.tokens = (self.tokens or 0) + int(mask.sum())
        elif hasattr(ids, "numel"):
            self.tokens = (self.tokens or 0) + int(ids.numel())
        elif hasattr(ids, "size") and hasattr(ids, "shape"):  # numpy
            self.tokens = (self.tokens or 0) + int(ids.size)
        elif isinstance(mask, list | tuple) or isinstance(ids, list | tuple):  # a tokenizer's lists, no tensors
            tokens = _list_tokens(mask, ids)
            if tokens is not None:
                self.tokens = (self.tokens or 0) + tokens

    def take(self) -> tuple[int, int | None]:
        """The counts since the previous call, as plain ints (they travel in the ranks' all-gather)."""
        tokens = self.tokens
        if self._device_tokens is not None:
            tokens = (tokens or 0) + int(self._device_tokens.item())
        out = (self.samples, tokens)
        self.samples, self.tokens, self._device_tokens = 0, None, None
        return out


def _accelerated(value: Any) -> bool:
    return getattr(getattr(value, "device", None), "type", "cpu") != "cpu"


def _list_tokens(mask: Any, ids: Any) -> int | None:
    """Tokens in a tokenizer's plain lists: the mask's ones where there is a mask, else the ids; one sample's flat
    list, or a batch's rows (lists, or tensors of ragged lengths). ``None``: an empty list, no token known."""
    is_mask = isinstance(mask, list | tuple)
    rows = mask if is_mask else ids
    if not rows:
        return None
    if isinstance(rows[0], list | tuple):
        return sum(int(sum(r)) if is_mask else len(r) for r in rows)
    if hasattr(rows[0], "shape"):  # a tensor (or array) per sample
        return sum(int(r.sum()) if is_mask else int(getattr(r, "numel", lambda r=r: r.size)()) for r in rows)
    return int(sum(rows)) if is_mask else len(rows)


class ThroughputHost:
    """The throughput half of :class:`~green_callbacks.tracker.EnergyTracker`: counts batches, sums them per point."""

    started: bool

    @functools.cached_property
    def batch_counter(self) -> BatchCounter:
        """Built at first use, then a plain instance attribute (read at every batch: no call)."""
        return BatchCounter()

    @never_raises
    def count_batch(self, batch: Any) -> None:
        """Count one training (micro-)batch's samples and tokens into the open interval."""
        if self.started:
            self.batch_counter.add(batch)

    def take_work(self) -> tuple[int, int | None]:
        """This rank's samples and tokens since the previous point (for the point's all-gather)."""
        return self.batch_counter.take()

    @staticmethod
    def throughput_of(works: Sequence[tuple[int, int | None]], training_j: float) -> dict[str, float]:
        """``throughput/*_per_j`` of one interval: every rank's samples (tokens) over its training joules."""
        tokens = [t for _, t in works if t is not None]
        return throughput_metrics(sum(s for s, _ in works), sum(tokens) if tokens else None, training_j)
