"""A training killed with SIGKILL right after an epoch's hook; what it logged must reach MLflow after all.

    python mlflow_kill.py lightning|hf OUT [--uri URI] [--epochs N] [--kill-epoch K] [--delay-ms D]
        [--kill-sender] [--pause-epoch P] [--checkpoints DIR] [--kill-at-start K] [--resume CKPT]

Prints ``sender PID SPOOL`` once the monitor started and ``epoch E step S`` after each epoch's hook
(S: the step the monitor logged the epoch at). ``--pause-epoch`` flushes that epoch to MLflow, prints,
and waits until the file OUT/go exists, so the test can change the network mid-run.
"""

import argparse
import os
import signal
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("framework", choices=["lightning", "hf"])
parser.add_argument("out")
parser.add_argument("--uri")
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--kill-epoch", type=int)
parser.add_argument("--delay-ms", type=float, default=0.0)
parser.add_argument("--kill-sender", action="store_true", help="kill the sender too (the machine went down)")
parser.add_argument("--pause-epoch", type=int)
parser.add_argument("--checkpoints", help="save a Lightning checkpoint after every epoch here")
parser.add_argument("--kill-at-start", type=int, help="kill at the start of this epoch (after its checkpoint)")
parser.add_argument("--resume", help="a Lightning checkpoint to resume from")
args = parser.parse_args()
out = Path(args.out)


def sink():
    return monitor.sink


def started():
    print(f"sender {sink().sender_pid} {sink().spool_path}", flush=True)


def after_epoch(epoch):
    if epoch == args.pause_epoch:
        sink().flush(60)  # in MLflow before the test changes the network
    print(f"epoch {epoch} step {monitor.records[-1].step}", flush=True)
    if epoch == args.pause_epoch:
        end = time.monotonic() + 60
        while not (out / "go").exists() and time.monotonic() < end:
            time.sleep(0.05)
    if epoch == args.kill_epoch:
        kill()


def kill():
    if args.delay_ms:
        time.sleep(args.delay_ms / 1000)
    if args.kill_sender:
        os.kill(sink().sender_pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


if args.framework == "lightning":
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    from green_callbacks.lightning import EnergyMonitor

    class After(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            started()

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == args.kill_at_start:
                kill()

        def on_train_epoch_end(self, trainer, pl_module):
            after_epoch(trainer.current_epoch)

    monitor = EnergyMonitor(tracking_uri=args.uri, experiment_name="killed", output_dir=str(out / "green"))
    callbacks = [monitor, After()]
    if args.checkpoints:
        callbacks.append(ModelCheckpoint(dirpath=args.checkpoints, save_last=True, every_n_epochs=1))
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, callbacks=callbacks,
                         enable_checkpointing=bool(args.checkpoints), enable_progress_bar=False,
                         enable_model_summary=False, limit_train_batches=16, limit_val_batches=4,
                         default_root_dir=str(out))
    trainer.fit(BoringModel(), ckpt_path=args.resume)
else:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from green_callbacks.transformers import EnergyMonitor

    from helpers import DigitsDataset, digits_tensors, hf_digits_model

    class After(TrainerCallback):
        def on_train_begin(self, a, state, control, **kwargs):
            started()

        def on_epoch_end(self, a, state, control, **kwargs):
            after_epoch(round(state.epoch) - 1)

    monitor = EnergyMonitor(tracking_uri=args.uri, experiment_name="killed", output_dir=str(out / "green"))
    (xt, yt), _ = digits_tensors()
    targs = TrainingArguments(output_dir=str(out / "hf"), num_train_epochs=args.epochs, per_device_train_batch_size=32,
                              save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    Trainer(model=hf_digits_model(), args=targs, train_dataset=DigitsDataset(xt[:256], yt[:256]),
            callbacks=[monitor, After()]).train()
