"""Record the golden trace of the format version of whichever ntrace is imported.

    python tests/data/archives/make_archive.py [--out tests/data/archives]

writes ``format-<MAJOR.MINOR>.zarr``: a 6→4→3 ReLU MLP trained by SGD with MSE for 8 rounds
of 4 samples (seeded), Taylor data every 2 rounds on 2 samples, a probe of 4 points every 2
rounds. Only the public recording API of ntrace 0.1.0 is used, so the same script records the
archive of every format version: run it with the released ntrace first on ``PYTHONPATH``
(``README.md`` gives the exact commands). The trace is kept exactly as the recorder wrote it.
"""

from __future__ import annotations

import argparse
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

import ntrace
from ntrace.format.metadata import FORMAT_VERSION, Sampling
from ntrace.recording import record

ROUNDS, BATCH = 8, 4


def make(out_dir: Path) -> Path:
    path = out_dir / f"format-{FORMAT_VERSION}.zarr"
    if path.exists():
        shutil.rmtree(path)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((ROUNDS * BATCH, 6)).astype(np.float32))
    y = torch.tanh(x @ torch.from_numpy(rng.standard_normal((6, 3)).astype(np.float32)))
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 4), relu1=nn.ReLU(),
                                      fc2=nn.Linear(4, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with record(model, path, loss="mse", optimizer=opt,
                sampling=Sampling(taylor_every=2, samples_per_round=2), probe=x[:4],
                probe_index=np.arange(4), probe_every=2, expected_rounds=ROUNDS,
                run={"task": "golden archive (tests/data/archives/make_archive.py)",
                     "seed": 0, "batch_size": BATCH, "epochs": 1}) as rec:
        for n in range(ROUNDS):
            idx = np.arange(n * BATCH, (n + 1) * BATCH)
            out = model(x[idx])
            loss = nn.functional.mse_loss(out, y[idx])
            rec.step(loss, out, y[idx], indices=idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    path = make(args.out)
    print(f"ntrace {ntrace.__version__} from {Path(ntrace.__file__).parent} wrote format "
          f"{FORMAT_VERSION} to {path}")


if __name__ == "__main__":
    main()
