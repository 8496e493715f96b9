"""What an analysis computes: one frozen options object, checked where it is built.

The CLI turns its flags into :class:`AnalysisOptions`; the library checks every field here and
again against the trace (layer names, neuron indices, sizes) in :mod:`ntrace.analyze.plan`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ntrace.errors import UsageError
from ntrace.progress import OnProgress, quiet

DOMAINS = ("ball", "box", "none")
SCALES = ("network", "layer", "neuron")

@dataclass(frozen=True)
class AnalysisOptions:
    """Options of :func:`ntrace.analyze.analyze_trace`.

    ``domain``: the comparator set H of the hindsight optimum (``ball``: centred at the mean
    iterate, radius the largest distance of an iterate from it; ``box``: the coordinate-wise
    range of the iterates; ``none``: unconstrained). ``checkpoints``: how many log-spaced
    Taylor-round counts to solve at (the last one always included), or the counts themselves.
    ``tol``: the suboptimality each certified solve must reach, in loss units. ``scales``:
    ``None`` for every scale the trace supports. ``layers``/``neurons``: restrict the analysis
    (neurons are indices within the layer, ``neurons`` needs exactly one layer unless the trace
    has one). ``max_dim``: the largest problem (parameters of a layer, of the network, or of
    one neuron) solved with a dense Hessian, ``None`` for 4096 on CPU and 16384 on CUDA;
    larger ones are skipped with a note. ``max_memory``: bytes of Taylor data the iterative
    losses (cross-entropy, binary logistic) may hold in memory. ``fit_from``: the regret exponent is
    fitted on checkpoints with at least ``fit_from`` × (last count) Taylor rounds.
    """

    domain: str = "ball"
    checkpoints: int | tuple[int, ...] = 32
    tol: float = 1e-6
    max_iter: int = 20000
    scales: tuple[str, ...] | None = None
    layers: tuple[str, ...] | None = None
    neurons: tuple[int, ...] | None = None
    device: str = "cpu"
    dynamic: bool = False
    exploration: bool = True
    max_dim: int | None = None
    max_memory: int = 2 << 30
    block_bytes: int = 32 << 20
    fit_from: float = 0.1
    confidence: float = 0.95
    svd_rank: int = 50
    sv_floor: float = 1e-6
    scheduler: str | None = None
    workers: int | None = None
    progress: OnProgress = field(default=quiet, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise UsageError(f"unknown domain {self.domain!r}; use one of {', '.join(DOMAINS)}")
        cp = self.checkpoints
        if isinstance(cp, bool) or not isinstance(cp, int | tuple):
            raise UsageError(f"checkpoints must be a count or a tuple of Taylor-round counts, "
                             f"found {cp!r}")
        if isinstance(cp, int) and cp < 1:
            raise UsageError(f"checkpoints must be at least 1, found {cp}")
        if isinstance(cp, tuple) and (not cp or any(not isinstance(c, int) or c < 1 for c in cp)):
            raise UsageError(f"explicit checkpoints must be positive Taylor-round counts, "
                             f"found {cp!r}")
        if not (isinstance(self.tol, float | int) and math.isfinite(self.tol) and self.tol > 0):
            raise UsageError(f"tol must be a positive number, found {self.tol!r}")
        if self.max_iter < 1:
            raise UsageError(f"max_iter must be at least 1, found {self.max_iter}")
        if self.scales is not None:
            bad = [s for s in self.scales if s not in SCALES]
            if bad or not self.scales:
                raise UsageError(f"unknown scale {bad[0] if bad else '(none given)'!r}; use any "
                                 f"of {', '.join(SCALES)}")
        if self.layers is not None and not self.layers:
            raise UsageError("layers must name at least one layer when given")
        if self.neurons is not None and (not self.neurons or any(j < 0 for j in self.neurons)):
            raise UsageError(f"neurons must be non-negative indices, found {self.neurons!r}")
        if self.max_dim is not None and self.max_dim < 1:
            raise UsageError(f"max_dim must be positive, found {self.max_dim}")
        if self.max_memory < 1:
            raise UsageError(f"max_memory must be positive, found {self.max_memory} bytes "
                             "(the CLI's --max-memory counts MiB)")
        if not 0.0 <= self.fit_from < 1.0:
            raise UsageError(f"fit_from must lie in [0, 1), found {self.fit_from}")
        if not 0.0 < self.confidence < 1.0:
            raise UsageError(f"confidence must lie in (0, 1), found {self.confidence}")
        if self.svd_rank < 1 or not self.sv_floor > 0:
            raise UsageError("svd_rank must be >= 1 and sv_floor > 0")
        if self.scheduler is not None and self.workers is not None:
            raise UsageError("a scheduler address and a worker count are mutually exclusive: "
                             "--scheduler uses a running cluster, --workers starts a local one")
        if self.scheduler is not None and (not isinstance(self.scheduler, str)
                                           or not self.scheduler.strip()):
            raise UsageError(f"scheduler must be an address such as tcp://host:8786, found "
                             f"{self.scheduler!r}")
        if self.workers is not None and (isinstance(self.workers, bool)
                                         or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise UsageError(f"workers must be a positive number of processes, found "
                             f"{self.workers!r}")
        if self.block_bytes < 1 << 16:
            raise UsageError(f"block_bytes must be at least 65536, found {self.block_bytes}")

    @property
    def distributed(self) -> bool:
        """True when the analysis runs on a Dask cluster."""
        return self.scheduler is not None or self.workers is not None

    def dim_limit(self) -> int:
        """The effective ``max_dim``."""
        if self.max_dim is not None:
            return self.max_dim
        return 16384 if self.device.startswith("cuda") else 4096


def parse_scales(text: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"network,layer"`` → ``("network", "layer")``; ``None`` stays ``None``."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    out = tuple(s.strip() for s in items if s.strip())
    bad = [s for s in out if s not in SCALES]
    if bad or not out:
        raise UsageError(f"unknown scale {bad[0] if bad else text!r}; use a comma-separated "
                         f"list of {', '.join(SCALES)}")
    return out


def log_checkpoints(total: int, count: int) -> tuple[int, ...]:
    """About ``count`` log-spaced Taylor-round counts in [1, total], always ending at total."""
    if total < 1:
        return ()
    if count <= 1:
        return (total,)
    pts = {total}
    for k in range(count):
        pts.add(max(1, round(math.exp(math.log(total) * k / (count - 1)))))
    return tuple(sorted(pts))
