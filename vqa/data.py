"""VQA data: a validating CSV reader, safe image loading, and a dataset that batches questions by image.

A CSV has one row per question with columns ``image`` (a path relative to the CSV's folder), ``question``,
``answer`` and optionally ``question_type``; extra columns are ignored. Every problem is reported as a
``VQAError`` naming the file and row. With ``skip_bad_rows`` a bad row is skipped and counted instead.

In place of ``answer``, an ``answers`` column may give several people's answers to each question, separated by
``|`` (VQA v2 has ten): training targets each answer by its share of them, and evaluation scores a prediction
with VQA v2's accuracy (``metrics.vqa_credit``).

Questions about the same image share one pass of the image encoder: an item of ``VQADataset`` is an
image with all its questions, and ``collate`` returns an ``image_index`` mapping questions to images.
"""
from __future__ import annotations

import csv
import difflib
import io
import os
import stat
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from .errors import VQAError, unreadable
from .text import QUESTION_TYPES, AnswerVocab, Tokenizer, infer_question_type, normalize_answer

__all__ = [
    "Row", "CSVData", "read_csv", "load_image", "bad_images", "check_images", "read_split", "build_transform",
    "VQADataset", "collate", "chunks",
]

REQUIRED_COLUMNS = ("image", "question", "answer")
ANSWERS_COLUMN = "answers"  # in place of "answer": several answers to each question, separated by "|"
ANSWER_SEPARATOR = "|"
_OR_ANSWERS = f" (or {ANSWERS_COLUMN}: several answers to each question, separated by {ANSWER_SEPARATOR})"


@dataclass(frozen=True)
class Row:
    image: Path  # resolved absolute path
    question: str
    answer: str  # raw text; normalised when looked up. With several answers, the most frequent (the first of a tie)
    question_type: str
    where: str  # "file.csv row 12 (line 13)", for messages
    number: int = 0  # the row's number, as messages count it (12 there: the header and blank lines are no rows)
    given_image: str = ""  # the image as the CSV writes it ("" for a row made otherwise: ``image`` then)
    answers: tuple[str, ...] = ()  # every answer an ``answers`` column gives, raw, in its order; () for one answer

    @property
    def all_answers(self) -> tuple[str, ...]:
        """The row's answers, raw: its ``answers``, or its one ``answer``."""
        return self.answers or (self.answer,)


@dataclass
class CSVData:
    path: Path
    rows: list[Row]
    skipped: list[str] = field(default_factory=list)  # one message per skipped row

    def skipped_note(self) -> str:
        """What ``--skip_bad_rows`` left out, as the tools say it: the count, and a row with its fault (the CSV's
        faults are found before the images', so not always the first)."""
        return f"skipped {len(self.skipped)} bad row(s) (--skip_bad_rows), e.g. {self.skipped[0]}"


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise VQAError(
            f"{path}: line {line} is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
            f"re-save the file as UTF-8"
        ) from None


def _header_hint(missing: str, columns: list[str]) -> str:
    """What a header that lacks a column most likely got wrong: another separator, the case, a misspelling, or
    no header line at all."""
    for separator, name in ((";", "semicolons"), ("\t", "tabs")):
        if len(columns) == 1 and separator in columns[0]:
            return f"; the columns are separated by {name}: save the file with commas"
    for column in columns:
        for name in (missing, ANSWERS_COLUMN) if missing == "answer" else (missing,):
            if column.lower() == name:
                return f"; names are lower case: '{column}' should be '{name}'"
    close = difflib.get_close_matches(missing, columns, n=1, cutoff=0.75)
    if close:
        return f" (is '{close[0]}' a misspelt '{missing}'?)"
    if not set(columns) & set(REQUIRED_COLUMNS + ("question_type",)):
        return "; the first line is read as the header: add one above the rows"
    return ""


def read_csv(
    path: str | Path,
    *,
    require_answer: bool = True,
    skip_bad_rows: bool = False,
    allow_outside_paths: bool = False,
) -> CSVData:
    """Reads and validates a VQA CSV; image paths are resolved but the images are not opened here.

    A path that leaves the CSV's folder (absolute, or through ``..``) is refused unless
    ``allow_outside_paths``. Exact duplicate rows are an error (skipped with ``skip_bad_rows``) where answers are
    required: they would count twice. Without answers (questions to predict) a question may be asked twice.
    """
    path = Path(path)
    if path.is_dir():
        raise VQAError(f"CSV file '{path}' is a folder; give the CSV file itself")
    if not path.is_file():
        raise VQAError(f"CSV file '{path}' does not exist; check the path")
    try:
        text = _decode(path, path.read_bytes())
    except OSError as e:
        raise unreadable("CSV file", path, e) from None
    if not text.strip():
        raise VQAError(f"{path} is empty; it needs a header row '{','.join(REQUIRED_COLUMNS)}' and one row per question")
    lines = io.StringIO(text, newline="").readlines()  # read by the csv reader, numbered by the quote check
    reader = csv.DictReader(lines)
    # The header is the first line with a name in it: empty lines above it (a spreadsheet's empty first rows, ",,")
    # are no header, as they are no row below it, and neither is the line "sep=," some spreadsheets write first.
    header = next((row for row in reader.reader if any(f.strip() for f in row) and row != ["sep=", ""]), [])
    columns = [c.strip() for c in header]
    reader.fieldnames = columns
    repeated = sorted({c for c in columns if c and columns.count(c) > 1})
    if repeated:  # the reader would keep the last such column's fields, silently
        raise VQAError(f"{path} has the column '{repeated[0]}' {columns.count(repeated[0])} times in its header "
                       f"(line {reader.reader.line_num}); keep one, or rename the others")
    # The column the answers are read from: none for questions to predict.
    answer_column = None if not require_answer else ANSWERS_COLUMN if ANSWERS_COLUMN in columns else "answer"
    if answer_column == ANSWERS_COLUMN and "answer" in columns:
        raise VQAError(f"{path} has both an 'answer' and an 'answers' column; keep one: 'answer' for one answer to "
                       f"each question, 'answers' for several, separated by {ANSWER_SEPARATOR}")
    required = REQUIRED_COLUMNS[:2] + ((answer_column,) if answer_column else ())
    missing = [c for c in required if c not in columns]
    if missing:
        raise VQAError(
            f"{path} has no '{missing[0]}' column (columns found: {', '.join(columns) or 'none'}); "
            f"the header must name {', '.join(required)}{_OR_ANSWERS if missing[0] == 'answer' else ''}"
            f"{_header_hint(missing[0], columns)}"
        )
    root = path.parent.resolve()
    data = CSVData(path, [])
    seen: dict[tuple, str] = {}
    image_at = columns.index("image")
    need = max(columns.index(c) for c in required) + 1  # fields a row gives (trailing optional ones may be left out)
    end = reader.reader.line_num  # the line the header ends on
    number = 0
    for record in _records(reader, path, lines):
        start, end = _first_line(lines, end + 1, reader.line_num), reader.line_num
        if _empty(record):  # no row, as a blank line is none: not counted, not skipped
            continue
        number += 1
        # Where a quoted field runs over lines, all of them: the row begins on the first.
        at = f"row {number} (line {start})" if start == end else f"row {number} (lines {start} to {end})"
        where = f"{path} {at}"
        if end > start and _holds_rows(lines[start:end], image_at, need, root):
            # A quote left open swallows the lines after it: the rows there would be lost, not just bad.
            raise VQAError(
                f"{path} row {number} runs from line {start} to line {end}: a quote (\") opened on line {start} is "
                f"not closed on it, so the lines up to {end} are read as one row, the rows there inside one field; "
                f"close or remove the quote (--skip_bad_rows cannot tell where the rows inside begin)")
        try:
            if end == len(lines) and _open_at_end(lines[start - 1:end]):  # the reader ends such a field at the end
                raise VQAError(f"{where}: a quote (\") opened on line {start} is not closed before the file ends; close "
                               f"or remove it")
            row = _parse_row(record, where, number, root, answer_column, allow_outside_paths)
            key = (row.image, row.question, row.answer, row.answers, row.question_type)
            if key in seen and require_answer:  # it would count twice; a question asked twice harms no prediction
                raise VQAError(f"{where} repeats {seen[key]} exactly; remove the duplicate")
            seen[key] = at
        except VQAError as e:
            if not skip_bad_rows:
                raise VQAError(f"{e} (or pass --skip_bad_rows to skip such rows)") from None
            data.skipped.append(str(e))
            continue
        data.rows.append(row)
    if not data.rows:
        detail = "it has a header but no rows"
        if data.skipped:
            detail = f"all {len(data.skipped)} rows were bad, the first: {data.skipped[0]}"
        raise VQAError(f"{path} has no usable rows: {detail}")
    return data


def _empty(record: dict) -> bool:
    """A line of spaces, or of empty fields only (``,,``, as spreadsheets write an empty row)."""
    values = [v for k, v in record.items() if k is not None] + record.get(None, [])
    return not any(v and v.strip() for v in values)


def _first_line(lines: list[str], line: int, last: int) -> int:
    """The first of lines ``line`` to ``last`` (numbered from 1) that is not blank: where a row begins."""
    while line < last and not lines[line - 1].strip():
        line += 1
    return line


def _records(reader: csv.DictReader, path: Path, lines: list[str]):
    """The reader's rows; the csv module's own error (a field over its size limit: a quote left open in a
    large file) as ours, naming the line the failed row began on."""
    end = reader.reader.line_num  # the header's last line (the dict reader counts from its first row)
    try:
        for record in reader:
            yield record
            end = reader.line_num
    except csv.Error as e:
        start = _first_line(lines, end + 1, len(lines))
        if '"' not in lines[start - 1]:  # no quote to blame: the line's own field is that long
            raise VQAError(f"{path} line {start}: {e}, with no quote on the line: a field there is far longer than a "
                           f"question, answer or image path; check that this is the VQA CSV, its fields separated "
                           f"by commas") from None
        raise VQAError(f"{path} line {start}: {e}; a quote (\") opened on line {start} and left open makes a field "
                       f"run on to the end of the file: close or remove it") from None


def _open_at_end(last: list[str]) -> bool:
    """Whether the file's last row leaves a quoted field open (``a.png,"What color,red``): the reader ends it
    at the end of the file, where a quote inside an unquoted field (``What is 5" tall?``) is only a character."""
    try:
        list(csv.reader(last, strict=True))
    except csv.Error as e:
        return "end of data" in str(e)  # strict mode's word for it; its other errors are the lenient reader's to judge
    return False


# Suffixes that mark a line's image field as an image path, as a row of its own begins.
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _holds_rows(swallowed: list[str], image_at: int, need: int, root: Path) -> bool:
    """Whether the lines a multi-line row ran on to (each read as a row of its own) hold rows: a quote left
    open. A line is a row where it gives a row's fields with an image path in the image column, or names an
    image file that exists. A question wrapped over lines in a quoted field, commas and all, is fine (its line
    breaks become spaces)."""
    for line in swallowed:
        fields = [f.strip() for f in next(csv.reader([line.rstrip("\r\n")]), [])]
        if len(fields) >= need and Path(fields[image_at]).suffix.lower() in _IMAGE_SUFFIXES:
            return True
        if any(f and os.path.isfile(root / f) for f in fields):  # False on any error (a name too long, say)
            return True
    return False


def _parse_row(record: dict, where: str, number: int, root: Path, answer_column: str | None,
               allow_outside: bool) -> Row:
    if None in record:  # more fields than header columns: a stray comma or an unquoted field
        extra = record[None]
        if not any(f.strip() for f in extra):
            raise VQAError(f"{where} ends with {len(extra)} empty field{'s' if len(extra) > 1 else ''} more than the "
                           f"header has columns: remove the comma{'s' if len(extra) > 1 else ''} at its end, or quote a field "
                           f"that contains a comma")
        raise VQAError(f"{where} has more fields than the header has columns; quote fields that contain commas")
    image = (record.get("image") or "").strip()
    question = " ".join((record.get("question") or "").split())
    answer = (record.get(answer_column) or "").strip() if answer_column else ""
    for name, value in (("image", image), ("question", question)) + (((answer_column, answer),) if answer_column else ()):
        if not value:
            raise VQAError(f"{where} has an empty '{name}'; fill it in or delete the row")
    answers = tuple(a.strip() for a in answer.split(ANSWER_SEPARATOR)) if answer_column == ANSWERS_COLUMN else ()
    if "" in answers:
        raise VQAError(f"{where} has an empty answer among its answers '{answer}' (two {ANSWER_SEPARATOR} in a row, or "
                       f"one at an end); separate the answers with one {ANSWER_SEPARATOR} each")
    given = answers or ((answer,) if answer_column else ())
    normalised = [normalize_answer(a) for a in given]  # once: a VQA v2 split holds millions of answers
    for raw, norm in zip(given, normalised):
        if not norm:
            raise VQAError(f"{where} has the answer '{raw}', which is empty once normalised (it is all "
                           f"punctuation, which is dropped); give the answer in words or digits")
    if answers:
        answer = _most_frequent(answers, normalised)
    elif ANSWER_SEPARATOR in answer:  # "yes|no": several answers under the one-answer header
        raise VQAError(f"{where} has the answer '{answer}', with {ANSWER_SEPARATOR} between answers: several answers to "
                       f"a question go in an '{ANSWERS_COLUMN}' column; rename the 'answer' column to "
                       f"'{ANSWERS_COLUMN}', or take the {ANSWER_SEPARATOR} out of the answer")
    qtype = (record.get("question_type") or "").strip().lower() or infer_question_type(question)
    if qtype not in QUESTION_TYPES:
        raise VQAError(f"{where} has question_type '{qtype}'; use one of {', '.join(QUESTION_TYPES)} or leave it empty")
    if "\0" in image:  # no file name holds one, and the operating system's calls refuse it with a ValueError
        raise VQAError(f"{where}: image path {image!r} holds a NUL character, which no file name can; fix the path")
    candidate = Path(image)
    try:
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    except (RuntimeError, OSError) as e:  # RuntimeError: a symbolic link loop (Python < 3.13)
        raise VQAError(f"{where}: image path '{image}' cannot be followed ({e}); fix the symbolic link or the "
                       f"path") from None
    if not allow_outside and not resolved.is_relative_to(root):
        spelt = Path(os.path.normpath(candidate if candidate.is_absolute() else root / candidate))
        link = f" through a symbolic link (to {resolved})" if spelt.is_relative_to(root) else ""
        raise VQAError(
            f"{where}: image path '{image}' points outside the CSV's folder {root}{link}; "
            f"move the image under it or pass --allow_outside_paths"
        )
    return Row(resolved, question, answer, qtype, where, number, image, answers)


def _most_frequent(answers: tuple[str, ...], normalised: list[str]) -> str:
    """The answer given most often once ``normalised``, as first written; of a tie, the one given first."""
    counts = Counter(normalised)
    most = max(counts.values())
    return next(a for a, norm in zip(answers, normalised) if counts[norm] == most)


def load_image(path: Path) -> Image.Image:
    """Decodes an image to 8-bit RGB, upright as its EXIF orientation says; grey, palette, RGBA and 16-bit images
    are converted.

    Pillow's decompression-bomb limit stays on, and reaching it is an error rather than a warning.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None  # opening it says why
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # reading a pipe would block for ever
        raise VQAError(f"image '{path}' is not a file but a pipe, socket or device; give an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                im = _upright(im)
                if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    im = _to_8bit(np.asarray(im, dtype=np.float64), im.mode)
                elif im.mode == "P" and "transparency" in im.info:
                    im = im.convert("RGBA")  # the palette's transparency would be lost going straight to RGB
                return im.convert("RGB")
    except FileNotFoundError:
        raise VQAError(f"image '{path}' does not exist") from None
    except NotADirectoryError:
        raise VQAError(f"image '{path}' does not exist (a part of its path is a file, not a folder)") from None
    except IsADirectoryError:
        raise VQAError(f"image '{path}' is a folder, not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise VQAError(f"image '{path}' is too large to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        # An errno: the system refused the read (permissions...), which says nothing of the file's bytes.
        if isinstance(e, OSError) and e.errno is not None:
            raise unreadable("image", path, e) from None
        if isinstance(e, UnidentifiedImageError):  # no format Pillow decodes begins this way
            raise VQAError(f"image '{path}' is no image Pillow can decode: it is corrupt, or in a format Pillow does "
                           f"not read (SVG, HEIC, PDF...); convert it to PNG or JPEG") from None
        raise VQAError(f"image '{path}' cannot be decoded ({type(e).__name__}: {e}); it is corrupt or truncated") from None


# EXIF orientation (tag 0x0112) -> the turn that shows the image upright; 1 is upright already.
_EXIF_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}


def _upright(im: Image.Image) -> Image.Image:
    """The image the way viewers show it, and annotators saw it when they wrote "on the left": its EXIF
    orientation applied (a phone photo is often stored sideways with a tag saying so). An EXIF block that does
    not parse leaves the pixels as stored."""
    try:
        with warnings.catch_warnings():  # nor its warnings ("Tag data larger than file"): the image is fine
            warnings.simplefilter("ignore", UserWarning)
            orientation = im.getexif().get(0x0112, 1)  # Orientation
    except Exception:  # Pillow's EXIF parser raises various types on a damaged block
        return im
    turn = _EXIF_TURNS.get(orientation) if isinstance(orientation, int) else None
    # The turn alone: ImageOps.exif_transpose also writes the EXIF block back out, which raises (struct.error,
    # TypeError) on a damaged block that parsed, where the image itself decodes.
    return im.transpose(turn) if turn is not None else im



def _to_8bit(pixels: np.ndarray, mode: str) -> Image.Image:
    top = 65535.0 if mode.startswith("I;16") else max(float(pixels.max()), 1.0)
    scaled = np.clip(pixels / top * 255.0, 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def bad_images(images: list[Path]) -> dict[Path, str]:
    """The images that cannot be loaded (missing, unreadable, corrupt), each with its error."""
    bad = {}
    for image in images:
        try:
            load_image(image)
        except VQAError as e:
            bad[image] = str(e)
    return bad


def check_images(data: CSVData, skip_bad_rows: bool = False,
                 find_bad: Callable[[list[Path]], dict[Path, str]] = bad_images) -> CSVData:
    """Decodes every distinct image once before training, so a bad file fails now, not an hour in.
    ``find_bad`` is ``bad_images`` or one that shares the decoding out among processes."""
    bad = find_bad(list(dict.fromkeys(r.image for r in data.rows)))
    if not bad:
        return data
    first = next(r for r in data.rows if r.image in bad)
    if not skip_bad_rows:
        raise VQAError(
            f"{first.where}: {bad[first.image]} ({len(bad)} bad image(s) in all; fix them or pass --skip_bad_rows)"
        )
    kept = [r for r in data.rows if r.image not in bad]
    skipped = [f"{r.where}: {bad[r.image]}" for r in data.rows if r.image in bad]
    if not kept:
        raise VQAError(f"{data.path} has no usable rows: no image could be loaded (missing, a folder, unreadable "
                       f"or corrupt), e.g. {bad[first.image]}")
    return CSVData(data.path, kept, data.skipped + skipped)


def read_split(path: str | Path, *, skip_bad_rows: bool = False, allow_outside_paths: bool = False,
               find_bad: Callable[[list[Path]], dict[Path, str]] = bad_images) -> CSVData:
    """``read_csv`` then ``check_images``: a split whose every row and image is known to be usable."""
    data = read_csv(path, skip_bad_rows=skip_bad_rows, allow_outside_paths=allow_outside_paths)
    return check_images(data, skip_bad_rows, find_bad)


def chunks(indices: list[int], size: int) -> list[list[int]]:
    """Consecutive batches of ``size`` indices (the last one may be shorter)."""
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def build_transform(backbone: nn.Module, img_size: int):
    """timm's evaluation transform from the backbone's own pretrained config, at ``img_size``, the whole image
    resized to the square ("squash"): a crop would cut off what a question about the edges asks about."""
    from timm.data import create_transform, resolve_data_config  # here: the data tools never build a transform,
    # and start without timm's seconds of import
    config = resolve_data_config({"input_size": (3, img_size, img_size), "crop_pct": 1.0, "crop_mode": "squash"},
                                 model=backbone)
    return create_transform(**config, is_training=False)


class VQADataset(torch.utils.data.Dataset):
    """Items are images with all their questions: ``(pixels, [(ids, answer_id, type_id, given), ...])``, where
    ``given`` is ``()`` for a question with one answer and, for one with several, a ``(answer_id, count)`` pair for
    each distinct answer (id -1 for an answer outside the vocabulary)."""

    def __init__(self, rows: list[Row], transform, tokenizer: Tokenizer, answers: AnswerVocab) -> None:
        groups: dict[Path, list[int]] = {}
        for number, row in enumerate(rows):
            groups.setdefault(row.image, []).append(number)
        self.images = list(groups)
        self.questions = [
            [(tokenizer.encode(rows[i].question), answers.id(rows[i].answer), QUESTION_TYPES.index(rows[i].question_type),
              _answer_counts(rows[i].answers, answers))
             for i in group]
            for group in groups.values()
        ]
        self.row_order = [i for group in groups.values() for i in group]  # each question's row, in the items' order
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(load_image(self.images[index])), self.questions[index]


def _answer_counts(given: tuple[str, ...], answers: AnswerVocab) -> tuple[tuple[int, int], ...]:
    """``(answer_id, count)`` for each distinct answer of ``given``, normalised, in the order first given."""
    counts = Counter(normalize_answer(a) for a in given)
    return tuple((answers.stoi.get(answer, -1), n) for answer, n in counts.items())


def collate(items) -> dict[str, Tensor]:
    """Stacks images and pads questions; ``image_index[q]`` is the image of question ``q``.

    Where a question of the batch has several answers, ``answer_ids`` and ``answer_counts`` (``(B_q, K)``, padded
    with -1 and 0) give each question's distinct answers and how many people gave each (its one answer, once, for
    a question with one)."""
    pixels = torch.stack([pixels for pixels, _ in items])  # (B_img, 3, H, W)
    questions = [(i, q) for i, (_, qs) in enumerate(items) for q in qs]
    length = max(len(ids) for _, (ids, _, _, _) in questions)
    input_ids = torch.zeros(len(questions), length, dtype=torch.long)  # (B_q, L), 0 = [PAD]
    for row, (_, (ids, _, _, _)) in enumerate(questions):
        input_ids[row, : len(ids)] = torch.tensor(ids)
    batch = {
        "pixel_values": pixels,
        "input_ids": input_ids,
        "attention_mask": (input_ids != Tokenizer.PAD).long(),
        "image_index": torch.tensor([i for i, _ in questions]),
        "answer": torch.tensor([a for _, (_, a, _, _) in questions]),  # -1: not in the training vocabulary
        "question_type": torch.tensor([t for _, (_, _, t, _) in questions]),
    }
    if any(several for _, (_, _, _, several) in questions):
        given = [several or ((a, 1),) for _, (_, a, _, several) in questions]
        width = max(len(g) for g in given)
        batch["answer_ids"] = torch.tensor([[a for a, _ in g] + [-1] * (width - len(g)) for g in given])
        batch["answer_counts"] = torch.tensor([[n for _, n in g] + [0] * (width - len(g)) for g in given])
    return batch
