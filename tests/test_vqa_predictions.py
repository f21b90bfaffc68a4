"""The per-question predictions file: each prediction lands on its own row, whatever order the dataset gives."""
from pathlib import Path

import torch

from vqa.data import CSVData, Row, VQADataset
from vqa.predictions import predictions_table
from vqa.text import AnswerVocab, Tokenizer


def test_predictions_land_on_their_rows_though_the_dataset_groups_questions_by_image(tmp_path):
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    # Rows made in code: no CSV numbered them or wrote their images.
    rows = [Row(images[i % 2], f"Question {i}?", answer, "other", f"row {i}")
            for i, answer in enumerate(["red", "blue", "red", "green", "blue"])]
    answers = AnswerVocab.build(r.answer for r in rows)
    dataset = VQADataset(rows, None, Tokenizer.build(r.question for r in rows), answers)
    assert dataset.row_order == [0, 2, 4, 1, 3]  # a.png's questions, then b.png's
    # The model's answers in the dataset's order: the answer of the row each question comes from, but row 3's.
    predicted = [answers.id(rows[i].answer) if i != 3 else answers.id("red") for i in dataset.row_order]
    batches = [(torch.tensor(predicted[:2]), torch.tensor([0.5, 0.25])),
               (torch.tensor(predicted[2:]), torch.tensor([0.125, 1.0, 0.75]))]
    table = predictions_table(CSVData(tmp_path / "q.csv", rows), dataset, batches, answers, with_answers=True)
    probability = dict(zip(dataset.row_order, [0.5, 0.25, 0.125, 1.0, 0.75]))
    assert [(r["question"], r["prediction"], r["correct"], r["probability"]) for r in table] == [
        (row.question, "red" if i == 3 else row.answer, str(int(i != 3)), f"{probability[i]:.4f}")
        for i, row in enumerate(rows)]
    assert [r["image"] for r in table] == [str(Path(images[i % 2])) for i in range(5)]
