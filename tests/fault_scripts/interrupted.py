"""Training interrupted mid-epoch 1: python interrupted.py lightning|lightning-logger|hf|hf-mlflow FAULT URI OUT.

FAULT: sigterm, keyboard, exception; for HF also caught (the user catches the exception and the process ends
normally), caught-evaluate (then calls ``trainer.evaluate()``), caught-dropped (then lets the Trainer go, whose
``MLflowCallback.__del__`` ends the active run FINISHED), caught-ctrlc (a Ctrl-C the user catches, then
``trainer.evaluate()``) and preempted (a SIGTERM handler of the user's, as
on a preemptible node, ends the process with ``sys.exit``). hf-mlflow: HF's ``MLflowCallback``
(``report_to=["mlflow"]``) opens the run, the monitor logs into it."""

import os
import signal
import sys

framework, fault, uri, out = sys.argv[1:5]


if fault == "preempted":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))


def strike():
    if fault in ("sigterm", "preempted"):
        os.kill(os.getpid(), signal.SIGTERM)
    elif fault == "keyboard":
        raise KeyboardInterrupt
    elif fault == "caught-ctrlc":
        os.kill(os.getpid(), signal.SIGINT)
    else:  # exception, caught, caught-evaluate
        raise RuntimeError("a bug in the user's training step")


if framework.startswith("lightning"):
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from green_callbacks.lightning import EnergyMonitor

    class Model(BoringModel):
        def training_step(self, batch, batch_idx):
            if self.current_epoch == 1 and batch_idx == 5:
                strike()
            return super().training_step(batch, batch_idx)

    class Saved(pl.Callback):  # what Lightning's SIGTERM path runs (OnExceptionCheckpoint saves a checkpoint here)
        def on_exception(self, trainer, pl_module, exception):
            print(f"on_exception: {type(exception).__name__}", flush=True)

    if framework == "lightning-logger":  # the user's MLFlowLogger opens the run, the monitor logs into it
        from lightning.pytorch.loggers import MLFlowLogger

        logger, monitor = MLFlowLogger(tracking_uri=uri), EnergyMonitor(output_dir=out)
    else:
        logger, monitor = False, EnergyMonitor(tracking_uri=uri, output_dir=out)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[monitor, Saved()])
    trainer.fit(Model())
else:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from green_callbacks.transformers import EnergyMonitor

    from helpers import DigitsDataset, digits_tensors, hf_digits_model

    class Strike(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.epoch > 1.3:
                strike()

    (xt, yt), _ = digits_tensors()
    hf_run = framework == "hf-mlflow"
    if hf_run:
        os.environ["MLFLOW_TRACKING_URI"] = uri
    args = TrainingArguments(output_dir=out, num_train_epochs=3, per_device_train_batch_size=32, save_strategy="no",
                             report_to=["mlflow"] if hf_run else "none", use_cpu=True, disable_tqdm=True)
    monitor = EnergyMonitor(output_dir=out) if hf_run else EnergyMonitor(tracking_uri=uri, output_dir=out)
    trainer = Trainer(model=hf_digits_model(), args=args, train_dataset=DigitsDataset(xt[:320], yt[:320]),
                      eval_dataset=DigitsDataset(xt[320:384], yt[320:384]), callbacks=[monitor, Strike()])
    if not fault.startswith("caught"):
        trainer.train()
    try:
        trainer.train()
    except (RuntimeError, KeyboardInterrupt) as exc:
        print(f"caught: {exc!r}")
    if fault in ("caught-evaluate", "caught-ctrlc"):
        trainer.evaluate()
    if fault == "caught-dropped":
        import gc

        del trainer
        gc.collect()
