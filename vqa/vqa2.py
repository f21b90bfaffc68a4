"""VQA v2's JSON files as this project's CSV: every question with its ten answers.

    python -m vqa.vqa2 --questions v2_OpenEnded_mscoco_train2014_questions.json \\
        --annotations v2_mscoco_train2014_annotations.json --images data/vqa/train2014 --out data/vqa/train.csv

The CSV has ``image``, ``question``, ``answers`` (the ten, separated by ``|``) and ``question_type``: ``yes/no``
and ``count`` from VQA v2's answer types ``yes/no`` and ``number``, empty for ``other`` (inferred from the wording
when read). Without ``--annotations`` (the test splits) it has ``image`` and ``question``, for ``python -m
vqa.predict --csv``. The images are COCO's, ``COCO_<subtype>_<image id in 12 digits>.jpg`` in ``--images``; the
subtype is the questions file's ``data_subtype`` (``test-dev2015`` questions are about ``test2015`` images) unless
``--subtype`` names it.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from .cli import check_new_out, first_line, run_tool, user_path, write_out
from .data import ANSWER_SEPARATOR, ANSWERS_COLUMN
from .errors import VQAError, unreadable
from .text import normalize_answer

__all__ = ["vqa2_rows", "asked_questions", "read_vqa2_file", "vqa2_field", "coco_image", "image_subtype", "main"]

# VQA v2's answer types as this project's question types; "other" is left to the wording.
_TYPES = {"yes/no": "yes/no", "number": "count"}
# The first line of the CSVs this tool writes (an empty file too): with --overwrite, it replaces only such a file.
_HEADERS = ("", "image,question", f"image,question,{ANSWERS_COLUMN},question_type")
# The subtype of a questions file whose images are another split's.
_IMAGE_SUBTYPES = {"test-dev2015": "test2015"}


def read_vqa2_file(path: Path, option: str, key: str) -> tuple[dict, list]:
    """The JSON object in ``path`` and the list under its ``key``; errors say which file and what it lacks."""
    if not path.is_file():
        raise VQAError(f"{option} '{path}' {'is a folder' if path.is_dir() else 'does not exist'}; give VQA v2's "
                       f"JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise unreadable(option, path, e) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise VQAError(f"{option} '{path}' is not a JSON file ({e}); give VQA v2's JSON file") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise VQAError(f"{option} '{path}' holds no list '{key}', as VQA v2's {option[2:]} file does; check that "
                       f"this is that file")
    if not data[key]:
        raise VQAError(f"{option} '{path}' holds no {key}: its list '{key}' is empty; give the split's whole file")
    return data, data[key]


def vqa2_field(entry, name: str, kind: type, where: str):
    """``entry[name]``, which must be a ``kind`` (a bool is no int); the error names ``where`` it was looked for."""
    value = entry.get(name) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise VQAError(f"{where} has no {kind.__name__} '{name}' (got {value!r}); check that this is VQA v2's file")
    return value


def coco_image(subtype: str, image_id: int) -> str:
    """The file name of a COCO image: ``COCO_<subtype>_<image id in 12 digits>.jpg``."""
    return f"COCO_{subtype}_{image_id:012d}.jpg"


def image_subtype(info: dict, given: str | None, questions_path: Path) -> str:
    """The subtype in the images' names: ``given`` (``--subtype``), else the questions file's ``data_subtype`` (that
    of the split whose images it asks about)."""
    if given:
        return given
    subtype = info.get("data_subtype")
    if not isinstance(subtype, str) or not subtype:
        raise VQAError(f"--questions '{questions_path}' names no data_subtype; give the images' with --subtype, "
                       f"e.g. --subtype train2014")
    return _IMAGE_SUBTYPES.get(subtype, subtype)


def asked_questions(questions: list, questions_path: Path) -> Iterator[tuple[str, int, int, str]]:
    """Each entry of a questions file's list, in its order, as ``(where, question_id, image_id, question)``, ``where``
    naming it for messages and the question's whitespace collapsed; a question_id asked twice is an error."""
    asked = set()
    for i, entry in enumerate(questions):
        where = f"{questions_path} question {i}"
        qid = vqa2_field(entry, "question_id", int, where)
        image_id = vqa2_field(entry, "image_id", int, where)
        question = " ".join(vqa2_field(entry, "question", str, where).split())
        if qid in asked:
            raise VQAError(f"{where} asks question_id {qid} a second time; give VQA v2's file as it comes")
        asked.add(qid)
        yield where, qid, image_id, question


def vqa2_rows(questions: list, annotations: list | None, images: Path, subtype: str, questions_path: Path,
              annotations_path: Path | None) -> tuple[list[dict[str, str]], Counter]:
    """The CSV's rows, in the questions file's order, with the image paths as ``images / name``; also what was left
    out: ``answers`` empty once normalised, questions ``unanswered`` once those were, and questions ``repeated``
    exactly (image, question, answers), which would count twice."""
    by_question = {}
    for i, entry in enumerate(annotations or []):
        where = f"{annotations_path} annotation {i}"
        qid = vqa2_field(entry, "question_id", int, where)
        if qid in by_question:
            raise VQAError(f"{where} is the second annotation of question {qid}; give VQA v2's file as it comes")
        by_question[qid] = entry
    rows, left_out, asked, written = [], Counter(), set(), set()
    for where, qid, image_id, question in asked_questions(questions, questions_path):
        if not question:
            raise VQAError(f"{where} (question_id {qid}) asks nothing: its question is empty; give VQA v2's file as it "
                           f"comes")
        asked.add(qid)
        row = {"image": str(images / coco_image(subtype, image_id)), "question": question}
        if annotations is not None:
            if qid not in by_question:
                raise VQAError(f"{where} (question_id {qid}) has no annotation in {annotations_path}; give the "
                               f"annotations of the same split as the questions")
            note = by_question[qid]
            where = f"{annotations_path}, the annotation of question {qid}"
            given = [vqa2_field(a, "answer", str, where).strip().replace(ANSWER_SEPARATOR, " ")
                     for a in vqa2_field(note, "answers", list, where)]
            kept = [a for a in given if normalize_answer(a)]
            left_out["answers"] += len(given) - len(kept)
            if not kept:
                left_out["unanswered"] += 1
                continue
            row[ANSWERS_COLUMN] = ANSWER_SEPARATOR.join(kept)
            answer_type = note.get("answer_type")
            row["question_type"] = _TYPES.get(answer_type, "") if isinstance(answer_type, str) else ""
        key = tuple(row.values())
        if key in written:  # the CSV reader refuses it: it would count twice
            left_out["repeated"] += 1
            continue
        written.add(key)
        rows.append(row)
    strays = sorted(set(by_question) - asked)
    if strays:
        raise VQAError(f"{annotations_path} annotates {len(strays)} question(s) that {questions_path} does not ask "
                       f"(question_id {strays[0]}, ...); give the questions of the same split as the annotations")
    return rows, left_out


def _said(left_out: Counter, missing: list) -> list[str]:
    """What was left out, a line each."""
    said = {"no image": f"question(s) about {len(missing)} image(s) not in --images (--skip_missing_images)",
            "answers": "answer(s) empty once normalised (all punctuation)",
            "unanswered": "question(s) with no answer left once those were",
            "repeated": "question(s) repeating an earlier one exactly (image, question and answers), which would "
                        "count twice"}
    return [f"left out {left_out[what]} {text}" for what, text in said.items() if left_out[what]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqa.vqa2", description=__doc__.splitlines()[0])
    parser.add_argument("--questions", required=True, type=user_path,
                        help="VQA v2's questions JSON (v2_OpenEnded_mscoco_<split>_questions.json)")
    parser.add_argument("--annotations", type=user_path,
                        help="VQA v2's annotations JSON of the same split (none for the test splits)")
    parser.add_argument("--images", required=True, type=user_path, help="the folder of the split's COCO images")
    parser.add_argument("--out", required=True, type=user_path, help="the CSV to write")
    parser.add_argument("--subtype", help="the images' subtype in their names (default: the questions file's "
                                          "data_subtype; test2015 for test-dev2015)")
    parser.add_argument("--skip_missing_images", "--skip-missing-images", action="store_true",
                        help="leave out the questions about images not in --images, and count them")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        check_new_out(args.out, args.overwrite, {"--questions": args.questions, "--annotations": args.annotations},
                      "train.csv", lambda path: first_line(path) in _HEADERS, "a CSV python -m vqa.vqa2 wrote")
        if not args.images.is_dir():
            raise VQAError(f"--images '{args.images}' is not a folder; give the folder of the split's COCO images")
        info, questions = read_vqa2_file(args.questions, "--questions", "questions")
        annotations = read_vqa2_file(args.annotations, "--annotations", "annotations")[1] if args.annotations else None
        subtype = image_subtype(info, args.subtype, args.questions)
        folder = args.out.resolve().parent  # as the CSV reader resolves its folder and the images
        rows, left_out = vqa2_rows(questions, annotations, args.images.resolve(), subtype, args.questions,
                                   args.annotations)
        found = {image: Path(image).is_file() for image in {row["image"] for row in rows}}
        missing = sorted(image for image, there in found.items() if not there)
        if missing and not args.skip_missing_images:
            raise VQAError(f"{len(missing)} of the {len(found)} images are not in --images '{args.images}', e.g. "
                           f"{missing[0]}; check --images and --subtype, or pass --skip_missing_images to leave their "
                           f"questions out")
        left_out["no image"] = sum(not found[row["image"]] for row in rows)
        rows = [row for row in rows if found[row["image"]]]
        if not rows:
            raise VQAError(f"no question is left to write to --out '{args.out}': {'; '.join(_said(left_out, missing))}; "
                           f"check the files and --images")
        outside = set()
        for row in rows:  # relative to the CSV's folder, as the CSV reader takes them, where it will find them there
            image = Path(row["image"])
            if image.resolve().is_relative_to(folder):  # not a link to a file elsewhere
                # relpath, not relative_to: the name may be a link from another folder to a file in this one
                row["image"] = Path(os.path.relpath(image, folder)).as_posix()
            else:
                outside.add(image)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_out(args.out, text.getvalue(), "--out")
    except VQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(rows)} questions about {len(found) - len(missing)} images to {args.out}")
    for line in _said(left_out, missing):
        print(line)
    if outside:
        print(f"{len(outside)} image(s) are outside the CSV's folder (or links to files outside it), so the CSV names them "
              f"by absolute paths: train with --allow_outside_paths (the tools take it too), or put the images under "
              f"{folder}")
    return 0


if __name__ == "__main__":
    run_tool(main)
