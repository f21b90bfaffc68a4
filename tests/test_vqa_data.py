import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from timm.data import create_transform, resolve_data_config

from vqa.data import VQADataset, build_transform, check_images, chunks, collate, load_image, read_csv, read_split
from vqa.errors import VQAError
from vqa.evaluate import _Loader, _worker_start_method, make_loader
from vqa.text import QUESTION_TYPES, AnswerVocab, Tokenizer, normalize_answer

ROOT = Path(__file__).resolve().parents[1]
HEADER = "image,question,answer\n"


def png(path, size=(8, 8), mode="RGB", color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    png(tmp_path / "img" / "a.png")
    png(tmp_path / "img" / "b.png", color=(0, 0, 255))
    return tmp_path


def write(folder, text, name="data.csv", encoding="utf-8"):
    path = folder / name
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def test_reads_rows_with_quotes_unicode_extra_columns_and_inferred_types(folder):
    path = write(folder, 'image,question,answer,source\n'
                         'img/a.png,"How many circles, roughly?",Two,x\n'
                         'img/b.png,"What colour is the\nsquare?",blue,y\n'
                         'img/a.png,Qu\'est-ce que c\'est — 猫?,chat,z\n')
    data = read_csv(path)
    assert [r.question_type for r in data.rows] == ["count", "color", "other"]
    assert data.rows[0].question == "How many circles, roughly?"
    assert data.rows[1].question == "What colour is the square?"  # inner newline folded to a space
    assert data.rows[2].question.endswith("猫?")
    assert data.rows[0].image == (folder / "img" / "a.png").resolve()
    assert "data.csv row 2" in data.rows[1].where


def test_explicit_question_type_is_kept_and_checked(folder):
    ok = write(folder, "image,question,answer,question_type\nimg/a.png,Is it red?,yes,YES/NO\n")
    assert read_csv(ok).rows[0].question_type == "yes/no"
    bad = write(folder, "image,question,answer,question_type\nimg/a.png,Is it red?,yes,colour\n")
    with pytest.raises(VQAError, match="row 1.*question_type 'colour'"):
        read_csv(bad)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("   \n", "is empty"),
        (HEADER, "header but no rows"),
        ("image,question\nimg/a.png,What?\n", "no 'answer' column"),
        ("picture,question,answer\nimg/a.png,What?,x\n", "no 'image' column.*columns found: picture"),
        (HEADER + "img/a.png,,red\n", r"row 1 \(line 2\) has an empty 'question'"),
        (HEADER + "img/a.png,What?,red\nimg/b.png,What?, \n", r"row 2 \(line 3\) has an empty 'answer'"),
        (HEADER + ",What?,red\n", "empty 'image'"),
        (HEADER + "img/a.png,What?,red\nimg/a.png,What?,red\n", "row 2 .* repeats row 1"),
        (HEADER + "img/a.png,What?,red,extra\n", "more fields than the header has columns; quote fields"),
        (HEADER + "img/a.png,What,then?,\n", r"row 1 \(line 2\) ends with 1 empty field more than the header has "
                                             r"columns: remove the comma at its end, or quote a field"),
        (HEADER + "img/a.png,What?,red,,\n", "ends with 2 empty fields more than the header has columns: remove the "
                                             "commas at its end"),
        ("image,answer,question,answer\nimg/a.png,red,What?,blue\n", r"has the column 'answer' 2 times in its header "
                                                                     r"\(line 1\); keep one, or rename the others"),
        ("\n,,\nimage,image,question,answer\n", r"column 'image' 2 times in its header \(line 3\)"),
        (HEADER + "../outside.png,What?,red\n", "outside the CSV's folder"),
        (HEADER + "img/a.png,Which?,?!\n", r"row 1 \(line 2\) has the answer '\?!', which is empty once normalised"),
    ],
)
def test_bad_csv_is_a_clear_error_naming_file_and_row(folder, content, message):
    path = write(folder, content)
    with pytest.raises(VQAError, match=message) as err:
        read_csv(path)
    assert "data.csv" in str(err.value)


@pytest.mark.parametrize("header, hint", [
    ("image;question;answer", "the columns are separated by semicolons: save the file with commas"),
    ("image\tquestion\tanswer", "the columns are separated by tabs"),
    ("Image,Question,Answer", "names are lower case: 'Image' should be 'image'"),
    ("image,question,Answers", "names are lower case: 'Answers' should be 'answers'"),
    ("image,question,anwser", r"\(is 'anwser' a misspelt 'answer'\?\)"),
    ("img/b.png,What?,blue", "the first line is read as the header: add one above the rows"),
])
def test_a_header_missing_a_column_says_what_it_most_likely_got_wrong(folder, header, hint):
    """Another separator, capitals, a typo, a file without a header: each has its own fix, which the error names."""
    with pytest.raises(VQAError, match=f"has no '.*' column .*; the header must name image, question, answer.*{hint}"):
        read_csv(write(folder, header + "\nimg/a.png,What?,red\n"))


@pytest.mark.parametrize("above", ["\n", "\n\n", ",,\n", " , ,\r\n", "sep=,\n", "sep=,\n,,\n"])
def test_empty_lines_above_the_header_are_no_header(folder, above):
    """A spreadsheet's empty first rows, and the "sep=," line some write: the header is the first line with names,
    and rows keep their line numbers in the file."""
    data = read_csv(write(folder, above + HEADER + "img/a.png,What?,red\nimg/b.png,What?,\n"), skip_bad_rows=True)
    line = above.count("\n") + 3
    assert [r.answer for r in data.rows] == ["red"]
    assert data.skipped == [f"{folder / 'data.csv'} row 2 (line {line}) has an empty 'answer'; fill it in or delete the "
                            f"row"]


def test_missing_file(tmp_path):
    with pytest.raises(VQAError, match="does not exist"):
        read_csv(tmp_path / "none.csv")


def test_non_utf8_names_the_line(folder):
    path = write(folder, HEADER.encode() + b"img/a.png,What?,red\nimg/b.png,Caf\xe9?,blue\n")
    with pytest.raises(VQAError, match=r"line 3 is not valid UTF-8.*0xe9"):
        read_csv(path)


@pytest.mark.parametrize("read", [read_csv, read_split])
def test_absolute_paths_need_the_option(folder, tmp_path_factory, read):
    outside = png(tmp_path_factory.mktemp("elsewhere") / "c.png")
    path = write(folder, HEADER + f"{outside},What?,red\n")
    with pytest.raises(VQAError, match="--allow_outside_paths"):
        read(path)
    assert read(path, allow_outside_paths=True).rows[0].image == outside.resolve()


def test_a_quote_left_open_before_rows_whose_images_are_missing_is_still_found(folder):
    """vqa.answer_weights reads answers only, often without the images: the rows' shape tells."""
    rows = ['img/a.png,What color?,"red', *(f'img/gone{i}.png,Is it {i}?,yes' for i in range(50))]
    with pytest.raises(VQAError, match="row 1 runs from line 2 to line 52: a quote"):
        read_csv(write(folder, HEADER + "\n".join(rows) + "\n"), skip_bad_rows=True)


@pytest.mark.parametrize("csv_text", [
    # Every field quoted (a spreadsheet's export), the last quote of row 1 deleted: row 2's first quote closes it.
    '"img/a.png","What color?","red\n"img/b.png","Which?","blue"\n"img/a.png","Where?","left"\n',
    # Closed by the next row's quote in the same column, the images not there.
    'img/a.png,"What color?,red\nimg/x.png,"Is it big?",yes\nimg/y.png,Where?,left\n',
    # Rows leaving out the trailing optional column, the images not there.
    'img/a.png,What color?,"red\nimg/x.png,Which?,blue\nimg/y.png,Where?,left\n',
], ids=["all quoted", "closed by the next quote", "short rows"])
def test_a_quote_left_open_loses_no_row_silently(folder, csv_text):
    path = write(folder, "image,question,answer,question_type\n" + csv_text)
    with pytest.raises(VQAError, match="row 1 runs from line 2 to line [34]: a quote"):
        read_csv(path, skip_bad_rows=True)


@pytest.mark.parametrize("ending", ["", "\n"])
def test_a_quote_left_open_on_the_last_row_is_named_and_a_quote_inside_a_field_is_not(folder, ending):
    """At the end of the file the reader closes an open quote itself: the row would read as one with a field short
    ("What color,red" as the question, no answer), the quote never named."""
    path = write(folder, HEADER + 'img/b.png,Which?,blue\nimg/a.png,"What color,red' + ending)
    with pytest.raises(VQAError, match=re.escape(f'{path} row 2 (line 3): a quote (") opened on line 3 is not closed '
                                                 f"before the file ends; close or remove it")):
        read_csv(path)
    assert [r.answer for r in read_csv(path, skip_bad_rows=True).rows] == ["blue"]
    path = write(folder, HEADER + 'img/b.png,Which?,blue\nimg/a.png,Is it 5" tall?,yes' + ending)
    assert [r.question for r in read_csv(path).rows] == ["Which?", 'Is it 5" tall?']


def test_a_quote_left_open_in_a_large_file_is_our_error_naming_its_line(folder):
    rows = ['img/a.png,What color?,red', '', 'img/a.png,Which?,"red'] + [f"img/gone{i}.png,Is it {i}?,yes"
                                                                         for i in range(8000)]
    with pytest.raises(VQAError, match=r"line 4: field larger than field limit .*a quote \(\"\) opened on line 4"):
        read_csv(write(folder, HEADER + "\n".join(rows) + "\n"))


def test_a_wrapped_question_in_a_row_with_a_field_too_many_is_skipped_as_such(folder):
    path = write(folder, HEADER + 'img/a.png,"What is\nthis?",red,extra\nimg/b.png,Which?,blue\n')
    data = read_csv(path, skip_bad_rows=True)
    assert len(data.rows) == 1 and "more fields than the header" in data.skipped[0]


def test_a_wrapped_line_too_long_for_a_file_name_is_no_crash(folder):
    question = "What is\n" + "猫" * 300 + "?"
    assert read_csv(write(folder, HEADER + f'img/a.png,"{question}",cat\n')).rows[0].question == \
        "What is " + "猫" * 300 + "?"


def test_a_question_wrapped_over_lines_with_commas_is_read_as_one_question(folder):
    path = write(folder, HEADER + 'img/a.png,"Which colour is it:\nred, green, or blue?",red\n'
                                  'img/b.png,"Is the\nimg/a.png one, or this, red?",no\n')
    data = read_csv(path)
    assert [r.question for r in data.rows] == ["Which colour is it: red, green, or blue?",
                                               "Is the img/a.png one, or this, red?"]


def test_a_symbolic_link_out_of_the_folder_is_named_as_such(folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    png(elsewhere / "c.png")
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)
    path = write(folder, HEADER + "linked/c.png,What?,red\n")
    with pytest.raises(VQAError, match=rf"'linked/c\.png' points outside the CSV's folder .* through a symbolic link "
                                       rf"\(to {elsewhere.resolve() / 'c.png'}\); .*--allow_outside_paths"):
        read_csv(path)
    with pytest.raises(VQAError, match=r"'\.\./c\.png' points outside the CSV's folder [^;]*; move"):  # no link
        read_csv(write(folder, HEADER + "../c.png,What?,red\n"))


def test_skip_bad_rows_skips_and_counts(folder):
    path = write(folder, HEADER + "img/a.png,What?,red\nimg/a.png,,red\nimg/a.png,What?,red\nimg/b.png,Which?,blue\n")
    data = read_csv(path, skip_bad_rows=True)
    assert len(data.rows) == 2 and len(data.skipped) == 2
    assert "row 2" in data.skipped[0] and "row 3" in data.skipped[1]


@pytest.mark.parametrize("closed", ["by a quoted field", "by a quote inside a field", "never"])
def test_a_quote_left_open_is_an_error_naming_its_lines_even_when_skipping(folder, closed):
    """A stray quote makes the rows after it part of one field: they would be lost, not skipped."""
    fifth = {"by a quoted field": 'img/b.png,"How many?",2', "by a quote inside a field": 'img/b.png,"Is it, one?",yes',
             "never": 'img/b.png,How many?,2'}[closed]
    rows = ['img/a.png,What color?,red', 'img/a.png,"What shape?,square', 'img/b.png,Is there one?,yes', fifth,
            'img/b.png,Where?,left']
    path = write(folder, HEADER + "\n".join(rows) + "\n")
    end = 6 if closed == "never" else 5  # the quote on line 5 closes it; else the file's end
    for skip in (False, True):
        with pytest.raises(VQAError, match=rf"row 2 runs from line 3 to line {end}: a quote \(\"\) opened on line 3 "
                                           rf"is not closed on it"):
            read_csv(path, skip_bad_rows=skip)


def test_all_rows_bad_is_an_error_even_when_skipping(folder):
    with pytest.raises(VQAError, match="all 1 rows were bad, the first: .*row 1 .* has an empty 'question'"):
        read_csv(write(folder, HEADER + "img/a.png,,red\n"), skip_bad_rows=True)


def truncated(path, fmt):
    buf = io.BytesIO()
    Image.fromarray(np.random.randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, fmt)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "img" / "missing.png", "does not exist"),
        (lambda d: d / "img", "is a folder, not an image file"),
        (lambda d: (d / "img" / "junk.png").write_bytes(b"not an image") and d / "img" / "junk.png",
         r"is no image Pillow can decode: it is corrupt, or in a format Pillow does not read \(SVG, HEIC, PDF...\); "
         r"convert it to PNG or JPEG"),
        (lambda d: (d / "img" / "pic.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>')
         and d / "img" / "pic.svg", "is no image Pillow can decode"),
        (lambda d: os.mkfifo(d / "img" / "pipe.png") or d / "img" / "pipe.png",
         "is not a file but a pipe, socket or device; give an image file"),
        (lambda d: truncated(d / "img" / "cut.png", "PNG"), "cannot be decoded"),
        (lambda d: truncated(d / "img" / "cut.jpg", "JPEG"), "cannot be decoded"),
    ],
)
def test_bad_images_fail_before_training_naming_the_row(folder, make, message):
    bad = make(folder)
    path = write(folder, HEADER + f"img/a.png,What?,red\n{bad.relative_to(folder)},Which?,blue\n")
    data = read_csv(path)
    with pytest.raises(VQAError, match=f"row 2.*{message}.*1 bad image"):
        check_images(data)
    kept = check_images(data, skip_bad_rows=True)
    assert len(kept.rows) == 1 and len(kept.skipped) == 1


def test_read_split_asks_the_finder_it_is_given_about_each_distinct_image_once(folder):
    """train.py's finder shares the decoding out among processes: it gets each image once, in the rows' order, and
    its findings decide the rows skipped."""
    path = write(folder, HEADER + "img/a.png,What?,red\nimg/b.png,Which?,blue\nimg/a.png,Where?,left\n")
    asked = []

    def find_bad(images):
        asked.append([image.name for image in images])
        return {images[0]: "image 'img/a.png' cannot be decoded (found by another process)"}

    data = read_split(path, skip_bad_rows=True, find_bad=find_bad)
    assert asked == [["a.png", "b.png"]]
    assert [r.answer for r in data.rows] == ["blue"] and len(data.skipped) == 2
    assert all("found by another process" in skipped for skipped in data.skipped)


def test_a_folder_given_as_the_csv_is_named_as_such(folder):
    with pytest.raises(VQAError, match="is a folder; give the CSV file itself"):
        read_csv(folder)


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("L", 128, (128, 128, 128)),
        ("RGBA", (10, 20, 30, 0), (10, 20, 30)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 0, (0, 0, 0)),
        ("I;16", 32768, (128, 128, 128)),  # scaled by 255 / 65535, not clipped or shifted
        ("1", 1, (255, 255, 255)),
    ],
)
def test_other_image_modes_become_8bit_rgb(tmp_path, mode, value, expected):
    path = png(tmp_path / "x.png", mode=mode, color=value)
    im = load_image(path)
    assert im.mode == "RGB" and im.getpixel((0, 0)) == expected


def test_palette_image_becomes_rgb(tmp_path):
    path = tmp_path / "p.png"
    Image.new("RGB", (4, 4), (0, 204, 0)).convert("P").save(path)
    assert load_image(path).getpixel((1, 1)) == (0, 204, 0)


@pytest.mark.parametrize("orientation, turn", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
                                               (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_an_image_is_loaded_upright_as_its_exif_orientation_says(tmp_path, orientation, turn, mode):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (2, 4, 3), dtype=np.uint8)  # wide as stored; tall as shown for 6 and 8
    im = Image.fromarray(stored).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(tmp_path / "x.png", exif=exif.tobytes())
    want = turn(np.asarray(im.convert("RGB")))  # the stored pixels turned as a viewer shows them
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "x.png")), want)


@pytest.mark.filterwarnings("error")
def test_a_damaged_exif_block_that_parses_still_turns_the_image_and_loads(tmp_path):
    """An EXIF block with orientation 6 and damaged tags (a fuzzed camera block): Pillow parses it, but writing it
    back out, as ImageOps.exif_transpose does, raised struct.error, a traceback where the image loaded before."""
    exif = bytes.fromhex(
        "4578696600004d4d002a000000080006010fa102000000060000005601440002000000060000005c01120003000000010006"
        "0000c71a0005000000010000006201310002000000037377000001320002000000140000006a000000004d616b6572214d6f"
        "64656c000000004800000001323032303a30313a30312030303a30303a303000")
    stored = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    Image.fromarray(stored).save(tmp_path / "x.png", exif=exif)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "x.png")), np.rot90(stored, -1))
    # Nor does a block Pillow reads with a warning (a tag past its end) print one: the image loaded quietly before.
    exif = bytes.fromhex(
        "4578696600004d4d002a000000080005010f0002000000060000004a011000020000000600000050011200030000000100060000"
        "011a00050000000100000056013100020000c20373770000000000004d616b6572004d6f64656c000000004800000001")
    Image.fromarray(stored).save(tmp_path / "y.png", exif=exif)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "y.png")), np.rot90(stored, -1))


def test_tiny_and_huge_images_are_fine(tmp_path):
    assert load_image(png(tmp_path / "t.png", size=(1, 1))).size == (1, 1)
    assert load_image(png(tmp_path / "h.png", size=(4000, 3000))).size == (4000, 3000)  # 12 MP, under the limit


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    path = png(tmp_path / "big.png", size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4,096 pixels is now "huge": past the warning limit
    with pytest.raises(VQAError, match="too large to decode safely"):
        load_image(path)


def test_dataset_groups_questions_by_image_and_collate_maps_them_back(folder):
    path = write(folder, HEADER + "img/a.png,What color?,red\nimg/b.png,What color?,blue\n"
                                  "img/a.png,How many circles are there?,two\nimg/b.png,Is it big?,maybe\n")
    rows = read_csv(path).rows
    tok = Tokenizer.build(r.question for r in rows[:3])
    answers = AnswerVocab.build(r.answer for r in rows[:3])  # "maybe" is not in the vocabulary

    def transform(im):
        return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)

    dataset = VQADataset(rows, transform, tok, answers)
    assert len(dataset) == 2
    batch = collate([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["image_index"].tolist() == [0, 0, 1, 1]
    assert batch["answer"].tolist() == [answers.id("red"), answers.id("2"), answers.id("blue"), -1]
    assert batch["input_ids"].shape == (4, 7) and batch["input_ids"][0, 0] == Tokenizer.CLS
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0]  # [CLS] what color ? + padding
    assert batch["pixel_values"][1, 2, 0, 0] == 255  # image b is blue


class _TurnsUnreadable(torch.utils.data.Dataset):
    """A data set whose second image cannot be read once loading has begun (replaced on disk mid-run, say)."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        if index == 1:
            raise VQAError("image 'images/b.png' cannot be decoded; it is corrupt or truncated")
        # pixels, then (token ids, answer, type, several answers' counts) per question
        return torch.zeros(3, 2, 2), [([2, 3], 0, 0, ())]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_loader_worker_s_error_is_told_as_the_worker_raised_it(num_workers):
    """torch re-raises a worker's error with the worker's traceback inside its text; the error line a tool prints
    (``error: {e}``) gives the message alone, as it does without workers."""
    batches = iter(make_loader(_TurnsUnreadable(), [[0], [1]], num_workers=num_workers))
    next(batches)
    with pytest.raises(VQAError) as raised:
        next(batches)
    message = str(raised.value)
    # The error's traceback holds the loader's frames, and the test's frame holds it: left to the garbage collector,
    # the worker takes 5 s to shut down, in whichever test runs then.
    del raised, batches
    assert message == "image 'images/b.png' cannot be decoded; it is corrupt or truncated"


class _FallbackUnreadableToo(torch.utils.data.Dataset):
    """Its image fails, then the one tried in its place: the worker's traceback holds two VQAErrors."""

    def __len__(self):
        return 1

    def __getitem__(self, index):
        try:
            raise VQAError("image 'images/a.png' cannot be decoded; it is corrupt or truncated")
        except VQAError:
            raise VQAError("image 'images/b.png', tried instead, cannot be decoded; it is corrupt or truncated")


def test_a_loader_worker_s_error_raised_while_handling_another_is_told_as_the_last_one():
    """As a worker wraps it and the loop re-raises it (torch's own wrapper: a real worker left behind costs seconds
    to shut down)."""
    from torch._utils import ExceptionWrapper

    try:
        _FallbackUnreadableToo()[0]
    except VQAError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(VQAError) as raised:
        wrapped.reraise()
    assert str(raised.value) == "image 'images/b.png', tried instead, cannot be decoded; it is corrupt or truncated"


def test_a_vqa_error_made_of_anything_but_one_worker_s_text_keeps_its_arguments():
    assert VQAError(Path("images/a.png"), 2).args == (Path("images/a.png"), 2)
    assert str(VQAError(3)) == "3"
    worker_text = "Caught VQAError in DataLoader worker process 0.\nTraceback\nvqa.errors.VQAError: the message\n"
    assert VQAError(worker_text).args == ("the message",)
    assert VQAError(worker_text, 2).args == (worker_text, 2)  # torch builds it from one text


@pytest.mark.skipif(_worker_start_method() != "fork", reason="loader workers are forked only where fork is used")
def test_a_loader_forks_its_workers_once_an_earlier_loader_s_queue_threads_have_ended(monkeypatch):
    """Python before 3.12 can deadlock a child forked while another thread ends (CPython gh-112275), and an earlier
    loader's queue threads end after its shutdown, unjoined: the next loader waits for them before it forks."""
    import threading
    import time

    ending = threading.Thread(target=time.sleep, args=(0.3,), name="QueueFeederThread", daemon=True)
    ending.start()  # as an earlier loader's feeder thread, still ending
    alive_at_fork, fork = [], os.fork
    monkeypatch.setattr(os, "fork", lambda: alive_at_fork.append(ending.is_alive()) or fork())
    loader = _Loader(list(range(4)), batch_size=2, num_workers=2)
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3]] and alive_at_fork == [False, False]


LOADER_CHILD = """
import multiprocessing.context, os, signal, sys, time
import numpy as np, torch
from vqa.data import VQADataset, read_csv
from vqa.evaluate import make_loader
from vqa.text import AnswerVocab, Tokenizer

def slow(im):
    time.sleep(0.02)  # keeps both workers busy while the group is signalled
    return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)

if __name__ == "__main__":  # a spawned or forkserver worker imports this file
    if sys.argv[2] != "platform":  # Python 3.14's default on Linux: this start method, chosen by nobody
        multiprocessing.context._default_context._default_context = multiprocessing.get_context(sys.argv[2])
    rows = read_csv(sys.argv[1]).rows
    got = []
    signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    data = VQADataset(rows, slow, Tokenizer.build(r.question for r in rows), AnswerVocab.build(r.answer for r in rows))
    batches = iter(make_loader(data, [[0], [1]] * 10, num_workers=2))
    if sys.argv[3] == "early":
        os.killpg(0, signal.SIGTERM)  # while the workers start
    first = next(batches)
    print("ready", flush=True)
    for _ in range(500):
        if got:
            break
        time.sleep(0.01)
    more = [next(batches) for _ in range(5)]  # a worker killed by the signal would make this raise
    own_groups = all(os.getpgid(w.pid) != os.getpgid(0) for w in batches._workers)
    print("ok", got, len(more), own_groups, signal.pthread_sigmask(signal.SIG_BLOCK, set()) == mask, flush=True)
    sys.exit(0)  # with the loader unfinished: the exit terminates its workers, and must not hang on them
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX process groups and signal masks")
@pytest.mark.parametrize("default_start, when", [("platform", "late"), ("forkserver", "early")])
def test_a_sigterm_to_the_process_group_leaves_loader_workers_running(folder, default_start, when):
    """torchrun and cluster schedulers send SIGTERM to the training process's whole group; the training
    process must get it and its loader workers must not die of it, whether it comes once they run or as
    they start, and also where Python's default start method is forkserver (3.14 on Linux), under which
    the workers would start unprotected. Run in a session of its own, as torchrun starts each training
    process."""
    if default_start != "platform" and _worker_start_method() is None:
        pytest.skip("loader workers start the platform's way here (macOS: spawn), exposed while they start")
    path = write(folder, HEADER + "img/a.png,What color?,red\nimg/b.png,What color?,blue\n")
    child = folder / "loader_child.py"
    child.write_text(LOADER_CHILD)
    proc = subprocess.Popen([sys.executable, str(child), str(path), default_start, when], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        if when == "late":
            os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err
    assert out.split() == ["ok", f"[{int(signal.SIGTERM)}]", "5", "True", "True"], (out, err)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.binary(max_size=300)
       | st.lists(st.sampled_from(list('ab,"\n\r \x00é|') + ["img/a.png", "../x.png", HEADER,
                                                               "image,question,answers\n"]), max_size=40).map("".join))
def test_any_file_gives_rows_or_our_error(folder, content):
    path = write(folder, content, name="fuzz.csv")
    try:
        data = read_csv(path, skip_bad_rows=True)
    except VQAError:
        return
    assert data.rows and all(r.question and r.answer for r in data.rows)
    assert all(all(normalize_answer(a) for a in r.all_answers) and r.answer in r.all_answers for r in data.rows)


@pytest.mark.parametrize("n, size", [(5, 2), (4, 2), (1, 3), (0, 2)])
def test_chunks_cover_every_index_once_in_order(n, size):
    parts = chunks(list(range(n)), size)
    assert [i for part in parts for i in part] == list(range(n))
    assert all(len(part) == size for part in parts[:-1]) and all(0 < len(part) <= size for part in parts)


def test_a_utf8_bom_from_excel_is_not_part_of_the_first_column(folder):
    path = write(folder, "\ufeff" + HEADER + "img/a.png,What?,red\n")
    assert read_csv(path).rows[0].answer == "red"


def test_spaces_around_header_names_are_ignored(folder):
    path = write(folder, "image , question, answer\nimg/a.png,What?,red\n")
    assert read_csv(path).rows[0].question == "What?"


def test_answer_column_is_optional_when_not_required(folder):
    rows = read_csv(write(folder, "image,question\nimg/a.png,What?\n"), require_answer=False).rows
    assert [(r.question, r.answer) for r in rows] == [("What?", "")]


def test_rows_keep_their_number_and_image_as_written_and_questions_alone_may_repeat(folder):
    text = "image,question\n./img/a.png,What?\n\nimg/a.png,What?\n"  # a blank line is no row
    rows = read_csv(write(folder, text), require_answer=False).rows  # two requests for one answer: both answered
    assert [(r.number, r.given_image, r.image) for r in rows] == [(1, "./img/a.png", folder / "img" / "a.png"),
                                                                  (2, "img/a.png", folder / "img" / "a.png")]
    with pytest.raises(VQAError, match=r"row 2 \(line 4\) repeats row 1 \(line 2\) exactly"):
        read_csv(write(folder, text.replace("What?", "What?,red").replace("image,question", "image,question,answer")))


def test_rows_that_differ_only_in_question_type_are_not_duplicates(folder):
    path = write(folder, "image,question,answer,question_type\nimg/a.png,What?,red,color\nimg/a.png,What?,red,other\n")
    assert [r.question_type for r in read_csv(path).rows] == ["color", "other"]


def test_all_rows_bad_names_the_first_bad_row(folder):
    with pytest.raises(VQAError, match=r"all 2 rows were bad, the first: \S*data.csv row 1 "):
        read_csv(write(folder, HEADER + "img/a.png,,red\nimg/b.png,,blue\n"), skip_bad_rows=True)


@pytest.mark.parametrize("mode, values, expected", [
    ("F", [0.5, 0.5], [128, 128]),  # floats in [0, 1] scale by 255
    ("I", [500, 1000], [128, 255]),  # 32-bit ints scale by their maximum
])
def test_32bit_and_float_images_are_scaled_not_clipped(tmp_path, mode, values, expected):
    path = tmp_path / "x.tiff"
    Image.fromarray(np.array([values], dtype=np.float32 if mode == "F" else np.int32), mode=mode).save(path)
    im = load_image(path)
    assert im.mode == "RGB" and [im.getpixel((x, 0)) for x in range(2)] == [(v, v, v) for v in expected]


def test_skipping_when_every_image_is_bad_is_still_an_error(folder):
    (folder / "img" / "junk.png").write_bytes(b"not an image")
    data = read_csv(write(folder, HEADER + "img/junk.png,What?,red\n"))
    with pytest.raises(VQAError, match="no usable rows: no image could be loaded"):
        check_images(data, skip_bad_rows=True)


def test_bad_images_add_to_the_rows_skipped_earlier(folder):
    (folder / "img" / "junk.png").write_bytes(b"not an image")
    data = read_csv(write(folder, HEADER + "img/a.png,,red\nimg/a.png,What?,red\nimg/junk.png,Which?,blue\n"),
                    skip_bad_rows=True)
    kept = check_images(data, skip_bad_rows=True)
    assert len(kept.rows) == 1 and len(kept.skipped) == 2
    assert "row 1" in kept.skipped[0] and "row 3" in kept.skipped[1]


def test_read_split_skips_bad_images_when_asked(folder):
    (folder / "img" / "junk.png").write_bytes(b"not an image")
    path = write(folder, HEADER + "img/a.png,What?,red\nimg/junk.png,Which?,blue\n")
    with pytest.raises(VQAError, match="1 bad image"):
        read_split(path)
    data = read_split(path, skip_bad_rows=True)
    assert len(data.rows) == 1 and len(data.skipped) == 1


@pytest.mark.parametrize("height, width", [(28, 28), (28, 84), (84, 28), (480, 640)])
def test_transform_keeps_the_whole_image_no_centre_crop(height, width):
    """A photo of another shape is resized whole to the square: its edges, which a centre crop would cut away,
    stay (each edge row and column painted its own colour, the inside blue)."""
    backbone = timm.create_model("vit_small_patch14_dinov2", img_size=28, embed_dim=32, depth=1, num_heads=2,
                                 num_classes=0)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, :, 2] = 255
    band = max(height, width) // 28 + 1  # edge bands wide enough to outlast the resize
    pixels[:, :band] = (255, 0, 0)  # left
    pixels[:, -band:] = (0, 255, 0)  # right
    pixels[:band, band:-band] = (255, 255, 0)  # top
    pixels[-band:, band:-band] = (0, 0, 0)  # bottom
    out = build_transform(backbone, 28)(Image.fromarray(pixels))
    assert out.shape == (3, 28, 28)
    red, green, blue = out[:, 14, 0], out[:, 14, -1], out[:, 14, 14]
    assert red[0] > red[1] + 1 and red[0] > red[2] + 1  # still at the left edge
    assert green[1] > green[0] + 1 and green[1] > green[2] + 1  # and at the right one
    assert blue[2] > blue[0] + 1
    top, bottom = out[:, 0, 14], out[:, -1, 14]
    assert top[0] > top[2] + 1 and top[1] > top[2] + 1  # yellow
    assert (bottom < blue[2] - 1).all()  # black
    if height == width:  # a square image: exactly what timm's centre crop gives (the demo's and the tests' data)
        config = resolve_data_config({"input_size": (3, 28, 28), "crop_pct": 1.0}, model=backbone)
        torch.testing.assert_close(out, create_transform(**config)(Image.fromarray(pixels)), rtol=0, atol=0)


def test_collate_keeps_each_questions_type(folder):
    path = write(folder, HEADER + "img/a.png,What color?,red\nimg/a.png,How many?,two\nimg/b.png,Is it big?,yes\n")
    rows = read_csv(path).rows
    data = VQADataset(rows, lambda im: torch.zeros(3, 2, 2), Tokenizer.build(r.question for r in rows),
                      AnswerVocab.build(r.answer for r in rows))
    batch = collate([data[0], data[1]])
    assert batch["question_type"].tolist() == [QUESTION_TYPES.index(t) for t in ("color", "count", "yes/no")]


def test_blank_lines_between_rows_are_no_quote_left_open(folder):
    path = write(folder, HEADER + "img/a.png,What?,red\n\n\nimg/b.png,Which?,blue\n\n")
    data = read_csv(path)
    assert [r.answer for r in data.rows] == ["red", "blue"] and not data.skipped
    assert "row 2 (line 5)" in data.rows[1].where


def test_a_quote_left_open_before_rows_with_upper_case_suffixes_is_found(folder):
    """Cameras name files IMG_0001.JPG; the images are not there (vqa.answer_weights reads answers only)."""
    rows = ['img/a.png,What color?,"red', 'img/X.JPG,Is it big?,yes', 'img/Y.PNG,Where?,left']
    with pytest.raises(VQAError, match="row 1 runs from line 2 to line 4: a quote"):
        read_csv(write(folder, HEADER + "\n".join(rows) + "\n"), skip_bad_rows=True)


def test_a_quote_left_open_before_rows_naming_existing_images_of_another_suffix_is_found(folder):
    png(folder / "img" / "c.jfif")  # a suffix outside the list of image suffixes, the file there
    rows = ['img/a.png,What color?,"red', 'img/c.jfif,Is it big?,yes', 'img/c.jfif,Where?,left']
    with pytest.raises(VQAError, match="row 1 runs from line 2 to line 4: a quote"):
        read_csv(write(folder, HEADER + "\n".join(rows) + "\n"), skip_bad_rows=True)


def test_a_csv_given_by_a_relative_path_resolves_its_images(folder, monkeypatch):
    write(folder, HEADER + "img/a.png,What?,red\n")
    monkeypatch.chdir(folder / "img")
    for relative in ("../data.csv", "../img/../data.csv"):
        assert read_csv(relative).rows[0].image == (folder / "img" / "a.png").resolve()
    monkeypatch.chdir(folder)
    assert read_csv("data.csv").rows[0].image == (folder / "img" / "a.png").resolve()


def test_skipping_bad_images_skips_and_counts_every_row_that_uses_them(folder):
    (folder / "img" / "junk.png").write_bytes(b"not an image")
    (folder / "img" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    path = write(folder, HEADER + "img/junk.png,What?,red\nimg/a.png,What?,red\nimg/junk.png,Which?,blue\n"
                                  "img/b.png,Which?,blue\nimg/cut.png,Where?,left\n")
    data = read_csv(path)
    with pytest.raises(VQAError, match=r"row 1 .*\(2 bad image\(s\) in all"):
        check_images(data)
    kept = check_images(data, skip_bad_rows=True)
    assert [r.where.split(" row ")[1] for r in kept.rows] == ["2 (line 3)", "4 (line 5)"]
    assert [s.split(" row ")[1][:1] for s in kept.skipped] == ["1", "3", "5"]


@pytest.mark.parametrize("empty", [" ", "\t ", ",,", " , ,", ",,,,"])
def test_a_line_of_spaces_or_empty_fields_is_no_row(folder, empty):
    """Editors and spreadsheets leave such lines; like a blank line, they are neither counted nor skipped."""
    path = write(folder, HEADER + f"img/a.png,What?,red\n{empty}\nimg/b.png,Which?,blue\n{empty}\n")
    data = read_csv(path)
    assert [r.answer for r in data.rows] == ["red", "blue"] and not data.skipped
    assert "row 2 (line 4)" in data.rows[1].where


@pytest.mark.parametrize("allow_outside_paths", [False, True])
def test_an_image_path_with_a_nul_character_is_a_bad_row_not_a_crash(folder, allow_outside_paths):
    """Python 3.11's csv module reads a NUL; the path's resolution then raised ValueError (a traceback, which
    --skip_bad_rows did not skip either)."""
    path = write(folder, HEADER + "img/a\0.png,What?,red\nimg/b.png,What?,blue\n")
    with pytest.raises(VQAError, match=r"row 1 \(line 2\): image path 'img/a\\x00\.png' holds a NUL character"):
        read_csv(path, allow_outside_paths=allow_outside_paths)
    data = read_csv(path, skip_bad_rows=True, allow_outside_paths=allow_outside_paths)
    assert [r.image.name for r in data.rows] == ["b.png"] and len(data.skipped) == 1


def test_an_image_path_through_a_file_does_not_exist_rather_than_being_corrupt(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(image)
    with pytest.raises(VQAError, match=r"image '.*a.png/b.png' does not exist") as info:
        load_image(image / "b.png")
    assert "corrupt" not in str(info.value)


def test_an_image_the_system_will_not_read_is_not_called_corrupt(tmp_path, monkeypatch):
    image = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(image)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", refuse)  # as root, chmod 000 would not stop the read
    with pytest.raises(VQAError, match=r"cannot read image '.*a.png' \(Permission denied\); check its permissions"):
        load_image(image)


def test_a_split_of_missing_images_is_not_said_to_have_failed_to_decode(tmp_path):
    (tmp_path / "d.csv").write_text("image,question,answer\nnope.png,What color?,red\n")
    with pytest.raises(VQAError, match=r"no image could be loaded .*, e.g. image '.*nope.png' does not exist") as info:
        read_split(tmp_path / "d.csv", skip_bad_rows=True)
    assert "decode" not in str(info.value)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links")
@pytest.mark.parametrize("image", ["loop1", "loop1/a.png"])
def test_an_image_path_through_a_symbolic_link_loop_is_a_clear_error(folder, image):
    os.symlink("loop2", folder / "loop1")
    os.symlink("loop1", folder / "loop2")
    path = write(folder, f"image,question,answer\n{image},What color?,red\nimg/a.png,What color?,red\n")
    with pytest.raises(VQAError, match=r"data.csv row 1 \(line 2\): image path '.*' cannot be followed"):
        read_csv(path)
    assert len(read_csv(path, skip_bad_rows=True).rows) == 1


def test_a_field_over_the_csv_limit_without_a_quote_does_not_blame_a_quote(folder):
    path = write(folder, "image,question,answer\nimg/a.png," + "q" * 200000 + ",red\n")
    with pytest.raises(VQAError, match=r"data.csv line 2: field larger than field limit .*, with no quote on the line"):
        read_csv(path)
    path = write(folder, 'image,question,answer\nimg/a.png,"What' + " color" * 30000 + "\n")  # a quote left open
    with pytest.raises(VQAError, match=r"data.csv line 2: .*a quote \(\"\) opened on line 2 and left open"):
        read_csv(path)


def test_transform_is_the_backbone_s_own_interpolation_mean_and_std_on_the_squashed_image():
    """A photo of another shape, resized whole to the square with the interpolation of the backbone's pretrained
    config (bicubic for DINOv2) and standardised with its mean and std, as the backbone was trained: a plain PIL
    resize and the formula give the same tensor."""
    backbone = timm.create_model("vit_small_patch14_dinov2", img_size=28, embed_dim=32, depth=1, num_heads=2,
                                 num_classes=0)
    cfg = backbone.pretrained_cfg
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 90, 3), dtype=np.uint8))
    resample = Image.Resampling[cfg["interpolation"].upper()]
    pixels = torch.from_numpy(np.asarray(image.resize((28, 28), resample), dtype=np.float32) / 255).permute(2, 0, 1)
    want = (pixels - torch.tensor(cfg["mean"]).view(3, 1, 1)) / torch.tensor(cfg["std"]).view(3, 1, 1)
    torch.testing.assert_close(build_transform(backbone, 28)(image), want)


def test_a_row_over_several_lines_is_named_by_the_lines_it_spans(folder):
    """A question quoted over two lines: the error names the line the row begins on, not only its last."""
    with pytest.raises(VQAError, match=r"data\.csv row 1 \(lines 2 to 3\) has an empty 'answer'"):
        read_csv(write(folder, HEADER + 'img/a.png,"What colour\nis it?", \n'))


def test_a_repeated_row_is_named_whole_in_a_folder_whose_name_has_spaces(tmp_path):
    """The earlier row is named as "row 1 (line 2)" whatever the path holds (its first space cut it before)."""
    spaced = tmp_path / "my data"
    png(spaced / "img" / "a.png")
    with pytest.raises(VQAError, match=r"my data/data\.csv row 2 \(line 3\) repeats row 1 \(line 2\) exactly"):
        read_csv(write(spaced, HEADER + "img/a.png,What?,red\nimg/a.png,What?,red\n"))


def test_an_answers_column_gives_each_question_several_answers_and_its_most_frequent_as_the_answer(folder):
    path = write(folder, "image,question,answers\n"
                         "img/a.png,What color?, Red | blue|red.|RED \n"  # "red" three times once normalised
                         "img/b.png,How many?,two|2|three|3\n"  # a tie: the first given of the two
                         "img/b.png,Is it big?,yes\n")
    rows = read_csv(path).rows
    assert [r.answers for r in rows] == [("Red", "blue", "red.", "RED"), ("two", "2", "three", "3"), ("yes",)]
    assert [r.answer for r in rows] == ["Red", "two", "yes"]
    assert [r.all_answers for r in read_csv(write(folder, HEADER + "img/a.png,What?,red\n", "one.csv")).rows] == [
        ("red",)]  # one answer each: the answer alone
    # The same question, answers and image twice counts twice: an error; other answers make another row.
    with pytest.raises(VQAError, match=r"row 2 \(line 3\) repeats row 1 \(line 2\) exactly"):
        read_csv(write(folder, "image,question,answers\nimg/a.png,What?,red|blue\nimg/a.png,What?,red|blue\n"))
    assert len(read_csv(write(folder, "image,question,answers\nimg/a.png,What?,red|blue\nimg/a.png,What?,red\n"))
               .rows) == 2


@pytest.mark.parametrize("content, message", [
    ("image,question,answer,answers\nimg/a.png,What?,red,red|blue\n",
     "has both an 'answer' and an 'answers' column; keep one"),
    ("image,question,answers\nimg/a.png,What?,red||blue\n", r"row 1 \(line 2\) has an empty answer among its answers "
                                                           r"'red\|\|blue'"),
    ("image,question,answers\nimg/a.png,What?,red|\n", "has an empty answer among its answers"),
    ("image,question,answers\nimg/a.png,What?,red|?!\n", "has the answer '\\?!', which is empty once normalised"),
    ("image,question,answers\nimg/a.png,What?,\n", "has an empty 'answers'; fill it in"),
    ("image,question,answer\nimg/a.png,What?,yes|no\n", "has the answer 'yes\\|no', with \\| between answers: "
                                                       "several answers to a question go in an 'answers' column"),
    ("image,question\nimg/a.png,What?\n", r"has no 'answer' column .* must name image, question, answer \(or answers: "
                                          r"several answers to each question, separated by \|\)"),
])
def test_bad_several_answers_are_errors_naming_the_row(folder, content, message):
    with pytest.raises(VQAError, match=message):
        read_csv(write(folder, content))


def test_questions_with_several_answers_collate_to_each_answer_s_count(folder):
    path = write(folder, "image,question,answers\nimg/a.png,What color?,red|blue|red|maybe\nimg/b.png,What?,blue\n")
    rows = read_csv(path).rows
    answers = AnswerVocab(["blue", "red"])  # "maybe" is not in the vocabulary
    dataset = VQADataset(rows, lambda im: torch.zeros(3, 2, 2), Tokenizer.build(r.question for r in rows), answers)
    batch = collate([dataset[0], dataset[1]])
    assert batch["answer"].tolist() == [1, 0]
    assert batch["answer_ids"].tolist() == [[1, 0, -1], [0, -1, -1]]  # padded with -1
    assert batch["answer_counts"].tolist() == [[2, 1, 1], [1, 0, 0]]  # and 0
    one_answer = read_csv(write(folder, HEADER + "img/a.png,What?,red\n", "one.csv")).rows
    batch = collate([VQADataset(one_answer, lambda im: torch.zeros(3, 2, 2), Tokenizer.build(["What?"]), answers)[0]])
    assert "answer_ids" not in batch and batch["answer"].tolist() == [1]  # no counts to give: the answer says it all


def test_the_data_tools_run_without_importing_timm(tmp_path):
    """timm's import takes seconds (most of a tool's start on this project's CPU): the tools that only read and write
    data, run here on a data set one of them makes, never import it, and the package gives the model on first use."""
    child = f"""
import sys
from vqa import answer_weights, config, synth, vqa2, vqa2_results
assert synth.main(["--out", {str(tmp_path)!r}, "--train-images", "2", "--val-images", "1"]) == 0
assert answer_weights.main(["--train_csv", {str(tmp_path / "train.csv")!r}, "--out", {str(tmp_path / "w.json")!r}]) == 0
print("timm before the model:", sorted(m for m in sys.modules if m.split(".")[0] == "timm"))
import vqa
print("model:", vqa.DeterministicVQA.__module__, "timm" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["timm before the model: []", "model: vqa.model True"]
    assert (tmp_path / "w.json").is_file()


def test_the_package_has_no_names_but_its_own():
    import vqa
    with pytest.raises(AttributeError, match="module 'vqa' has no attribute 'DeterministicVQa'"):
        vqa.DeterministicVQa
    assert {name: getattr(vqa, name).__module__ for name in ("DeterministicVQA", "VQAOutput")} == {
        "DeterministicVQA": "vqa.model", "VQAOutput": "vqa.model"}
