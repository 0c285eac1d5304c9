"""Quick start: distil a small convolutional "FPN" into a narrower student with FAMKDLoss.

A plain training loop, no detector framework: the teacher is a fixed 3-level feature pyramid
with a dense classification head; the student has half the channels. The student, the
loss's align convs and generators (and fusion weights, with both branches) train together.
The script prints the loss and its parts, and the student's agreement with the teacher
before and after.

    python examples/quickstart.py [--steps 40]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from famkd_losses import FAMKDLoss


class TinyPyramid(nn.Module):
    """Three feature levels (strides 2, 4, 8) and a dense class head: (N, 3, H, W) ->
    ([(N, C, H/2, W/2), (N, C, H/4, W/4), (N, C, H/8, W/8)], [(N, A*K, ., .)] * 3)."""

    def __init__(self, channels: int, anchors_x_classes: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(3 if i == 0 else channels, channels, 3, stride=2, padding=1), nn.ReLU())
            for i in range(3)
        )
        self.head = nn.Conv2d(channels, anchors_x_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats, [self.head(f) for f in feats]


def agreement(s_logits: list[torch.Tensor], t_logits: list[torch.Tensor]) -> float:
    """Mean absolute difference of the sigmoid class probabilities (lower is closer)."""
    return sum((torch.sigmoid(s) - torch.sigmoid(t)).abs().mean().item() for s, t in zip(s_logits, t_logits)) / len(
        s_logits
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    num_classes, anchors = 5, 1
    teacher = TinyPyramid(32, anchors * num_classes).eval()
    student = TinyPyramid(16, anchors * num_classes)
    kd = FAMKDLoss(
        student_channels=[16, 16, 16], teacher_channels=[32, 32, 32], alpha=5e-4, beta=10.0, num_classes=num_classes
    )
    optimizer = torch.optim.AdamW([*student.parameters(), *kd.parameters()], lr=3e-3)
    held_out = torch.randn(8, 3, 48, 48)
    with torch.no_grad():
        before = agreement(student(held_out)[1], teacher(held_out)[1])

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        images = torch.randn(8, 3, 48, 48)
        with torch.no_grad():
            t_feats, t_logits = teacher(images)
        s_feats, s_logits = student(images)
        loss = kd(s_feats, t_feats, s_logits, t_logits)  # + your detection loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % 10 == 0:
            terms = kd.last_terms(as_float=True)
            scales = ", ".join(
                f"s{k.rsplit('scale', 1)[1]} {v:.4f}" for k, v in terms.items() if k.startswith("feature/level0/scale")
            )
            print(
                f"step {step:3d}  loss {terms['total']:.4f}  feature {terms['feature']:.4f}  "
                f"logits {terms['logits']:.4f}  (level0: {scales})"
            )
    with torch.no_grad():
        after = agreement(student(held_out)[1], teacher(held_out)[1])
    print(f"\n{args.steps} steps in {time.perf_counter() - start:.1f} s (CPU)")
    print(f"student-teacher class-probability gap on held-out inputs: {before:.4f} -> {after:.4f}")
    if kd.feature_losses[0].fusion_logits is not None:  # both branches (e.g. FAMKDLoss(..., **FULL_METHOD))
        weights = [[round(v, 3) for v in row] for row in kd.fusion_weights()[0].tolist()]
        print("learned fusion weights (spatial, channel) per scale at level 0:", weights)


if __name__ == "__main__":
    main()
