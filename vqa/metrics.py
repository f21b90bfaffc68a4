"""Accuracy overall and per question type, and the table the command-line tools print."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .text import QUESTION_TYPES

__all__ = ["TypeAccuracy", "vqa_credit", "format_accuracy_table"]


def vqa_credit(matches: Tensor, given: Tensor) -> Tensor:
    """VQA v2's accuracy of a prediction that ``matches`` of the ``given`` answers to a question equal: the mean, over
    the ``given`` ways to leave one answer out, of min(1, matches among the rest / 3). Ten answers, as VQA v2 has:
    0.3 for one match, 0.6 for two, 0.9 for three, 1 from four. A question with one answer scores exact match."""
    matches, given = matches.double(), given.double()
    # Leaving out one of the matching answers leaves matches - 1; leaving out another, all of them.
    left_out_match = matches * ((matches - 1) / 3).clamp(0, 1)
    left_out_other = (given - matches) * (matches / 3).clamp(max=1)
    return torch.where(given == 1, matches, (left_out_match + left_out_other) / given.clamp(min=1))


class TypeAccuracy:
    """Accumulates accuracy: exact match, or VQA v2's for questions with several answers (``vqa_credit``). An
    answer outside the vocabulary (id -1) never matches."""

    def __init__(self, types: Sequence[str] = QUESTION_TYPES) -> None:
        self.types = tuple(types)
        self.correct = torch.zeros(len(self.types), dtype=torch.float64)  # credit: a sum of 1s without several answers
        self.total = torch.zeros(len(self.types), dtype=torch.long)

    def update(self, predicted: Tensor, answer: Tensor, question_type: Tensor, answer_ids: Tensor | None = None,
               answer_counts: Tensor | None = None) -> None:
        """``answer_ids`` and ``answer_counts``, as ``collate`` gives them for questions with several answers,
        score ``predicted`` by them in place of ``answer``."""
        if answer_ids is None:
            credit = ((predicted == answer) & (answer >= 0)).double()
        else:
            matches = ((answer_ids == predicted[:, None]) * answer_counts).sum(1)
            credit = vqa_credit(matches, answer_counts.sum(1))
        # Summed on the CPU, in order: CUDA's bincount adds float weights atomically, in no fixed order.
        question_type = question_type.cpu()
        self.correct += torch.bincount(question_type, weights=credit.cpu(), minlength=len(self.types))
        self.total += torch.bincount(question_type, minlength=len(self.types))

    def compute(self) -> dict:
        """``{"accuracy": overall, "count": n, "per_type": {type: {"accuracy", "count"}}}`` for seen types."""
        total = int(self.total.sum())
        per_type = {
            t: {"accuracy": float(c) / int(n), "count": int(n)}
            for t, c, n in zip(self.types, self.correct, self.total)
            if n > 0
        }
        return {"accuracy": float(self.correct.sum()) / total if total else 0.0, "count": total, "per_type": per_type}


def format_accuracy_table(metrics: dict) -> str:
    lines = [f"{'question type':<15}{'accuracy':>10}{'questions':>11}", "-" * 36]
    for qtype, m in metrics["per_type"].items():
        lines.append(f"{qtype:<15}{100 * m['accuracy']:>9.2f}%{m['count']:>11,}")
    lines.append("-" * 36)
    lines.append(f"{'overall':<15}{100 * metrics['accuracy']:>9.2f}%{metrics['count']:>11,}")
    return "\n".join(lines)
