"""HF Trainer under torchrun (2 CPU processes, gloo) with EnergyMonitor; each rank's GPU is simulated.

Usage: torchrun --nproc_per_node 2 hf_ddp.py TRACKING_URI OUT_DIR [stop|shared]. With ``stop``, an
EnergyBudget ends training early; each rank writes the epoch it stopped at to stopped-rank{r}.txt. With ``shared``,
every rank sees the node's GPUs (the fake's configuration says which) and measures them all (``gpus="all"``).
"""

import json
import sys
from pathlib import Path

from transformers import Trainer, TrainerCallback, TrainingArguments

from green_callbacks.transformers import EnergyBudget, EnergyMonitor

from helpers import DigitsDataset, digits_tensors, hf_accuracy, hf_digits_model, lag_slack


class Truth(TrainerCallback):
    def __init__(self, monitor, out):
        self.monitor, self.out, self.truth, self.durations, self.lags = monitor, out, [], [], []

    def on_evaluate(self, args, state, control, **kwargs):
        import pynvml

        if len(pynvml.devices()) != 1:  # (shared: the test knows each GPU's constant power)
            return
        (dev,) = pynvml.devices()
        w = self.monitor.last_window
        self.truth.append(dev.energy_between(w.start_s, w.end_s))
        self.durations.append(w.duration_s)
        self.lags.append(lag_slack(dev, w))
        Path(self.out, f"truth-rank{args.process_index}.json").write_text(json.dumps(self.truth))
        Path(self.out, f"durations-rank{args.process_index}.json").write_text(json.dumps(self.durations))
        Path(self.out, f"lag-rank{args.process_index}.json").write_text(json.dumps(self.lags))


if __name__ == "__main__":
    uri, out = sys.argv[1], sys.argv[2]
    stop = sys.argv[3:] == ["stop"]
    (xt, yt), (xv, yv) = digits_tensors()
    args = TrainingArguments(output_dir=out, num_train_epochs=20 if stop else 2, per_device_train_batch_size=32,
                             eval_strategy="epoch", save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, ddp_backend="gloo")
    monitor = EnergyMonitor(gpus="all", tracking_uri=uri, experiment_name="ddp", output_dir=out)
    trainer = Trainer(model=hf_digits_model(), args=args, train_dataset=DigitsDataset(xt[:512], yt[:512]),
                      eval_dataset=DigitsDataset(xv[:128], yv[:128]), compute_metrics=hf_accuracy,
                      callbacks=[monitor, Truth(monitor, out),
                                 *([EnergyBudget(energy="0.5 kJ", check_every_n_steps=2)] if stop else [])])
    trainer.train()
    Path(out, f"stopped-rank{args.process_index}.txt").write_text(str(round(trainer.state.epoch)))
