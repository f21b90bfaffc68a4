"""Per-answer loss weights that balance rare answers.

    python -m vqa.answer_weights --train_csv data/train.csv --out answer_weights.json

For an answer seen ``n_a`` times among ``N`` training answers with ``K`` distinct ones (a CSV with an ``answers``
column counts each person's answer; with ``--min_answer_count``, of the answers given that many times alone):

    w_a = clip( sqrt(N / (K * n_a)), min_weight, max_weight )

The square root softens plain inverse frequency (which lets a few rare answers dominate the loss);
an answer of average frequency (``n_a = N / K``) gets 1; the clip keeps extremes in [0.1, 10].
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from .cli import at_least, run_tool, user_path, write_out
from .errors import VQAError, unreadable
from .text import normalize_answer

__all__ = ["compute_answer_weights", "load_answer_weights"]


def compute_answer_weights(answers: Iterable[str], min_weight: float = 0.1, max_weight: float = 10.0,
                           min_count: int = 1) -> dict[str, float]:
    """``{normalised answer: weight}`` by the formula in this module's docstring, over the answers given at least
    ``min_count`` times (a run's classes under its ``min_answer_count``)."""
    counts = Counter(normalize_answer(a) for a in answers)
    if not counts:
        raise VQAError("cannot compute answer weights from no answers")
    counts = Counter({a: n for a, n in counts.items() if n >= min_count})
    if not counts:
        raise VQAError(f"no answer is given {min_count} times (--min_answer_count), so none would be weighed; give "
                       f"the training run's min_answer_count")
    total, distinct = sum(counts.values()), len(counts)
    return {
        a: min(max_weight, max(min_weight, math.sqrt(total / (distinct * n))))
        for a, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    }


def load_answer_weights(path: str | Path) -> dict[str, float]:
    """Reads a weights JSON; keys are normalised, values must be finite and > 0."""
    path = Path(path)
    make = "python -m vqa.answer_weights --train_csv TRAIN_CSV --out FILE"
    if path.is_dir():
        raise VQAError(f"answer weights file '{path}' is a folder; give the JSON file itself (make one with {make})")
    if not path.is_file():
        raise VQAError(f"answer weights file '{path}' does not exist; make one with {make}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_Pairs)  # keeps repeated keys
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VQAError(f"answer weights file '{path}' is not valid JSON: {e}") from None
    except RecursionError:
        raise VQAError(f"answer weights file '{path}' is nested too deeply to read; it holds one object of "
                       f"answer: weight (make one with {make})") from None
    except ValueError as e:  # an int past Python's digit limit (4300)
        raise VQAError(f"answer weights file '{path}' holds a number too long to read ({e}); a weight is a number "
                       f"> 0 such as 1.5") from None
    except OSError as e:
        raise unreadable("answer weights file", path, e) from None
    if not isinstance(raw, _Pairs):
        raise VQAError(f"answer weights file '{path}' must hold an object of answer: weight")
    weights, spelt = {}, {}
    for answer, weight in raw:
        number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not number or not 0 < weight <= sys.float_info.max:  # nan and inf fail it, and a float-overflowing int
            raise VQAError(f"answer weights file '{path}': weight of '{answer}' must be a number > 0, got {weight!r}")
        key = normalize_answer(answer)
        if not key:  # training refuses such answers, so the weight would never be used
            raise VQAError(f"answer weights file '{path}': the answer '{answer}' is empty once normalised (it is all "
                           f"punctuation, which is dropped), so no answer can match it; remove it")
        if key in weights:  # one would silently replace the other, the file's order deciding which
            both = (f"'{answer}' is given twice" if spelt[key] == answer
                    else f"'{spelt[key]}' and '{answer}' are both the answer '{key}' once normalised")
            raise VQAError(f"answer weights file '{path}': {both} (weights {weights[key]:g} and {float(weight):g}); "
                           f"keep one of them")
        weights[key], spelt[key] = float(weight), answer
    return weights


def _weights_like(path: Path) -> bool:
    """Whether ``path`` holds a JSON object of numbers: an earlier weights file, perhaps one this module now
    refuses (two keys for one answer), which a new one may replace. Not a JSON Lines file: a run's steps.jsonl
    of one line is such an object too."""
    if path.suffix.lower() == ".jsonl":
        return False
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError, RecursionError):  # ValueError: JSON's and the decoder's errors
        return False
    return isinstance(raw, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw.values())


class _Pairs(list):
    """A JSON object's (key, value) pairs in file order, repeated keys included."""

    def __repr__(self) -> str:
        return repr(dict(self))


def main(argv: list[str] | None = None) -> int:
    from .data import read_csv

    parser = argparse.ArgumentParser(prog="python -m vqa.answer_weights",
                                     description="Per-answer loss weights that balance rare answers.")
    parser.add_argument("--train_csv", "--train-csv", required=True, type=user_path,
                        help="the training CSV whose answers are counted")
    parser.add_argument("--out", required=True, type=user_path,
                        help="JSON file to write (train with --answer_weights OUT)")
    parser.add_argument("--min_weight", "--min-weight", type=float, default=0.1,
                        help="w = clip(sqrt(N / (K * n)), min, max) for an answer seen n times among N questions "
                             "with K answers (default: 0.1)")
    parser.add_argument("--max_weight", "--max-weight", type=float, default=10.0, help="(default: 10.0)")
    parser.add_argument("--min_answer_count", "--min-answer-count", type=at_least(1), default=1,
                        help="weigh only the answers given at least this many times, the training run's classes "
                             "under its min_answer_count (default: 1, every answer)")
    parser.add_argument("--skip_bad_rows", action="store_true", help="skip and count bad rows instead of stopping")
    parser.add_argument("--allow_outside_paths", action="store_true",
                        help="let image paths leave the CSV's folder (absolute or ../)")
    args = parser.parse_args(argv)
    try:
        if not 0 < args.min_weight <= args.max_weight < math.inf:  # what load_answer_weights will accept
            raise VQAError(f"--min_weight and --max_weight must be finite, > 0, and min <= max; got "
                           f"{args.min_weight} and {args.max_weight}")
        if args.out.is_dir():
            raise VQAError(f"--out '{args.out}' is a folder; give the JSON file to write, "
                           f"e.g. {args.out / 'answer_weights.json'}")
        if args.out.exists() and not args.out.is_file():  # a pipe or device: reading it to look would block
            raise VQAError(f"--out '{args.out}' exists and is not a file; give the JSON file to write")
        if args.out.exists() and not _weights_like(args.out):  # the CSV, a run's answers.json: kept
            other = args.out.with_name("answer_weights.json")
            raise VQAError(f"--out '{args.out}' exists and is not an answer weights file (a JSON object of answer: "
                           f"number), so it is not written over; give another path"
                           f"{f', e.g. {other}' if other != args.out else ''}")
        data = read_csv(args.train_csv, skip_bad_rows=args.skip_bad_rows, allow_outside_paths=args.allow_outside_paths)
        weights = compute_answer_weights((a for r in data.rows for a in r.all_answers), args.min_weight,
                                         args.max_weight, args.min_answer_count)
        write_out(args.out, json.dumps(weights, indent=1) + "\n", "--out")
    except VQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if data.skipped:
        print(data.skipped_note())
    low, high = min(weights.values()), max(weights.values())
    print(f"wrote {len(weights)} answer weights ({low:.3g} to {high:.3g}) to {args.out}")
    return 0


if __name__ == "__main__":
    run_tool(main)
