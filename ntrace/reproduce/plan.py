"""The experiment grid of a reproduction: tasks, optimizers, learning-rate sweeps, lengths,
sampling, seeds and analysis settings, for each scale, in one frozen object.

Everything that decides a number in the report lives in :class:`Plan`; its ``to_dict`` is
written into the report so that anyone can rerun it. Scales: ``tiny`` (the CI test, about a
minute on CPU), ``small`` (the default: data available offline, under 30 minutes on two CPU
cores) and ``paper`` (full data sets and epochs, for a GPU).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ntrace.errors import UsageError
from ntrace.tasks.cifar import has_cifar10
from ntrace.tasks.datasets import has_mnist

SCALES = ("tiny", "small", "paper")
OPTIMIZERS = ("sgd", "rmsprop", "adam")
KINDS = ("autoencoder", "convnet")


@dataclass(frozen=True)
class Experiment:
    """One task of the reproduction (the autoencoder of Sec. 2.4 or the convnet of Sec. 3.3).

    ``sweep`` holds, per optimizer, the learning rates tried for ``sweep_steps`` rounds each;
    the one with the lowest final training loss is then trained for ``steps`` rounds, once
    per seed, with Taylor data every ``taylor_every`` rounds on ``samples_per_round``
    samples of ``neurons`` tracked neurons per layer, and ``probe_size`` probe points
    snapshotted every ``probe_every`` rounds."""

    kind: str
    task: str
    data_dir: str | None
    data: str  # what data was used, in words
    sweep: tuple[tuple[str, tuple[float, ...]], ...]
    sweep_steps: int
    steps: int
    taylor_every: int
    samples_per_round: int
    neurons: int | str
    probe_size: int
    probe_every: int

    def learning_rates(self, optimizer: str) -> tuple[float, ...]:
        return dict(self.sweep)[optimizer]


@dataclass(frozen=True)
class Analysis:
    """Settings of every analysis (see :class:`ntrace.analyze.AnalysisOptions`)."""

    domain: str = "ball"
    checkpoints: int = 24
    scales: tuple[str, ...] | None = None  # every scale the trace supports
    tol: float = 1e-6
    max_dim: int | None = None
    fit_from: float = 0.1
    confidence: float = 0.95


@dataclass(frozen=True)
class Plan:
    """Everything a reproduction runs. ``seeds`` are the seeds of the traced runs; every
    sweep run uses ``sweep_seed``. ``final_fraction`` of the last rounds are averaged to give
    a run's final training loss."""

    scale: str
    experiments: tuple[Experiment, ...]
    optimizers: tuple[str, ...] = OPTIMIZERS
    seeds: tuple[int, ...] = (0,)
    sweep_seed: int = 0
    device: str = "cpu"
    final_fraction: float = 0.1
    analysis: Analysis = Analysis()
    data_dir: str | None = None  # as given (``--data-dir``); experiments hold what was found

    def command(self, out: str) -> str:
        """The command line that reruns this plan into ``out``."""
        return " ".join(["ntrace reproduce", f"--out {out}", f"--scale {self.scale}",
                         *([f"--data-dir {self.data_dir}"] if self.data_dir else []),
                         f"--seeds {len(self.seeds)}", f"--device {self.device}",
                         *([f"--optimizers {','.join(self.optimizers)}"]
                           if self.optimizers != OPTIMIZERS else [])])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for e in d["experiments"]:
            e["sweep"] = {opt: list(lrs) for opt, lrs in e["sweep"]}
        return d

    def experiment(self, kind: str) -> Experiment:
        for e in self.experiments:
            if e.kind == kind:
                return e
        raise UsageError(f"the plan has no {kind} experiment")


def find_data(data_dir: str | None) -> tuple[str | None, str | None]:
    """The MNIST and CIFAR-10 directories under ``data_dir``: the directory itself or its
    ``mnist/`` and ``cifar10/`` (or ``cifar-10``) subfolders; ``None`` where absent."""
    if data_dir is None:
        return None, None
    d = Path(data_dir)
    if not d.is_dir():
        raise UsageError(f"--data-dir {d} is not a directory; give a folder holding MNIST "
                         "and/or CIFAR-10 files, or their mnist/ and cifar10/ subfolders")
    mnist = next((str(p) for p in (d / "mnist", d / "MNIST", d) if p.is_dir() and has_mnist(p)),
                 None)
    cifar = next((str(p) for p in (d / "cifar10", d / "cifar-10", d)
                  if p.is_dir() and has_cifar10(p)), None)
    if mnist is None and cifar is None:
        raise UsageError(f"--data-dir {d} holds neither MNIST IDX files nor CIFAR-10 files "
                         "(also looked in mnist/ and cifar10/); leave it out to use the "
                         "bundled 8x8 digits")
    return mnist, cifar


def _grid(lrs: Mapping[str, tuple[float, ...]], optimizers: tuple[str, ...]
          ) -> tuple[tuple[str, tuple[float, ...]], ...]:
    return tuple((o, lrs[o]) for o in optimizers)


# learning-rate grids: three values a factor ~3 apart, centred where a first sweep chose
# (SGD and Adam on the autoencoder and SGD on the convnet chose the top of narrower grids)
AE_SWEEP = {"sgd": (0.05, 0.15, 0.5), "rmsprop": (3e-4, 1e-3, 3e-3),
            "adam": (1e-3, 3e-3, 1e-2)}
CNN_SWEEP = {"sgd": (0.03, 0.1, 0.3), "rmsprop": (1e-4, 3e-4, 1e-3),
             "adam": (1.5e-4, 5e-4, 1.5e-3)}


def _experiments(scale: str, mnist: str | None, cifar: str | None,
                 optimizers: tuple[str, ...]) -> tuple[Experiment, ...]:
    ae_sweep, cnn_sweep = _grid(AE_SWEEP, optimizers), _grid(CNN_SWEEP, optimizers)
    if scale == "tiny":
        small = {o: lrs[1::2] for o, lrs in AE_SWEEP.items()}  # the middle value
        return (
            Experiment("autoencoder", "digits-autoencoder", None, "scikit-learn 8x8 digits "
                       "(1,797 images, bundled)", _grid(small, optimizers), 10, 40, 2, 4, "all",
                       40, 4),
            Experiment("convnet", "digits-convnet", None, "scikit-learn 8x8 digits as "
                       "1x8x8 images (bundled)",
                       _grid({o: lrs[1::2] for o, lrs in CNN_SWEEP.items()}, optimizers),
                       5, 20, 2, 2, 6, 30, 2),
        )
    if scale == "small":
        if mnist:
            ae = Experiment("autoencoder", "mnist-autoencoder", mnist, f"MNIST from {mnist} "
                            "(the training split if present, else the 10k test split)",
                            ae_sweep, 150, 1500, 15, 4, 50, 200, 15)
        else:
            ae = Experiment("autoencoder", "digits-autoencoder", None, "scikit-learn 8x8 "
                            "digits (1,797 images, bundled)", ae_sweep, 200, 2000, 10, 8, "all",
                            300, 20)
        if cifar:
            cnn = Experiment("convnet", "cifar10-convnet", cifar, f"CIFAR-10 from {cifar}",
                             cnn_sweep, 30, 300, 4, 2, 16, 100, 10)
        elif mnist:
            cnn = Experiment("convnet", "mnist-convnet", mnist, f"MNIST from {mnist} as "
                             "1x28x28 images", cnn_sweep, 20, 100, 2, 2, 16, 100, 4)
        else:
            cnn = Experiment("convnet", "digits-convnet", None, "scikit-learn 8x8 digits as "
                             "1x8x8 images (bundled)", cnn_sweep, 60, 600, 5, 4, 32, 300, 10)
        return ae, cnn
    # paper: the full data sets and epochs (for a GPU)
    if not (mnist and cifar):
        raise UsageError("--scale paper needs the full data sets: give --data-dir holding "
                         "mnist/ (MNIST IDX files) and cifar10/ (CIFAR-10 binary batches)")
    full = {o: (lrs[0] / 3, *lrs, lrs[-1] * 3) for o, lrs in AE_SWEEP.items()}
    full_cnn = {o: (lrs[0] / 3, *lrs, lrs[-1] * 3) for o, lrs in CNN_SWEEP.items()}
    return (
        Experiment("autoencoder", "mnist-autoencoder", mnist, f"MNIST from {mnist}",
                   _grid(full, optimizers), 940, 18750, 5, 16, "all", 1000, 100),
        Experiment("convnet", "cifar10-convnet", cifar, f"CIFAR-10 from {cifar}",
                   _grid(full_cnn, optimizers), 390, 7800, 5, 8, 64, 500, 100),
    )


def make_plan(scale: str = "small", data_dir: str | None = None, seeds: int = 1,
              device: str = "cpu", optimizers: tuple[str, ...] = OPTIMIZERS) -> Plan:
    """The plan of ``scale`` with data found under ``data_dir`` (see :func:`find_data`)."""
    if scale not in SCALES:
        raise UsageError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    if not isinstance(seeds, int) or seeds < 1:
        raise UsageError(f"--seeds must be a positive integer, found {seeds!r}")
    bad = [o for o in optimizers if o not in OPTIMIZERS]
    if bad or len(set(optimizers)) != len(optimizers) or "sgd" not in optimizers:
        raise UsageError(f"optimizers must be distinct values of {', '.join(OPTIMIZERS)} "
                         f"including sgd, found {optimizers!r}")
    mnist, cifar = find_data(data_dir)
    # tiny: layers above 1,600 parameters (the autoencoder's first and last) neuron scale only
    analysis = Analysis(checkpoints=6, max_dim=1600) if scale == "tiny" else Analysis()
    if scale == "paper":
        analysis = Analysis(checkpoints=32, max_dim=16384 if device.startswith("cuda") else None)
    return Plan(scale, _experiments(scale, mnist, cifar, optimizers), optimizers,
                tuple(range(seeds)), 0, device, analysis=analysis, data_dir=data_dir)
