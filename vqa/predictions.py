"""A trained run's answer to every question of a CSV, written as a CSV of its own, one row per question in the
input's order: ``python -m vqa.predict --csv`` (questions with or without answers) and ``python -m vqa.evaluate
--predictions`` (with the answer and whether the prediction matched it, for error analysis; for a question with
several answers, all of them, separated by ``|``, and the prediction's VQA accuracy, 0 to 1).
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import torch
from torch import Tensor

from .cli import first_line, write_out
from .data import ANSWER_SEPARATOR, CSVData, VQADataset
from .errors import VQAError
from .metrics import vqa_credit
from .text import AnswerVocab

__all__ = ["COLUMNS", "ANSWER_COLUMNS", "check_out", "predictions_table", "write_predictions"]

# ``row``: the input row's number as the tools' messages count it (the header and blank lines are no rows), to join
# the two files on; rows --skip_bad_rows leaves out are not in the file.
COLUMNS = ("row", "image", "question", "question_type", "prediction", "probability")
ANSWER_COLUMNS = ("row", "image", "question", "question_type", "answer", "prediction", "probability", "correct")


def check_out(path: Path, option: str, csv_path: Path) -> None:
    """Refuses a ``path`` that cannot be written, the input ``csv_path`` itself, or a file other than an earlier
    predictions file: found before the model runs, so a mistake costs no time."""
    if path.is_dir():
        raise VQAError(f"{option} '{path}' is a folder; give the CSV file to write, e.g. {path / 'predictions.csv'}")
    if path.exists() and not path.is_file():  # a pipe or a device: reading it to look would block
        raise VQAError(f"{option} '{path}' exists and is not a file; give the CSV file to write")
    folder = next(p for p in path.absolute().parents if p.exists())  # the folder, or where the missing ones begin
    if not folder.is_dir():
        raise VQAError(f"{option} '{path}' cannot be written: '{folder}' is a file, not a folder; give another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise VQAError(f"{option} '{path}' cannot be written: folder '{folder}' is not writable; give another path")
    if path.exists() and csv_path.exists() and os.path.samefile(path, csv_path):
        raise VQAError(f"{option} '{path}' is the input CSV (--csv), which is not written over; give another path")
    if path.exists() and not _predictions_like(path):
        raise VQAError(f"{option} '{path}' exists and is not a predictions file (its first line is not "
                       f"{','.join(COLUMNS)} or {','.join(ANSWER_COLUMNS)}), so it is not written over; give "
                       f"another path")


def _predictions_like(path: Path) -> bool:
    """Whether ``path`` is empty or starts with a predictions file's header (a spreadsheet may have saved it with a
    byte order mark, or CRLF line ends): an earlier one, which a new one may replace."""
    return first_line(path) in ("", ",".join(COLUMNS), ",".join(ANSWER_COLUMNS))


def predictions_table(data: CSVData, dataset: VQADataset, predicted: list[tuple[Tensor, Tensor]],
                      answers: AnswerVocab, with_answers: bool) -> list[dict[str, str]]:
    """One record per row of ``data``, in its order, from ``predicted``: the ``(class, probability)`` batches
    ``evaluate`` collected over ``dataset`` in the dataset's order. ``image`` as the CSV writes it."""
    classes = [int(i) for batch, _ in predicted for i in batch]
    probabilities = [float(p) for _, batch in predicted for p in batch]
    order = dataset.row_order  # the row of each question, in the order the dataset gives them
    if len(classes) != len(order):
        raise ValueError(f"{len(classes)} predictions for {len(order)} questions")
    by_row = {row: (c, p) for row, c, p in zip(order, classes, probabilities)}
    table = []
    for i, row in enumerate(data.rows):
        c, p = by_row[i]
        record = {"row": str(row.number), "image": row.given_image or str(row.image), "question": row.question,
                  "question_type": row.question_type, "prediction": answers.itos[c], "probability": f"{p:.4f}"}
        if with_answers:
            given = row.all_answers
            record["answer"] = ANSWER_SEPARATOR.join(given)
            matches = sum(answers.id(a) == c for a in given)  # as evaluation counts it
            record["correct"] = f"{float(vqa_credit(torch.tensor(matches), torch.tensor(len(given)))):.4g}"
        table.append(record)
    return table


def write_predictions(path: Path, table: list[dict[str, str]], option: str) -> None:
    """Writes ``table`` to ``path`` as CSV, atomically (a crash leaves the old file or none)."""
    columns = ANSWER_COLUMNS if table and "answer" in table[0] else COLUMNS
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    write_out(path, text.getvalue(), option)
