"""What each array of a trace holds, in words: the ``long_name``, ``units`` and
``description`` attributes xarray users see (CF conventions: ``units`` is "1" for a
dimensionless quantity and absent for indices and states).

One table serves the xarray backend (:mod:`ntrace.format.xarray_backend`) and the writer,
which stores these attributes on every array from format 1.3 on (spec 'Variable attributes'),
with ``coordinates`` naming ``round_index`` where it labels an array's first axis, so that
plain ``xr.open_zarr`` shows it as a coordinate. Keys are array names, the last component of
the path (``layers/fc1/weight`` → ``weight``).
"""

from __future__ import annotations

from typing import NamedTuple

from ntrace.format.layout import SNAPSHOT, TAYLOR, ArrayLayout


class Described(NamedTuple):
    long_name: str
    units: str | None
    description: str


VARIABLES: dict[str, Described] = {
    "loss": Described("training loss", "1",
                      "the minibatch loss of each training round, as passed to step"),
    "round_index": Described("training round", None,
                             "the training round each row was recorded in"),
    "sample_index": Described("sample index", None,
                              "the index of each recorded sample in the training data"),
    "sample_loss": Described("per-sample loss", "1",
                             "the loss of each recorded sample before reduction"),
    "output": Described("network output", "1", "the network output for each recorded sample"),
    "target": Described("target", "1", "the target the loss compares the output with"),
    "tracked": Described("tracked neuron", None,
                         "the neuron index of each tracked neuron of the layer"),
    "weight": Described("weight", "1", "the layer's weight at the start of the round"),
    "bias": Described("bias", "1", "the layer's bias at the start of the round"),
    "input": Described("layer input", "1", "the layer's input for each recorded sample"),
    "jacobian": Described("output Jacobian", "1",
                          "d network output / d pre-activation of each tracked neuron"),
    "mask": Described("activation state", None,
                      "which units were active (on the positive side of the activation)"),
    "mask_high": Described("upper activation state", None,
                           "which units were above the upper bend of a hardtanh"),
    "slope": Described("PReLU slope", "1", "the learned negative slope at the start of the round"),
    "gradient_error": Described("BatchNorm gradient error", "1",
                                "relative error of the fixed-statistics Taylor gradient of the "
                                "layer against autograd through the batch statistics"),
    "state": Described("module state", None,
                       "per-sample state of a parameter-free module (max-pool winner, dropout "
                       "keep)"),
    "config": Described("probe configuration", None,
                        "the activation state of every probed unit on every probe sample"),
}


def variable_attrs(path: str) -> dict[str, str]:
    """``long_name``/``units``/``description`` of the array at ``path`` (empty if unknown);
    a probe's ``input`` and ``sample_index`` are the probe set's."""
    group, _, name = path.rpartition("/")
    d = VARIABLES.get(name)
    if d is None:
        return {}
    out = {"long_name": d.long_name, "description": d.description}
    if group == "probe" and name in ("input", "sample_index"):
        out = {"long_name": f"probe {d.long_name}",
               "description": d.description.replace("recorded sample", "probe sample")}
    if d.units is not None:
        out["units"] = d.units
    return out


def stored_attrs(lay: ArrayLayout) -> dict[str, str]:
    """The attributes the writer stores on the array ``lay`` (format 1.3): those of
    :func:`variable_attrs`, and CF ``coordinates`` where ``round_index`` of the same group
    labels the first axis (``taylor`` arrays, ``probe/config``)."""
    out = variable_attrs(lay.path)
    group, _, name = lay.path.rpartition("/")
    if group in ("taylor", "probe") and name != "round_index" and \
            lay.append_dim in (TAYLOR, SNAPSHOT):
        out["coordinates"] = "round_index"
    return out
