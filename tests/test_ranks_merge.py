"""Every rank's window under job-wide labels (ranks.merge_ranks, records.device_tags): the payloads are the plain
data the ranks all-gather (ranks.window_payload), written out here as a rank sends them."""

from __future__ import annotations

from green_callbacks.ranks import merge_ranks
from green_callbacks.records import device_tags


def payload(rank, gpus, node="n1", stale=(), duration_s=1.0, peak=None):
    """One rank's window: ``gpus`` maps a label to (joules, method, physical id)."""
    return {"rank": rank, "node": node, "duration_s": duration_s, "stale": list(stale),
            "joules": {"gpu": {d: j for d, (j, _, _) in gpus.items()}},
            "methods": {"gpu": {d: m for d, (_, m, _) in gpus.items()}},
            "ids": {d: i for d, (_, _, i) in gpus.items() if i},
            "peak": {"gpu": peak if peak is not None else sum(j for j, _, _ in gpus.values()) / duration_s}}


def test_a_gpu_two_ranks_measure_is_counted_once_from_the_rank_that_read_it():
    """gpus="all" on a node: rank 0's handle for GPU-A failed (0 J, unavailable) while rank 1 read it. The first
    rank's copy was taken: GPU-A logged as 0 J and unread."""
    ranks = [payload(0, {"gpu0": (0.0, "unavailable", "GPU-A"), "gpu1": (200.0, "counter", "GPU-B")}),
             payload(1, {"gpu0": (100.0, "counter", "GPU-A"), "gpu1": (201.0, "counter", "GPU-B")})]
    merged = merge_ranks(ranks)
    assert merged.devices == {"gpu": {"gpu0": 100.0, "gpu1": 200.0}}, "each GPU once, under its first label"
    assert merged.unread == frozenset() and merged.methods == {"gpu": "counter"}
    assert merged.watts["gpu"] == 300.0 and merged.rank_j == {0: 200.0, 1: 100.0}
    assert set(merged.shared) == {"GPU-A", "GPU-B"} and merged.shared["GPU-A"] == (0, 1)
    names = [{"gpu": {"gpu0": "unknown (GPU-A)", "gpu1": "H100 (GPU-B)"}, "gpu_ids": {"gpu0": "GPU-A", "gpu1": "GPU-B"},
              "where": {"node": "n1"}},
             {"gpu": {"gpu0": "H100 (GPU-A)", "gpu1": "H100 (GPU-B)"}, "gpu_ids": {"gpu0": "GPU-A", "gpu1": "GPU-B"},
              "where": {"node": "n1"}}]
    assert device_tags(names)["green.gpu_names"] == "gpu0 = cuda:0 H100 (GPU-A); gpu1 = cuda:1 H100 (GPU-B)"


def test_only_the_same_gpu_on_one_node_seen_by_two_ranks_is_merged():
    """Two cards of one process with one id (amdsmi without a unique id; their bus tells them apart in the id, and
    a process never lists a card twice), the same id on two nodes, or a GPU of unknown id: each counted."""
    one_process = merge_ranks([payload(0, {"gpu0": (10.0, "counter", "X"), "gpu1": (20.0, "counter", "X")})])
    assert one_process.devices == {"gpu": {"gpu0": 10.0, "gpu1": 20.0}} and not one_process.shared
    two_nodes = merge_ranks([payload(0, {"gpu0": (10.0, "counter", "X")}, node="a"),
                             payload(1, {"gpu0": (20.0, "counter", "X")}, node="b")])
    assert two_nodes.total_j == 30.0 and not two_nodes.shared
    unknown = merge_ranks([payload(0, {"gpu0": (10.0, "sampled", "")}), payload(1, {"gpu0": (20.0, "sampled", "")})])
    assert unknown.total_j == 30.0
    names = [{"gpu": {"gpu0": "MI300X (X)"}, "gpu_ids": {"gpu0": "X"}, "where": {"node": n}} for n in ("a", "b")]
    assert device_tags(names)["green.gpu_names"].count("MI300X") == 2


def test_a_rank_that_measures_nothing_counts_zero():
    """A CPU-only DDP rank other than a node's first has no sensor: its rank_j entry was missing (a KeyError in the
    trial evaluation's estimate, which then booked the sanity check as training)."""
    merged = merge_ranks([payload(0, {"gpu0": (10.0, "counter", "A")}),
                          {"rank": 1, "node": "n1", "duration_s": 1.0, "stale": [], "joules": {}, "methods": {},
                           "ids": {}, "peak": {}}])
    assert merged.rank_j == {0: 10.0, 1: 0.0}
