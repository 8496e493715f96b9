"""Figures of analysis results (matplotlib, no pyplot): Fig. 3, 4 and 5 of the paper."""

from __future__ import annotations

from ntrace.plot.figures import (
    exploration_figure,
    make_figures,
    optimizers_figure,
    regret_figure,
    save_figure,
)

__all__ = ["exploration_figure", "make_figures", "optimizers_figure", "regret_figure",
           "save_figure"]
