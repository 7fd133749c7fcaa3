"""What the Green AI techniques save, repeated: baseline, distilled, pruned, int8-quantised, bf16 autocast.

    python examples/green_ai_comparison.py                 # k=3 repeats, 8 epochs per model (2-5 min on 2 vCPUs)
    python examples/green_ai_comparison.py --k 5 --epochs 20
    python examples/green_ai_comparison.py --quick         # k=2, 2 epochs, for CI (1-3 min on 2 vCPUs)

Five techniques on scikit-learn's digits, each repeated ``k`` times. The repeats are interleaved and
the order of the techniques rotates from one repeat to the next, so a slow spell of the machine (a
neighbour's load, frequency scaling) falls on every technique rather than on one. The table at the end
gives mean ± sample standard deviation over the repeats of test accuracy, training energy and
inference energy per test sample, with the measurement method (``estimated`` or ``measured``, from
the run's ``green.method.*`` tags) beside them, and each technique's change from the baseline with
whether the repeats resolve it (Welch's t-test, p < 0.05) or leave it "within noise". torch runs on one
thread (``--threads``; see ``main``), so that the CPU estimate charges the work, not threads spinning.

- ``baseline``: the 512-unit MLP, trained from scratch (seed = repeat).
- ``distilled``: a 32-unit student trained by knowledge distillation from the teacher (below). Its
  training energy is the student's own; the teacher's is not charged to it.
- ``pruned``: structured pruning that really removes channels. ``torch.nn.utils.prune.ln_structured``
  picks the 75 % of the teacher's hidden units whose weight rows have the smallest L1 norm; the kept
  rows (and the matching columns of the next layer) are copied into *smaller* ``Linear`` layers
  (512 -> 128 units), which are then fine-tuned for a third of the epochs (that is its training
  energy). Unstructured sparsity (zeroing single weights, as ``prune.l1_unstructured`` does) would save
  nothing here: the weight matrix keeps its shape, and dense CPU/GPU kernels multiply the zeros like
  any other number, so the same FLOPs run and the same energy is spent; only sparse kernels or
  hardware that skips zeros could turn it into savings.
- ``quantised``: ``torch.ao.quantization.quantize_dynamic`` of the teacher's ``Linear`` layers to int8
  (weights int8, activations quantised on the fly); inference only, so no training energy.
- ``bf16``: the baseline trained and tested under bf16 autocast on the CPU (Lightning's
  ``bf16-mixed``). CPUs without native bf16 instructions emulate it, which costs energy; the script
  says which this CPU is. ``--no-bf16`` leaves it out.

The teacher (a 512-unit baseline, seed 0) is trained once before the repeats, without measurement, so
that every repeat can start with any technique; distilled, pruned and quantised derive from it.

Every model of every repeat is one MLflow run in the experiment ``green-ai-comparison``, named after
its technique and tagged ``technique`` and ``repeat``, with its training energy and its inference
energy per sample (``energy/test_j_per_sample``). The same grouping from MLflow:

    green-callbacks report green-ai-comparison --metric test_acc --energy test --group-by technique
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import mlflow
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from digits_common import digits, mlp

from green_callbacks.lightning import EnergyMonitor

EXPERIMENT = "green-ai-comparison"
TECHNIQUES = ("baseline", "distilled", "pruned", "quantised", "bf16")
HIDDEN, STUDENT_HIDDEN, PRUNE_AMOUNT = 512, 32, 0.75


class Classifier(pl.LightningModule):
    """A classifier around any network; with a ``teacher`` it is trained by distillation."""

    def __init__(self, net: torch.nn.Module, teacher: torch.nn.Module | None = None, temperature: float = 4.0,
                 alpha: float = 0.7, lr: float = 1e-3) -> None:
        super().__init__()
        self.net, self.teacher = net, teacher
        self.temperature, self.alpha, self.lr = temperature, alpha, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        if self.teacher is not None:
            with torch.no_grad():
                soft = torch.softmax(self.teacher(x) / self.temperature, -1)
            kd = torch.nn.functional.kl_div(torch.log_softmax(logits.float() / self.temperature, -1), soft,
                                            reduction="batchmean") * self.temperature**2
            loss = self.alpha * kd + (1 - self.alpha) * loss
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam((p for p in self.net.parameters() if p.requires_grad), lr=self.lr)


def structurally_pruned(net: torch.nn.Sequential, amount: float) -> torch.nn.Sequential:
    """``net`` (Linear, ReLU, Linear) with ``amount`` of its hidden units removed, not merely zeroed.

    ``ln_structured`` ranks the first layer's weight rows (one per hidden unit) by L1 norm and masks
    the weakest; the kept rows, their biases and the matching input columns of the second layer are
    copied into new, smaller ``Linear`` layers, so every later matmul is smaller.
    """
    first, act, second = copy.deepcopy(net)
    prune.ln_structured(first, "weight", amount=amount, n=1, dim=0)
    keep = first.weight_mask.abs().sum(dim=1).nonzero().squeeze(1)
    prune.remove(first, "weight")
    small_first = torch.nn.Linear(first.in_features, len(keep))
    small_second = torch.nn.Linear(len(keep), second.out_features)
    with torch.no_grad():
        small_first.weight.copy_(first.weight[keep])
        small_first.bias.copy_(first.bias[keep])
        small_second.weight.copy_(second.weight[:, keep])
        small_second.bias.copy_(second.bias)
    return torch.nn.Sequential(small_first, act, small_second)


def trainer_for(epochs: int, logger=False, callbacks=(), precision: str = "32-true") -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=list(callbacks),
                      precision=precision, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)


def measured(technique: str, repeat: int, module: Classifier, loaders, epochs: int, params: dict,
             precision: str = "32-true") -> dict:
    """Train (unless ``epochs`` is 0) and test ``module`` in its own MLflow run; return its numbers."""
    train, val, test = loaders
    logger = MLFlowLogger(experiment_name=EXPERIMENT, tracking_uri=mlflow.get_tracking_uri(), run_name=technique,
                          tags={"technique": technique, "repeat": str(repeat)})
    logger.log_hyperparams({**params, "epochs": epochs, "precision": precision})
    monitor = EnergyMonitor(log_artifacts=["intervals", "summary"])
    trainer = trainer_for(epochs, logger, [monitor], precision)
    if epochs:
        trainer.fit(module, train, val)
    result = trainer.test(module, test, verbose=False)[0]
    run = mlflow.tracking.MlflowClient(mlflow.get_tracking_uri()).get_run(logger.run_id)
    tags = run.data.tags
    return {"technique": technique, "repeat": repeat, "test_acc": result["test_acc"],
            "train_j": monitor.cumulative_j if epochs else None,
            "infer_j_per_sample": run.data.metrics["energy/test_j_per_sample"],
            "train_method": tags.get("green.method.cpu", "?") if epochs else "",
            "infer_method": tags.get("green.method.test.cpu", "?")}


def one(technique: str, repeat: int, teacher: torch.nn.Module, loaders, epochs: int) -> dict:
    pl.seed_everything(repeat, verbose=False)
    if technique == "baseline":
        return measured(technique, repeat, Classifier(mlp(HIDDEN)), loaders, epochs, {"hidden": HIDDEN})
    if technique == "bf16":
        return measured(technique, repeat, Classifier(mlp(HIDDEN)), loaders, epochs,
                        {"hidden": HIDDEN, "description": "bf16 autocast (bf16-mixed)"}, precision="bf16-mixed")
    if technique == "distilled":
        return measured(technique, repeat, Classifier(mlp(STUDENT_HIDDEN), teacher=teacher), loaders, epochs,
                        {"hidden": STUDENT_HIDDEN, "description": "knowledge distillation from the teacher"})
    if technique == "pruned":
        net = structurally_pruned(teacher, PRUNE_AMOUNT)
        return measured(technique, repeat, Classifier(net), loaders, max(1, epochs // 3),
                        {"hidden": net[0].out_features,
                         "description": f"L1 structured pruning of {PRUNE_AMOUNT:.0%} of hidden units, rebuilt "
                                        "smaller, fine-tuned"})
    if technique == "quantised":
        net = torch.ao.quantization.quantize_dynamic(copy.deepcopy(teacher), {torch.nn.Linear}, dtype=torch.qint8)
        return measured(technique, repeat, Classifier(net), loaders, 0,
                        {"hidden": HIDDEN, "description": "dynamic int8 quantisation (inference only)"})
    raise ValueError(technique)


def mean_sd(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def against(values: list[float], baseline: list[float]) -> str:
    """The change of the mean from the baseline's, and whether the repeats resolve it: Welch's t-test (unequal
    variances) at p < 0.05; with fewer than two repeats a side, or no spread at all, nothing is resolved."""
    values, baseline = [v for v in values if v is not None], [b for b in baseline if b is not None]
    if len(values) < 2 or len(baseline) < 2 or not statistics.fmean(baseline):
        return "—"
    from scipy import stats

    change = 100 * (statistics.fmean(values) / statistics.fmean(baseline) - 1)
    with warnings.catch_warnings():  # (scipy's note on repeats that are all but equal: the p-value says it)
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(values, baseline, equal_var=False).pvalue)
    if p != p:  # both without spread: a t-test says nothing
        return f"{change:+.0f} % (no spread)"
    return f"{change:+.0f} % ({'resolved' if p < 0.05 else 'within noise'}, p={p:.2g})"


def native_bf16() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and check())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--k", type=int, default=3, help="repeats per technique (interleaved)")
    parser.add_argument("--quick", action="store_true", help="k=2, 2 epochs, a smaller test set")
    parser.add_argument("--no-bf16", action="store_true", help="leave out the bf16 autocast technique")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1; 0: torch's default, one per core): see below")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads {args.threads}: give 0 (torch's default) or a positive count")
    if args.threads:
        # torch's threads, one per core, spin while they wait for one another; when anything else holds a core
        # (a neighbour, the sampler, MLflow's sender), the spinning is CPU time of this training, and its estimate
        # moved 2.4 times with one busy core beside it. One thread does the same work at the same speed on a
        # model this small and reads the same alone and beside a neighbour (+7 %): the comparison is repeatable.
        torch.set_num_threads(args.threads)
    epochs, k = (2, 2) if args.quick else (args.epochs, args.k)
    techniques = [t for t in TECHNIQUES if not (t == "bf16" and args.no_bf16)]
    (xt, yt), (xv, yv) = digits()
    tile = 10 if args.quick else 40  # enough test samples for a steady joules-per-sample
    loaders = (DataLoader(TensorDataset(xt, yt), batch_size=32, shuffle=True),
               DataLoader(TensorDataset(xv, yv), batch_size=512),
               DataLoader(TensorDataset(xv.repeat(tile, 1), yv.repeat(tile)), batch_size=64))

    pl.seed_everything(0, verbose=False)
    teacher_module = Classifier(mlp(HIDDEN))
    trainer_for(epochs).fit(teacher_module, loaders[0], loaders[1])
    teacher = teacher_module.net.eval()

    rows = []
    for repeat in range(k):
        shift = repeat % len(techniques)
        order = techniques[shift:] + techniques[:shift]
        print(f"repeat {repeat + 1}/{k}: {', '.join(order)}", flush=True)
        rows += [one(t, repeat, teacher, loaders, epochs) for t in order]

    print(f"\n{k} repeats, interleaved; mean ± sd; {epochs} epochs (pruned: fine-tuned {max(1, epochs // 3)}); "
          f"{len(xv) * tile} test samples; bf16 native on this CPU: {'yes' if native_bf16() else 'no (emulated)'}")
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"{'technique':<10} {'test acc':>15} {'train J':>15} {'train vs baseline':>30} {'inference mJ/sample':>21} "
          f"{'inference vs baseline':>30}  method (train/inference)")
    base = [r for r in rows if r["technique"] == "baseline"]
    for t in techniques:
        mine = [r for r in rows if r["technique"] == t]
        # every repeat's method: a repeat measured where the others were estimated shows as both
        train_m = "/".join(dict.fromkeys(r["train_method"] or "—" for r in mine))
        infer_m = "/".join(dict.fromkeys(r["infer_method"] for r in mine))
        versus = (("", "") if t == "baseline" else
                  (against([r["train_j"] for r in mine], [r["train_j"] for r in base]),
                   against([r["infer_j_per_sample"] for r in mine], [r["infer_j_per_sample"] for r in base])))
        print(f"{t:<10} {mean_sd([r['test_acc'] for r in mine], digits=4):>15} "
              f"{mean_sd([r['train_j'] for r in mine], digits=1):>15} {versus[0]:>30} "
              f"{mean_sd([r['infer_j_per_sample'] for r in mine], scale=1000, digits=4):>21} {versus[1]:>30}  "
              f"{train_m} / {infer_m}")
    print("\nA change the repeats do not resolve (Welch's t-test, p >= 0.05: 'within noise') is not a measured "
          "saving.")
    print(f"Per run in MLflow: experiment {EXPERIMENT!r} at {mlflow.get_tracking_uri()}; grouped: "
          f"green-callbacks report {EXPERIMENT} --metric test_acc --energy test --group-by technique")
    return 0


if __name__ == "__main__":
    sys.exit(main())
