"""Accuracy overall and per question type, and the table the command-line tools print."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .text import QUESTION_TYPES

__all__ = ["TypeAccuracy", "format_accuracy_table"]


class TypeAccuracy:
    """Accumulates exact-match accuracy; an answer outside the vocabulary (id -1) is always wrong."""

    def __init__(self, types: Sequence[str] = QUESTION_TYPES) -> None:
        self.types = tuple(types)
        self.correct = torch.zeros(len(self.types), dtype=torch.long)
        self.total = torch.zeros(len(self.types), dtype=torch.long)

    def update(self, predicted: Tensor, answer: Tensor, question_type: Tensor) -> None:
        hit = (predicted == answer) & (answer >= 0)
        self.correct += torch.bincount(question_type[hit], minlength=len(self.types)).cpu()
        self.total += torch.bincount(question_type, minlength=len(self.types)).cpu()

    def compute(self) -> dict:
        """``{"accuracy": overall, "count": n, "per_type": {type: {"accuracy", "count"}}}`` for seen types."""
        total = int(self.total.sum())
        per_type = {
            t: {"accuracy": int(c) / int(n), "count": int(n)}
            for t, c, n in zip(self.types, self.correct, self.total)
            if n > 0
        }
        return {"accuracy": int(self.correct.sum()) / total if total else 0.0, "count": total, "per_type": per_type}


def format_accuracy_table(metrics: dict) -> str:
    lines = [f"{'question type':<15}{'accuracy':>10}{'questions':>11}", "-" * 36]
    for qtype, m in metrics["per_type"].items():
        lines.append(f"{qtype:<15}{100 * m['accuracy']:>9.2f}%{m['count']:>11,}")
    lines.append("-" * 36)
    lines.append(f"{'overall':<15}{100 * metrics['accuracy']:>9.2f}%{metrics['count']:>11,}")
    return "\n".join(lines)
