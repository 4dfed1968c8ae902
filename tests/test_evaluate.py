"""Evaluation metrics against hand computation; class subsets; base/new harmonic mean."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipood_plugin.protocols.base_to_new import harmonic_mean
from clipood_plugin.training.evaluate import accuracy_metrics, evaluate


def test_metrics_match_hand_computation() -> None:
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    preds = torch.tensor([0, 1, 0, 1, 0, 2])
    m = accuracy_metrics(preds, labels, base_classes=torch.tensor([0]))
    assert abs(m["top1"] - 100 * 4 / 6) < 1e-9
    assert abs(m["mean_per_class"] - 100 * (2 / 3 + 1 + 1 / 2) / 3) < 1e-9
    assert abs(m["base"] - 100 * 2 / 3) < 1e-9 and abs(m["new"] - 100 * 2 / 3) < 1e-9
    assert abs(harmonic_mean(80.0, 60.0) - 2 * 80 * 60 / 140) < 1e-12


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class CosineHead(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", F.normalize(weight, dim=1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return 100 * F.normalize(f, dim=1) @ self.weight.T


def test_evaluate_and_class_subset() -> None:
    weight = torch.eye(4)
    feats = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0.9], [0, 0, 0.2, 1.0]])
    labels = torch.tensor([0, 1, 2])
    batches = [(feats[:2], labels[:2]), (feats[2:], labels[2:])]
    full = evaluate(Identity(), CosineHead(weight), batches, torch.device("cpu"))
    assert abs(full["top1"] - 100 * 2 / 3) < 1e-9  # the last sample's argmax is class 3
    # restricted to classes {0, 1, 2}, class 3 can no longer win
    sub = evaluate(Identity(), CosineHead(weight), batches, torch.device("cpu"), class_subset=torch.tensor([0, 1, 2]))
    assert sub["top1"] == 100.0 and sub["n"] == 3
