"""The smallest complete open_clip fine-tuning loop with CLIPood's two pieces swapped in.

Compared with a plain loop (cross-entropy on ``head(model.encode_image(x))``), two things change:

1. the loss is :class:`clipood_plugin.MMSLoss` on the image features (paper Eq. 3–4), and
2. a :class:`clipood_plugin.BetaMovingAverage` of the image tower is updated after each step
   (Eq. 5–7) and used for evaluation.

It runs offline on a random-init tiny CLIP and generated images, so it finishes in seconds::

    python examples/mms_open_clip_finetune.py --steps 30

Real use swaps in a pretrained model and a real data loader (see the commented lines).
"""

from __future__ import annotations

import argparse

import open_clip
import torch
from rich.progress import track
from torch import Tensor, nn

from clipood_plugin import BetaMovingAverage, MMSLoss, TextHead

CLASSNAMES = ["cat", "dog", "car", "tree", "cup", "bird"]
IMAGE_SIZE = 32


def tiny_clip() -> nn.Module:
    """A random-init CLIP small enough for CPU; the tokenizer vocab ships with open_clip."""
    return open_clip.CLIP(
        embed_dim=64,
        vision_cfg={"layers": 2, "width": 64, "patch_size": 8, "image_size": IMAGE_SIZE, "head_width": 32},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    )


def make_batch(prototypes: Tensor, batch_size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Generated images: a class prototype plus noise (stands in for a real DataLoader)."""
    labels = torch.randint(0, prototypes.shape[0], (batch_size,), generator=gen)
    images = prototypes[labels] + 0.5 * torch.randn(batch_size, *prototypes.shape[1:], generator=gen)
    return images, labels


@torch.no_grad()
def accuracy(tower: nn.Module, head: TextHead, images: Tensor, labels: Tensor) -> float:
    was_training = tower.training
    tower.eval()
    acc = (head(tower(images)).argmax(dim=-1) == labels).float().mean().item()
    tower.train(was_training)
    return acc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (T of the Beta average)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mms-lambda", type=float, default=0.3)
    parser.add_argument("--bma-beta", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    model = tiny_clip()
    # What real users write instead (downloads weights):
    # model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16", pretrained="openai")
    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    # Zero-shot head from the frozen text tower; only the image tower trains (as CLIPood).
    head = TextHead.from_open_clip(model, tokenizer, CLASSNAMES)
    tower = model.visual
    loss_fn = MMSLoss(head, lam=args.mms_lambda)  # was: nn.CrossEntropyLoss() on head(features)
    optimizer = torch.optim.AdamW(tower.parameters(), lr=args.lr, weight_decay=0.1)
    bma = BetaMovingAverage(tower, total_steps=args.steps, beta=args.bma_beta)  # θ_0 = the start

    prototypes = torch.randn(len(CLASSNAMES), 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    tower.train()
    losses = []
    for _ in track(range(args.steps), description="fine-tuning"):
        images, labels = make_batch(prototypes, args.batch_size, gen)
        loss = loss_fn(tower(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bma.update_parameters(tower)
        losses.append(loss.item())

    test_images, test_labels = make_batch(prototypes, 256, gen)
    acc_live = accuracy(tower, head, test_images, test_labels)
    acc_bma = accuracy(bma.module, head, test_images, test_labels)
    print(
        f"result: steps={bma.steps} loss_first={losses[0]:.4f} loss_last={losses[-1]:.4f} "
        f"acc_live={acc_live:.4f} acc_bma={acc_bma:.4f}"
    )


if __name__ == "__main__":
    main()
