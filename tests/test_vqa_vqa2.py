"""python -m vqa.vqa2: VQA v2's JSON files as a CSV the data reader takes, answers and all."""
import csv
import json
import os
import re

import pytest
from PIL import Image

from vqa.data import read_csv
from vqa.vqa2 import main

TEN = ["yes"] * 7 + ["no", "yes|no", "?!"]  # a | inside an answer, and one empty once normalised


@pytest.fixture
def vqa2(tmp_path):
    """A split of three questions about two COCO images, in VQA v2's files, the images under the CSV's folder."""
    images = tmp_path / "train2014"
    images.mkdir()
    for image_id in (9, 25):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(images / f"COCO_train2014_{image_id:012d}.jpg", format="JPEG")
    questions = [{"image_id": 9, "question": "Is it red?", "question_id": 90},
                 {"image_id": 9, "question": "How many  circles are there?", "question_id": 91},
                 {"image_id": 25, "question": "What is it made of?", "question_id": 250}]
    annotations = [  # in another order than the questions
        {"question_id": 250, "image_id": 25, "answer_type": "other", "answers": [{"answer": "Wood"}] * 6
         + [{"answer": "metal"}] * 4},
        {"question_id": 90, "image_id": 9, "answer_type": "yes/no", "answers": [{"answer": a} for a in TEN]},
        {"question_id": 91, "image_id": 9, "answer_type": "number", "answers": [{"answer": "2"}] * 9
         + [{"answer": "two "}]},
    ]
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "train2014", "questions": questions}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": annotations}))
    return tmp_path


def run(folder, *extra):
    return main(["--questions", str(folder / "q.json"), "--annotations", str(folder / "a.json"), "--images",
                 str(folder / "train2014"), "--out", str(folder / "train.csv"), *extra])


def test_every_question_gets_its_answers_and_its_type_in_the_questions_order(vqa2, capsys):
    assert run(vqa2) == 0
    assert "wrote 3 questions about 2 images" in capsys.readouterr().out
    with (vqa2 / "train.csv").open(newline="") as f:  # the types as written: VQA v2's answer types, "other" left out
        assert [r["question_type"] for r in csv.DictReader(f)] == ["yes/no", "count", ""]
    rows = read_csv(vqa2 / "train.csv").rows
    assert [r.given_image for r in rows] == ["train2014/COCO_train2014_000000000009.jpg"] * 2 + [
        "train2014/COCO_train2014_000000000025.jpg"]
    assert [r.question for r in rows] == ["Is it red?", "How many circles are there?", "What is it made of?"]
    assert [r.answers for r in rows] == [tuple(["yes"] * 7 + ["no", "yes no"]), tuple(["2"] * 9 + ["two"]),
                                         tuple(["Wood"] * 6 + ["metal"] * 4)]
    assert [r.answer for r in rows] == ["yes", "2", "Wood"]
    assert [r.question_type for r in rows] == ["yes/no", "count", "other"]  # the last one from its wording


def test_the_answer_left_out_is_said(vqa2, capsys):
    assert run(vqa2) == 0
    assert "left out 1 answer(s) empty once normalised" in capsys.readouterr().out


def test_a_test_split_has_no_answers_and_its_images_are_test2015_s(vqa2):
    folder = vqa2 / "train2014"
    for image in folder.iterdir():
        image.rename(folder / image.name.replace("train2014", "test2015"))
    (vqa2 / "q.json").write_text(json.dumps({**json.loads((vqa2 / "q.json").read_text()),
                                             "data_subtype": "test-dev2015"}))
    assert main(["--questions", str(vqa2 / "q.json"), "--images", str(folder), "--out", str(vqa2 / "test.csv")]) == 0
    assert (vqa2 / "test.csv").read_text().splitlines()[0] == "image,question"
    rows = read_csv(vqa2 / "test.csv", require_answer=False).rows
    assert rows[2].given_image == "train2014/COCO_test2015_000000000025.jpg"


def test_images_outside_the_csv_s_folder_are_named_by_absolute_paths(vqa2, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("elsewhere") / "train.csv"
    assert run(vqa2, "--out", str(out)) == 0
    said = capsys.readouterr().out
    assert "2 image(s) are outside the CSV's folder" in said and "train with --allow_outside_paths" in said  # 3 rows
    rows = read_csv(out, allow_outside_paths=True).rows
    assert rows[0].given_image == str(vqa2 / "train2014" / "COCO_train2014_000000000009.jpg")


def test_missing_images_are_an_error_or_with_the_option_left_out(vqa2, capsys):
    (vqa2 / "train2014" / "COCO_train2014_000000000025.jpg").unlink()
    assert run(vqa2) == 2
    assert "1 of the 2 images are not in --images" in capsys.readouterr().err and not (vqa2 / "train.csv").exists()
    assert run(vqa2, "--skip_missing_images") == 0
    assert "left out 1 question(s) about 1 image(s) not in --images" in capsys.readouterr().out
    assert [r.question for r in read_csv(vqa2 / "train.csv").rows] == ["Is it red?", "How many circles are there?"]


def test_a_question_repeated_exactly_is_left_out_and_counted_and_any_answer_type_is_read(vqa2, capsys):
    questions = json.loads((vqa2 / "q.json").read_text())
    questions["questions"].append({**questions["questions"][0], "question_id": 92})  # "Is it red?" again
    annotations = json.loads((vqa2 / "a.json").read_text())
    annotations["annotations"].append({**annotations["annotations"][1], "question_id": 92})
    annotations["annotations"][0]["answer_type"] = ["other"]  # no type of VQA v2's: left to the wording
    (vqa2 / "q.json").write_text(json.dumps(questions))
    (vqa2 / "a.json").write_text(json.dumps(annotations))
    assert run(vqa2) == 0
    assert "left out 1 question(s) repeating an earlier one exactly" in capsys.readouterr().out
    assert [r.question for r in read_csv(vqa2 / "train.csv").rows] == [
        "Is it red?", "How many circles are there?", "What is it made of?"]


def test_subtype_names_the_images_and_an_image_linked_from_outside_is_named_by_its_absolute_path(
        vqa2, tmp_path_factory, capsys):
    elsewhere = tmp_path_factory.mktemp("coco")
    for image in (vqa2 / "train2014").iterdir():
        name = image.name.replace("train2014", "val2014")
        if name.endswith("25.jpg"):  # a link to a file outside the CSV's folder, which the CSV reader follows
            image.rename(elsewhere / name)
            os.symlink(elsewhere / name, vqa2 / "train2014" / name)
        else:
            image.rename(image.with_name(name))
    assert run(vqa2, "--subtype", "val2014") == 0
    assert "1 image(s) are outside the CSV's folder (or links to files outside it)" in capsys.readouterr().out
    rows = read_csv(vqa2 / "train.csv", allow_outside_paths=True).rows
    assert [r.given_image for r in rows] == ["train2014/COCO_val2014_000000000009.jpg"] * 2 + [
        str(vqa2 / "train2014" / "COCO_val2014_000000000025.jpg")]


def test_an_image_linked_from_another_folder_to_one_in_the_csv_s_folder_is_named_as_the_reader_finds_it(vqa2):
    """--images holds links to files under the CSV's folder: the CSV gives the link's path relative to that folder,
    which the CSV reader follows back into it, keeping the COCO name the results tool reads the image id from."""
    out = vqa2 / "csv" / "train.csv"
    (vqa2 / "csv" / "files").mkdir(parents=True)
    links = vqa2 / "links"
    links.mkdir()
    for image in (vqa2 / "train2014").iterdir():
        image.rename(vqa2 / "csv" / "files" / image.name)
        os.symlink(vqa2 / "csv" / "files" / image.name, links / image.name)
    assert main(["--questions", str(vqa2 / "q.json"), "--annotations", str(vqa2 / "a.json"), "--images", str(links),
                 "--out", str(out)]) == 0
    rows = read_csv(out).rows  # no --allow_outside_paths needed
    assert [r.given_image for r in rows] == ["../links/COCO_train2014_000000000009.jpg"] * 2 + [
        "../links/COCO_train2014_000000000025.jpg"]
    assert rows[2].image == (vqa2 / "csv" / "files" / "COCO_train2014_000000000025.jpg").resolve()


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "a.json").write_text('{"annotations": [}'), "--annotations '.*a.json' is not a JSON file"),
    (lambda f: (f / "q.json").write_text('{"images": []}'), "holds no list 'questions', as VQA v2's questions file"),
    (lambda f: (f / "a.json").write_text(json.dumps({"annotations": [{"question_id": 250, "answers": []}]})),
     "question 0 \\(question_id 90\\) has no annotation in .*a.json; give the annotations of the same split"),
    (lambda f: (f / "a.json").write_text(json.dumps({"annotations": []})),
     "--annotations '.*a.json' holds no annotations: its list 'annotations' is empty; give the split's whole file"),
    (lambda f: (f / "q.json").write_text(json.dumps({"data_subtype": "train2014", "questions": []})),
     "--questions '.*q.json' holds no questions: its list 'questions' is empty"),
    (lambda f: (f / "q.json").write_text(json.dumps({"data_subtype": "train2014", "questions": [
        {"image_id": 9, "question": "Is it red?", "question_id": 90}]})),
     "annotates 2 question\\(s\\) that .*q.json does not ask"),
    (lambda f: (f / "q.json").write_text(json.dumps({"questions": json.loads((f / "q.json").read_text())["questions"]})),
     "names no data_subtype; give the images'"),
    (lambda f: (f / "q.json").write_text(json.dumps({"data_subtype": "train2014", "questions": [
        {"image_id": 9, "question": "Is it red?", "question_id": 90}] * 2})), "question 1 asks question_id 90 a second"),
    (lambda f: (f / "a.json").write_text(json.dumps({"annotations": [{"question_id": 90, "answers": "yes"}]})),
     "the annotation of question 90 has no list 'answers'"),
    (lambda f: (f / "train.csv").write_text("image,question\nold.jpg,Is it?\n"), "--out '.*train.csv' exists; add "
                                                                                 "--overwrite"),
    (lambda f: (f / "train.csv").symlink_to(f / "q.json"), "--out '.*train.csv' is the --questions file"),
    (lambda f: (f / "a.json").write_text(json.dumps({"annotations": json.loads((f / "a.json").read_text())[
        "annotations"] * 2})), "annotation 3 is the second annotation of question 250"),
    (lambda f: (f / "q.json").write_text(json.dumps({"data_subtype": "train2014", "questions": [
        {"image_id": 9, "question": " \n ", "question_id": 90}]})), r"\(question_id 90\) asks nothing"),
])
def test_bad_input_is_an_error_naming_the_file_and_the_fix(vqa2, capsys, damage, message):
    damage(vqa2)
    assert run(vqa2) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err


def test_overwrite_replaces_only_an_earlier_csv_of_the_tool(vqa2, capsys):
    """--overwrite replaces a CSV this tool wrote, and no other file: a run's answers.json given as --out by mistake,
    another split's annotations, one's own CSV of other columns."""
    (vqa2 / "train.csv").write_text("image,question\nold.jpg,Is it?\n")
    assert run(vqa2, "--overwrite") == 0
    assert (vqa2 / "train.csv").read_text().startswith("image,question,answers,question_type\n")
    mine = "image,question,answer\na.jpg,Is it?,yes\n"
    for name, text in (("answers.json", '{"itos": ["yes"]}'), ("mine.csv", mine)):
        (vqa2 / name).write_text(text)
        assert run(vqa2, "--out", str(vqa2 / name), "--overwrite") == 2
        assert "exists and is not a CSV python -m vqa.vqa2 wrote, so it is not written over" in capsys.readouterr().err
        assert (vqa2 / name).read_text() == text


def predicted(folder, csv_path, answers):
    """A predictions file of ``csv_path``'s questions, as python -m vqa.predict --csv writes one, with ``answers``
    as the predictions; returns its path."""
    from vqa.predictions import write_predictions

    table = [{"row": str(r.number), "image": r.given_image, "question": r.question, "question_type": r.question_type,
              "prediction": answer, "probability": "0.5000"}
             for r, answer in zip(read_csv(csv_path, require_answer=False).rows, answers, strict=True)]
    write_predictions(folder / "predictions.csv", table, "--out")
    return folder / "predictions.csv"


def test_results_answer_every_question_by_its_id_and_a_repeat_as_the_question_it_repeats(vqa2, capsys):
    from vqa.vqa2_results import main as results

    questions = json.loads((vqa2 / "q.json").read_text())
    questions["questions"].insert(1, {"image_id": 25, "question": "What is it  made of?", "question_id": 251})
    (vqa2 / "q.json").write_text(json.dumps(questions))
    assert main(["--questions", str(vqa2 / "q.json"), "--images", str(vqa2 / "train2014"),
                 "--out", str(vqa2 / "test.csv")]) == 0
    assert "left out 1 question(s) repeating an earlier one" in capsys.readouterr().out
    predictions = predicted(vqa2, vqa2 / "test.csv", ["yes", "wood", "2"])  # the CSV's three: 90, 251, 91
    text = predictions.read_text()  # one image named as a CSV written on Windows may name it
    predictions.write_text(text.replace("train2014/COCO_train2014_000000000025.jpg",
                                        "C:\\data\\train2014\\COCO_train2014_000000000025.jpg"))
    out = vqa2 / "results.json"
    assert results(["--questions", str(vqa2 / "q.json"), "--predictions", str(predictions), "--out", str(out)]) == 0
    assert "wrote the answers to the 4 questions" in capsys.readouterr().out
    assert json.loads(out.read_text()) == [{"question_id": 90, "answer": "yes"}, {"question_id": 251, "answer": "wood"},
                                           {"question_id": 91, "answer": "2"}, {"question_id": 250, "answer": "wood"}]
    # vqa.evaluate's predictions file (with the answers) is taken too; a question it lacks is an error, nothing written.
    with predictions.open(newline="") as f:
        rows = list(csv.DictReader(f))
    with predictions.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "answer", "correct"], lineterminator="\n")
        writer.writeheader()
        writer.writerows({**r, "answer": "yes|no", "correct": "0"} for r in rows[:2])
    out.unlink()
    assert results(["--questions", str(vqa2 / "q.json"), "--predictions", str(predictions), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 of the 4 questions of --questions have no prediction" in err and "question_id 91" in err
    assert ("(without --skip_bad_rows); such a CSV leaves out the questions about images --skip_missing_images left out, "
            "and, made with --annotations, those with no answer left once normalised") in err
    assert "--subtype" not in err and not out.exists()


def test_results_of_other_images_name_the_subtype_and_extra_predictions_are_left_out_and_said(vqa2, capsys):
    from vqa.vqa2_results import main as results

    assert main(["--questions", str(vqa2 / "q.json"), "--images", str(vqa2 / "train2014"),
                 "--out", str(vqa2 / "test.csv")]) == 0
    predictions = predicted(vqa2, vqa2 / "test.csv", ["yes", "2", "wood"])
    args = ["--questions", str(vqa2 / "q.json"), "--predictions", str(predictions), "--out", str(vqa2 / "r.json")]
    assert results([*args, "--subtype", "val2014"]) == 2
    assert "none of their images is named as the predictions' (COCO_train2014_" in capsys.readouterr().err
    questions = json.loads((vqa2 / "q.json").read_text())
    del questions["questions"][0]
    (vqa2 / "q.json").write_text(json.dumps(questions))
    assert results(args) == 0
    assert "left out 1 prediction(s) of questions that" in capsys.readouterr().out
    assert [r["question_id"] for r in json.loads((vqa2 / "r.json").read_text())] == [91, 250]
    assert results(args) == 2 and "exists; add --overwrite" in capsys.readouterr().err
    assert results([*args, "--overwrite"]) == 0  # an earlier results file is replaced
    (vqa2 / "q.json").write_text(json.dumps(questions | {"questions": questions["questions"] + [
        {"image_id": 77, "question": "Is it new?", "question_id": 770}]}))  # an image the predictions lack
    assert results([*args, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "1 of the 3 questions" in err and "question_id 770" in err and "--subtype" not in err  # no subtype hint


@pytest.mark.parametrize("damage, message", [
    ("columns", "has no prediction column, as a predictions file does"),
    ("twice", "answers one question twice, differently: line 2 'yes' and line 5 'no'"),
    ("empty", "line 3 has an empty prediction"),
    ("short", "line 3 has fewer fields than its header"),
    ("long", "line 3 has more fields than its header"),
    ("out is input", "--out '{out}' is the --predictions file"),
    ("out exists", "--out '{out}' exists; add --overwrite"),
    ("out is another file", "--out '{out}' exists and is not a results file (a JSON list of question_id and "
                            "answer), so it is not written over, even with --overwrite"),
    ("out is a folder", "--out '{out}' is a folder; give the file to write, e.g. {out}/results.json"),
    ("missing", "--predictions '{predictions}' does not exist"),
])
def test_bad_results_input_is_an_error_naming_the_file_and_the_fix(vqa2, capsys, damage, message):
    from vqa.vqa2_results import main as results

    assert main(["--questions", str(vqa2 / "q.json"), "--images", str(vqa2 / "train2014"),
                 "--out", str(vqa2 / "test.csv")]) == 0
    predictions = predicted(vqa2, vqa2 / "test.csv", ["yes", "2", "wood"])
    out = vqa2 / "results.json"
    lines = predictions.read_text().splitlines()
    if damage == "columns":
        predictions.write_text("\n".join([lines[0].replace("prediction", "answer"), *lines[1:]]) + "\n")
    elif damage == "twice":
        predictions.write_text("\n".join([*lines, lines[1].replace(",yes,", ",no,")]) + "\n")
    elif damage == "empty":
        predictions.write_text("\n".join([lines[0], lines[1], lines[2].replace(",2,", ",,"), lines[3]]) + "\n")
    elif damage == "short":
        predictions.write_text("\n".join([lines[0], lines[1], lines[2].rsplit(",", 3)[0], lines[3]]) + "\n")
    elif damage == "long":
        predictions.write_text("\n".join([lines[0], lines[1], lines[2] + ",0.9", lines[3]]) + "\n")
    elif damage == "out is input":
        out = predictions
    elif damage == "out exists":
        out.write_text('[{"question_id": 1, "answer": "yes"}]')
    elif damage == "out is another file":
        out.write_text('{"annotations": []}')
    elif damage == "out is a folder":
        out.mkdir()
    elif damage == "missing":
        predictions.unlink()
    before = out.read_bytes() if out.is_file() else out.is_dir()
    overwrite = ["--overwrite"] if damage == "out is another file" else []
    assert results(["--questions", str(vqa2 / "q.json"), "--predictions", str(predictions), "--out", str(out),
                    *overwrite]) == 2
    assert message.format(out=out, predictions=predictions) in capsys.readouterr().err
    assert (out.read_bytes() if out.is_file() else out.is_dir()) == before
