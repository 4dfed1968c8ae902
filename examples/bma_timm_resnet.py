"""BetaMovingAverage on a model that is not CLIP: a timm ResNet with BatchNorm.

BMA is a ``torch.optim.swa_utils.AveragedModel``, so the usual SWA recipe applies: update after
every optimizer step, then recompute the BatchNorm statistics of the averaged weights with
``update_bn`` (averaged weights do not match running statistics collected along the way).
Generated data keeps it offline and fast::

    python examples/bma_timm_resnet.py --steps 40
"""

from __future__ import annotations

import argparse

import timm
import torch
from rich.progress import track
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from clipood_plugin import BetaMovingAverage

IMAGE_SIZE = 32


def generated_data(num_classes: int, n: int, gen: torch.Generator, prototypes: Tensor) -> TensorDataset:
    """Class prototype plus noise: learnable in a few dozen steps."""
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    images = prototypes[labels] + 0.7 * torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    return TensorDataset(images, labels)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (model(images).argmax(dim=-1) == labels).sum().item()
        total += labels.numel()
    return correct / total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t", help="any timm model name (random init)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (T of the Beta average)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--bma-beta", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    prototypes = torch.randn(args.num_classes, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    train_set = generated_data(args.num_classes, args.steps * args.batch_size, gen, prototypes)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=gen, drop_last=True)
    test_loader = DataLoader(generated_data(args.num_classes, 256, gen, prototypes), batch_size=64)

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    bma = BetaMovingAverage(model, total_steps=len(train_loader), beta=args.bma_beta)

    model.train()
    for images, labels in track(train_loader, description="training"):
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bma.update_parameters(model)  # timm style: bma.update(model, step=num_updates)

    acc_live = accuracy(model, test_loader)
    acc_before_bn = accuracy(bma, test_loader)
    update_bn(train_loader, bma)  # BatchNorm statistics for the averaged weights
    acc_bma = accuracy(bma, test_loader)
    print(
        f"result: model={args.model} steps={bma.steps} loss_last={loss.item():.4f} acc_live={acc_live:.4f} "
        f"acc_bma_before_update_bn={acc_before_bn:.4f} acc_bma={acc_bma:.4f}"
    )


if __name__ == "__main__":
    main()
