"""Throughput per joule: samples (and tokens) trained in each interval over its training energy.

Real Lightning and HF trainers and MLflow stores; the GPU is simulated at a constant 100 W on a
work clock that moves 0.01 s per training step, so every step costs exactly 1 J and evaluations 0 J.
"""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl
import pytest
import torch
from test_hf_monitor import tracking  # noqa: F401 - fixture
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from green_callbacks import lightning as gl
from green_callbacks import transformers as gt
from green_callbacks.throughput import BatchCounter

from helpers import digits_loaders, hf_work_clock, history, lightning_digits_module, runs, work_clock

pytestmark = pytest.mark.alone  # timings and per-sample energy measured side by side

STEP_J = 1.0


@pytest.fixture
def gpu(fake_nvml):
    fake_nvml.configure([{"profile": [[1.0, 100.0]]}], work_clock=True)
    return fake_nvml


def expected_per_j(point_steps: list[int], samples_at: dict[int, int], first: int) -> list[tuple[int, float]]:
    """Each point's interval (previous point, this point]: its samples over its steps' joules."""
    out, prev = [], first
    for step in point_steps:
        if step > prev:
            out.append((step, sum(samples_at[s] for s in range(prev + 1, step + 1)) / ((step - prev) * STEP_J)))
        prev = max(prev, step)
    return out


def test_lightning_samples_per_joule_per_interval(tmp_path, gpu, tracking):  # noqa: F811
    train, val = digits_loaders(batch_size=64)  # 1,437 samples: 22 batches of 64 and one of 29 an epoch
    monitor = gl.EnergyMonitor(gpus="all", measure_cpu=False, log_every_n_steps=5, log_artifacts=False,
                               output_dir=str(tmp_path / "out"))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[monitor, work_clock(gpu, train_s=STEP_J / 100, val_s=STEP_J / 200)])
    trainer.fit(lightning_digits_module()(), train, val)
    client, (run,) = runs(tracking)
    samples_at = {s: 29 if s % 23 == 22 else 64 for s in range(46)}
    expected = expected_per_j([r.step for r in monitor.records], samples_at, first=-1)
    assert [s for s, _ in expected][:6] == [4, 9, 14, 19, 22, 24]
    logged = history(client, run.info.run_id, "throughput/samples_per_j")
    assert logged == [(s, pytest.approx(v, rel=1e-3)) for s, v in expected]
    # the same value from the records: a logging point's interval has no evaluation in it (the first one's sanity
    # check, 0.5 J a batch as every validation batch here, is no training: it is left out as an evaluation is)
    points = [r for r in monitor.records if r.kind.value == "point"]
    by_step = dict(logged)
    for r in points[1:]:
        samples = sum(samples_at[s] for s in range(r.start_step + 1, r.step + 1))
        assert by_step[r.step] == pytest.approx(samples / r.energy_j, rel=1e-3)
    assert "throughput/tokens_per_j" not in run.data.metrics


class Tokens(torch.utils.data.Dataset):
    """Sequences of 16 token ids, 10 of them real and 6 padding: 10 tokens a sample, not 16."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 50, (n, 16), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = torch.tensor([1] * 10 + [0] * 6)
        return {"input_ids": self.ids[i] * mask, "attention_mask": mask, "labels": self.labels[i]}


def test_hf_samples_and_tokens_per_joule_counted_at_the_models_forward(tmp_path, gpu, tracking):  # noqa: F811
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)  # built from a config: nothing downloaded
    monitor = gt.EnergyMonitor(gpus="all", measure_cpu=False, log_every_n_steps=5, log_artifacts=False,
                               output_dir=str(tmp_path / "out"))
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=20, eval_strategy="steps", eval_steps=10,
                             per_device_train_batch_size=4, per_device_eval_batch_size=16, report_to="none",
                             use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    Trainer(model=model, args=args, train_dataset=Tokens(64), eval_dataset=Tokens(32),
            # the step's work is done before HF's on_step_end opens the evaluation window at steps 10 and 20
            callbacks=[hf_work_clock(gpu, train_s=STEP_J / 100), monitor]).train()
    client, (run,) = runs(tracking)
    rid = run.info.run_id
    # 16 steps an epoch: points every 5 steps, the evaluations at 10 and 20, the epoch's end at 16
    expected = expected_per_j([r.step for r in monitor.records], dict.fromkeys(range(1, 21), 4), first=0)
    assert [s for s, _ in expected] == [5, 10, 15, 16, 20]
    assert history(client, rid, "throughput/samples_per_j") == [(s, pytest.approx(4.0, rel=1e-3)) for s, _ in expected]
    # the attention mask's sum, not the padded length: 10 tokens a sample (evaluation batches not counted)
    assert history(client, rid, "throughput/tokens_per_j") == [(s, pytest.approx(40.0, rel=1e-3))
                                                              for s, _ in expected]
    assert monitor._count_hook is None  # removed at the end of training


def test_counter_defers_a_device_masks_sum_to_the_point():
    class DeviceMask:
        """An accelerator tensor's surface: a device, and a sum that stays on it until read."""

        device = torch.device("meta")

        def __init__(self, total: int) -> None:
            self.total = total

        def sum(self):
            return Lazy(self.total)

    class Lazy:
        reads = 0

        def __init__(self, value: int) -> None:
            self.value = value

        def add_(self, other):
            self.value += other.value
            return self

        def item(self):
            Lazy.reads += 1
            return self.value

    counter = BatchCounter()
    for total in (30, 12):
        counter.add({"input_ids": torch.zeros(4, 16), "attention_mask": DeviceMask(total)})
    assert Lazy.reads == 0  # nothing read per batch
    assert counter.take() == (8, 42) and Lazy.reads == 1
    counter.add({"input_ids": torch.zeros(2, 16)})  # no mask: every position is a token
    counter.add((torch.zeros(3, 64), torch.zeros(3)))  # no input_ids: samples only
    assert counter.take() == (5, 32)
    assert counter.take() == (0, None)


@dataclasses.dataclass
class Pair:
    features: torch.Tensor
    targets: torch.Tensor


def test_counter_reads_batches_as_data_pipelines_hand_them_over():
    import numpy as np


    ids = torch.arange(32).reshape(4, 8)
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[:, 6:] = 0  # 6 real tokens a sample, 24 in the batch
    cases = {
        "tensors": ({"input_ids": ids, "attention_mask": mask}, (4, 24)),
        "numpy arrays (numpy 2's device is the string 'cpu')": (
            {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, (4, 24)),
        "numpy ids, no mask": ({"input_ids": ids.numpy()}, (4, 32)),
        "a tokenizer's plain lists": ({"input_ids": ids.tolist(), "attention_mask": mask.tolist()}, (4, 24)),
        "plain lists, no mask": ({"input_ids": ids.tolist()}, (4, 32)),
        "(inputs, labels)": (({"input_ids": ids, "attention_mask": mask}, torch.zeros(4)), (4, 24)),
        "[features, targets] as mappings": ([{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids}], (4, 24)),
        "a one-element list": ([{"input_ids": ids, "attention_mask": mask}], (4, 24)),
        "CombinedLoader's dict of [x, y]": ({"a": [torch.zeros(16, 3), torch.zeros(16)],
                                             "b": [torch.zeros(16, 3), torch.zeros(16)]}, (16, None)),
        "a field that is a list of tensors": ({"x": [torch.zeros(16, 3), torch.zeros(16, 2)]}, (16, None)),
        "labels as a list": ({"labels": [0, 1, 1]}, (3, None)),
        "numpy labels as a list": ({"labels": [np.int64(1)] * 5}, (5, None)),
        "samples not collated (plain lists)": ([{"input_ids": [1, 2, 3, 4, 5]}, {"input_ids": [1, 2, 3]}], (2, 8)),
        "samples not collated (tensors)": ([{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(4)],
                                           (4, 24)),
        "ragged rows of tensors": ({"input_ids": [ids[0], ids[1][:5]], "attention_mask": [mask[0], mask[1][:5]]},
                                   (2, 11)),
        "an image processor's list of arrays": ({"pixel_values": [np.zeros((3, 8, 8))] * 8}, (8, None)),
        "strings": (["a", "b", "c", "d"], (4, None)),
        "(features, targets) as lists": (([0.5, 1.5, 2.5], [0, 1, 0]), (3, None)),
        "a dataclass": (Pair(torch.zeros(5, 3), torch.zeros(5)), (5, None)),
    }
    for name, (batch, counts) in cases.items():
        counter = BatchCounter()
        counter.add(batch)
        assert counter.take() == counts, name


def test_a_batch_it_cannot_count_costs_the_count_not_the_steps_points_and_budget(tmp_path, gpu, green_log):
    import numpy as np

    from green_callbacks import EnergyTracker
    from green_callbacks.stopping import BudgetStopper

    class Mask:
        """A mask of some library's own type whose sum fails."""

        device = "cpu"

        def sum(self):
            raise RuntimeError("cannot sum this")

    batches = {"numpy": {"input_ids": np.ones((4, 8), dtype=np.int64), "attention_mask": np.ones((4, 8))},
               "a mask that cannot be summed": {"input_ids": np.ones((4, 8)), "attention_mask": Mask()}}
    for name, batch in batches.items():
        tracker = EnergyTracker(gpus="all", measure_cpu=False, mlflow=False, log_every_n_steps=5,
                                output_dir=str(tmp_path / name))
        tracker.attach(BudgetStopper(energy="20 J", check_every_n_steps=2, on_exceed="stop"))
        with tracker:
            for step in range(100):
                gpu.advance(STEP_J / 100)
                tracker.step(step, batch=batch)
                if tracker.should_stop:
                    break
        assert step < 25, name  # 1 J a step: checked every 2 steps, stopped before the 20 J budget's end
        assert [r.step for r in tracker.records if r.kind.value == "point"][:2] == [4, 9], name
    assert not [m for m in green_log.messages if "on_step failed" in m]
    assert sum("count_batch failed" in m for m in green_log.messages) == 1  # the count alone, said once


@pytest.mark.gpu
def test_counting_a_cuda_batch_never_synchronises_the_device():
    """torch's sync debug mode raises on any synchronising call: counting a CUDA batch makes none."""
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    mask = torch.ones(8, 128, dtype=torch.long, device="cuda")
    mask[:, 100:] = 0
    batch = {"input_ids": torch.ones(8, 128, dtype=torch.long, device="cuda"), "attention_mask": mask}
    counter = BatchCounter()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            counter.add(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert counter.take() == (24, 3 * 8 * 100)
