"""Post-hoc weight averages: record a trajectory once, choose β (and the horizon) after the run.

- :class:`TrajectorySnapshots` — the recorder, updated once per optimizer step like an average;
  keeps θ_0, θ_T and K segment means on disk (:mod:`~clipood_plugin.posthoc.recorder`).
- :func:`load_snapshots`, :func:`beta_average`, :func:`ema_average`, :func:`weighted_average`,
  :func:`weighted_averages`, :func:`error_bound` — read a recording and build averages from it,
  with the stated error bound (:mod:`~clipood_plugin.posthoc.snapshots`).
- ``clipood-posthoc RUN_DIR --beta …`` / ``python -m clipood_plugin.posthoc`` — evaluate a β grid
  on a run's recording and select on a validation set (:mod:`~clipood_plugin.posthoc.cli`).
"""

from __future__ import annotations

from clipood_plugin.posthoc.layout import DEFAULT_SEGMENTS, segment_boundaries
from clipood_plugin.posthoc.recorder import TrajectorySnapshots
from clipood_plugin.posthoc.snapshots import (
    Segment,
    Snapshots,
    beta_average,
    ema_average,
    ema_weights,
    error_bound,
    load_snapshots,
    weighted_average,
    weighted_averages,
)

__all__ = [
    "DEFAULT_SEGMENTS",
    "Segment",
    "Snapshots",
    "TrajectorySnapshots",
    "beta_average",
    "ema_average",
    "ema_weights",
    "error_bound",
    "load_snapshots",
    "segment_boundaries",
    "weighted_average",
    "weighted_averages",
]
