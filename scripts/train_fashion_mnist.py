"""Trains the shipped Fashion-MNIST ResNet-20 (CPU is enough: ~25 min on 2 cores for the defaults).

    python scripts/train_fashion_mnist.py [--epochs 8] [--out dsg_ext/weights/resnet20_fashion_mnist.safetensors]

SGD with momentum 0.9, Nesterov, weight decay 5e-4, batch 128, one-cycle cosine learning rate
(peak 0.1), random crops (4-pixel padding) and horizontal flips. Prints the test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from dsg_ext.data.fashion_mnist import augment, load_split, preprocess
from dsg_ext.evaluation import topk_accuracy
from dsg_ext.models.resnet20 import WEIGHTS, ResNet20


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """(top-1, top-5) % of the model in eval mode on uint8 Fashion-MNIST images."""
    return topk_accuracy(model.eval(), preprocess(images), labels, batch_size=1000)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=WEIGHTS)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_x, train_y = load_split(train=True)
    test_x, test_y = load_split(train=False)
    x_all = preprocess(train_x)
    model = ResNet20()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = args.epochs * ((x_all.shape[0] + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(x_all.shape[0], generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, perm.numel(), args.batch_size):
            idx = perm[i : i + args.batch_size]
            x, y = augment(x_all[idx], gen), train_y[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += y.numel()
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += loss.item() * y.numel()
        top1, _ = evaluate(model, test_x, test_y)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {loss_sum / total:.4f}, "
              f"train acc {100 * correct / total:.2f}%, "
              f"test top-1 {top1:.2f}% ({time.time() - start:.0f} s)", flush=True)
    top1, top5 = evaluate(model, test_x, test_y)
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    metadata = {"test_top1": f"{top1:.2f}", "test_top5": f"{top5:.2f}", "epochs": str(args.epochs),
                "seed": str(args.seed)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out, metadata=metadata)
    print(json.dumps({"weights": args.out, "test_top1": top1, "test_top5": top5}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
