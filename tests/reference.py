"""Independent references the tests compare against (written from the paper's definitions, not
from the package): the BMA step weights and the closed-form weighted average of a trajectory."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn


def beta_alphas(total_steps: int, beta: float) -> list[float]:
    """α_t ∝ x^(β-1)(1-x)^(β-1) at x = (t + 0.5)/(T + 1), t = 0..T; the Beta constant cancels in ratios."""
    xs = [(t + 0.5) / (total_steps + 1) for t in range(total_steps + 1)]
    return [math.exp((beta - 1) * (math.log(x) + math.log1p(-x))) for x in xs]


def closed_form(snaps: Sequence[dict[str, Tensor]], alphas: Sequence[float]) -> dict[str, Tensor]:
    """Σ α_t θ_t / Σ α_t over float64 snapshots θ_0..θ_T."""
    total = sum(alphas)
    return {k: sum(a * s[k] for a, s in zip(alphas, snaps)) / total for k in snaps[0]}


def params64(module: nn.Module) -> dict[str, Tensor]:
    """A float64 snapshot of a module's parameters, by name."""
    return {k: v.detach().double().clone() for k, v in module.named_parameters()}
