"""A run's predictions as VQA v2's results file, for its evaluation server (test-dev, test-std) or its own
evaluation code (val).

    python -m vqa.vqa2 --questions v2_OpenEnded_mscoco_test-dev2015_questions.json --images data/vqa/test2015 \\
        --out data/vqa/test-dev.csv
    python -m vqa.predict --run runs/dinov2_base_vqa --csv data/vqa/test-dev.csv --out test-dev_predictions.csv
    python -m vqa.vqa2_results --questions v2_OpenEnded_mscoco_test-dev2015_questions.json \\
        --predictions test-dev_predictions.csv --out vqa_test-dev2015_results.json

The results file is a JSON list of ``{"question_id": ..., "answer": ...}``, one for each question of the questions
file, in its order. A predictions file has no question ids: a question finds its prediction by its image's file
name and its wording, so a question that the CSV left out as a repeat of another gets that one's answer.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from .cli import check_new_out, run_tool, user_path, write_out
from .errors import VQAError, unreadable
from .vqa2 import asked_questions, coco_image, image_subtype, read_vqa2_file

__all__ = ["read_predictions", "vqa2_results", "main"]

_NEEDED = ("image", "question", "prediction")  # of the columns python -m vqa.predict --csv and vqa.evaluate write
_MADE_BY = "python -m vqa.predict --csv (or vqa.evaluate --predictions)"


def _key(image: str, question: str) -> tuple[str, str]:
    """A question as both files give it: its image's file name (the CSV may name it by any path) and its words."""
    return image.replace("\\", "/").rsplit("/", 1)[-1], " ".join(question.split())


def _results_like(path: Path) -> bool:
    """Whether ``path`` is empty or starts as a results file: an earlier one, which --overwrite may replace."""
    try:
        with path.open("rb") as f:
            start = f.read(64)
    except OSError:
        return False
    text = start.decode("utf-8", "replace").lstrip("\ufeff").replace(" ", "").replace("\n", "")
    return text in ("", "[]") or text.startswith('[{"question_id"')


def read_predictions(path: Path) -> dict[tuple[str, str], str]:
    """The predictions file's answer to each (image file name, question)."""
    if not path.is_file():
        raise VQAError(f"--predictions '{path}' {'is a folder' if path.is_dir() else 'does not exist'}; give the CSV "
                       f"{_MADE_BY} wrote")
    found: dict[tuple[str, str], tuple[str, int]] = {}
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            missing = [column for column in _NEEDED if column not in (reader.fieldnames or ())]
            if missing:
                raise VQAError(f"--predictions '{path}' has no {', '.join(missing)} column, as a predictions file "
                               f"does; give the CSV {_MADE_BY} wrote")
            for record in reader:
                line = reader.line_num
                if any(record[column] is None for column in _NEEDED) or None in record:
                    what = "more fields than its header" if None in record else "fewer fields than its header"
                    raise VQAError(f"--predictions '{path}' line {line} has {what}; give the CSV {_MADE_BY} wrote, "
                                   f"unedited")
                key, answer = _key(record["image"], record["question"]), record["prediction"].strip()
                if not answer:
                    raise VQAError(f"--predictions '{path}' line {line} has an empty prediction; give the CSV "
                                   f"{_MADE_BY} wrote, unedited")
                if key in found and found[key][0] != answer:
                    raise VQAError(f"--predictions '{path}' answers one question twice, differently: line "
                                   f"{found[key][1]} '{found[key][0]}' and line {line} '{answer}' ({key[0]}: "
                                   f"{key[1]!r}); give one run's predictions")
                found.setdefault(key, (answer, line))
    except OSError as e:
        raise unreadable("--predictions", path, e) from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise VQAError(f"--predictions '{path}' is not a CSV file ({e}); give the CSV {_MADE_BY} wrote") from None
    return {key: answer for key, (answer, _) in found.items()}


def vqa2_results(questions: list, predictions: dict[tuple[str, str], str], subtype: str,
                 questions_path: Path) -> tuple[list[dict], list[tuple[int, tuple[str, str]]], int]:
    """The results, in the questions' order; the questions with no prediction, ``(question_id, key)``; and how many
    predictions answer no question of the file."""
    results, unanswered, used = [], [], set()
    for _, qid, image_id, question in asked_questions(questions, questions_path):
        key = _key(coco_image(subtype, image_id), question)
        if key in predictions:
            results.append({"question_id": qid, "answer": predictions[key]})
            used.add(key)
        else:
            unanswered.append((qid, key))
    return results, unanswered, len(predictions.keys() - used)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqa.vqa2_results", description=__doc__.splitlines()[0])
    parser.add_argument("--questions", required=True, type=user_path,
                        help="VQA v2's questions JSON the predicted CSV was made from (python -m vqa.vqa2)")
    parser.add_argument("--predictions", required=True, type=user_path,
                        help="the CSV python -m vqa.predict --csv (or vqa.evaluate --predictions) wrote")
    parser.add_argument("--out", required=True, type=user_path, help="the results JSON to write")
    parser.add_argument("--subtype", help="the images' subtype in their names, as given to python -m vqa.vqa2 "
                                          "(default: the questions file's data_subtype; test2015 for test-dev2015)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        check_new_out(args.out, args.overwrite, {"--questions": args.questions, "--predictions": args.predictions},
                      "results.json", _results_like, "a results file (a JSON list of question_id and answer)")
        info, questions = read_vqa2_file(args.questions, "--questions", "questions")
        subtype = image_subtype(info, args.subtype, args.questions)
        predictions = read_predictions(args.predictions)
        results, unanswered, strays = vqa2_results(questions, predictions, subtype, args.questions)
        if unanswered:
            qid, (image, question) = unanswered[0]
            names = {name for name, _ in predictions}
            hint = ""
            if not results and names and not any(key[0] in names for _, key in unanswered):  # no image in common
                hint = (f"; none of their images is named as the predictions' ({next(iter(names))}): if the images' "
                        f"subtype is another, give it with --subtype")
            raise VQAError(f"{len(unanswered)} of the {len(questions)} questions of --questions have no prediction in "
                           f"--predictions '{args.predictions}', e.g. question_id {qid} ({image}: {question!r}){hint}; "
                           f"predict every question of the CSV python -m vqa.vqa2 made from these questions (without "
                           f"--skip_bad_rows); such a CSV leaves out the questions about images --skip_missing_images "
                           f"left out, and, made with --annotations, those with no answer left once normalised, and "
                           f"those have no prediction either")
        write_out(args.out, json.dumps(results), "--out")
    except VQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote the answers to the {len(results)} questions of {args.questions} to {args.out}")
    if strays:
        print(f"left out {strays} prediction(s) of questions that {args.questions} does not ask")
    return 0


if __name__ == "__main__":
    run_tool(main)
