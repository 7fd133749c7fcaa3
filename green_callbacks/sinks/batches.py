"""How the sender sends metrics, params and tags: in one ``log_batch`` where MLflow takes it, else each alone.

MLflow's refusal of one entity's content (a name it refuses, a value out of range) costs only that entity, set
aside with one warning; a name refused once is sent alone from then on. An outage or a refusal of the
credentials is raised to the sender, which tries the whole batch again or stops sending.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from green_callbacks.sinks.spool import Record, Unreadable
from green_callbacks.sinks.tracking import RunClient, entities
from green_callbacks.sinks.verdicts import access_refused, describe, permanent

BATCH_KINDS = ("metrics", "params", "tags")


class BatchSending:
    """The batch half of :class:`~green_callbacks.sinks.sender.Sender` (which provides what is declared here)."""

    client: RunClient | None
    pending: list[Record | Unreadable]
    refused: set[tuple[str, str]]
    _asides: list[tuple[int, str, str, Any]]
    _again: list[tuple[int, str, Any]]
    note: Callable[..., bool]
    _set_aside: Callable[..., None]
    _done: Callable[..., None]

    def _send_batch(self) -> None:
        """The run of metrics/params/tags records at the head of the queue, in one or a few requests."""
        assert self.client is not None
        batch: list[Record] = []
        for item in self.pending:
            if not isinstance(item, Record) or item.kind not in BATCH_KINDS:
                break
            batch.append(item)
        metrics, params, tags = [], [], []
        self._asides, self._again = [], []  # written once the batch is through, not at each try
        before = set(self.refused)
        for r in batch:
            m, p, t = self._known_good(r)
            metrics += m
            params += p
            tags += t
        params = self._new_params(params)
        try:
            self.client.log_batch(metrics, params, tags)
        except Exception as exc:
            if not permanent(exc) or access_refused(exc):  # credentials refused: the whole run is (Blocked)
                raise
            self.client.check(self.client.run_id or "")  # the run itself gone: Blocked
            self._isolate(batch, before)
        for line, kind, e in self._again:
            self._alone(line, kind, e)
        for line, reason, kind, e in self._asides:
            self._set_aside(line, reason, {"kind": kind, "key": e.key, "value": getattr(e, "value", None),
                                           "step": getattr(e, "step", None)}, f"the {kind} {e.key!r}")
        self._done(batch)

    def _new_params(self, params: list[Any]) -> list[Any]:
        """MLflow refuses to change a param: a resumed run keeps its first values, with one warning."""
        if not params:
            return params
        assert self.client is not None
        existing = self.client.existing_params()
        changed = [f"{p.key}: {existing[p.key]!r} -> {p.value!r}" for p in params
                   if p.key in existing and existing[p.key] != p.value]
        if changed:
            self.note("params", "green-callbacks: MLflow params cannot change within a run; kept the first values "
                                f"({'; '.join(changed)}).")
        return [p for p in params if p.key not in existing]

    def _known_good(self, record: Record) -> tuple[list[Any], list[Any], list[Any]]:
        """A record's entities less those whose name MLflow refused before, which are sent alone after the batch:
        in the batch, a name refused again would fail it and cost a request per entity to find again; alone, it
        costs one request, and a name MLflow takes again (its refusal was of a value) is sent."""
        groups = entities(record)
        if not self.refused:
            return groups
        out: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
        for slot, kind in enumerate(("metric", "param", "tag")):
            for e in groups[slot]:
                if (kind, e.key) in self.refused:
                    self._again.append((record.line, kind, e))
                else:
                    out[slot].append(e)
        return out

    def _alone(self, line: int, kind: str, e: Any) -> None:
        """One entity in a request of its own: set aside when MLflow refuses it (again), taken off the refused
        names when it is taken; an outage or a refusal of the credentials stops the batch (tried again whole)."""
        assert self.client is not None
        alone: list[list[Any]] = [[], [], []]
        alone[("metric", "param", "tag").index(kind)] = [e]
        try:
            self.client.log_batch(*alone)
        except Exception as exc:
            if not permanent(exc) or access_refused(exc):
                raise
            self.refused.add((kind, e.key))
            self._aside(line, describe(exc), kind, e)
            return
        self.refused.discard((kind, e.key))

    def _aside(self, line: int, reason: str, kind: str, e: Any) -> None:
        """An entity of the batch being sent, to be set aside once that batch is through (a batch cut off by an
        outage is tried again, and would set the same entities aside again)."""
        self._asides.append((line, reason, kind, e))

    def _isolate(self, batch: list[Record], before: set[tuple[str, str]]) -> None:
        """A refused batch: halved until the refused metrics, params and tags stand alone, to be set aside (one name
        refused among 800 records costs about 20 requests; each alone cost 800 and held the sender a minute over
        HTTP). ``before``: the names refused earlier, left out of the batch and sent alone after it."""
        items = []
        for r in batch:
            m, p, t = entities(r)
            for kind, group in (("metric", m), ("param", self._new_params(p)), ("tag", t)):
                items += [(r.line, kind, e) for e in group if (kind, e.key) not in before]
        self._halve(items)

    def _halve(self, items: list[tuple[int, str, Any]]) -> None:
        """``items``, which MLflow refused together: each half in a request, a refused half halved again."""
        if len(items) <= 1:
            for line, kind, e in items:
                self._alone(line, kind, e)
            return
        assert self.client is not None
        for part in (items[: len(items) // 2], items[len(items) // 2:]):
            groups: list[list[Any]] = [[], [], []]
            for _, kind, e in part:
                groups[("metric", "param", "tag").index(kind)].append(e)
            try:
                self.client.log_batch(*groups)
            except Exception as exc:
                if not permanent(exc) or access_refused(exc):
                    raise
                if len(part) > 1:
                    self._halve(part)
                    continue
                (line, kind, e), = part  # refused alone: set aside (as by _alone, whose request this was)
                self.refused.add((kind, e.key))
                self._aside(line, describe(exc), kind, e)
            else:
                self.refused.difference_update((kind, e.key) for _, kind, e in part)
