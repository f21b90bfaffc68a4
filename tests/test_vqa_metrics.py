import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

from vqa.answer_weights import compute_answer_weights, load_answer_weights, main as answer_weights_main
from vqa.errors import VQAError
from vqa.metrics import TypeAccuracy, format_accuracy_table, vqa_credit
from vqa.text import QUESTION_TYPES

COUNT, COLOR, LOCATION, YESNO = (QUESTION_TYPES.index(t) for t in ("count", "color", "location", "yes/no"))


def test_per_type_accuracy_on_a_hand_made_example():
    meter = TypeAccuracy()
    # count: 2 of 3 right; color: 1 of 2 (the miss has an answer outside the vocabulary); location: 0 of 1
    meter.update(torch.tensor([1, 2, 3, 0, 5]), torch.tensor([1, 2, 4, 0, -1]),
                 torch.tensor([COUNT, COUNT, COUNT, COLOR, COLOR]))
    meter.update(torch.tensor([7, -1]), torch.tensor([6, -1]), torch.tensor([LOCATION, YESNO]))
    m = meter.compute()
    assert m["count"] == 7
    assert m["accuracy"] == pytest.approx(3 / 7)  # -1 == -1 is still wrong: unseen answers never score
    assert m["per_type"] == {
        "count": {"accuracy": pytest.approx(2 / 3), "count": 3},
        "color": {"accuracy": 0.5, "count": 2},
        "location": {"accuracy": 0.0, "count": 1},
        "yes/no": {"accuracy": 0.0, "count": 1},
    }
    table = format_accuracy_table(m)
    assert "count              66.67%          3" in table and table.splitlines()[-1].startswith("overall")


def _leave_one_out_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA v2's accuracy as its evaluation script defines it, answer by answer (exact match for one answer)."""
    if len(answers) == 1:
        return float(answers[0] == prediction)
    scores = [min(1.0, sum(a == prediction for a in answers[:i] + answers[i + 1:]) / 3) for i in range(len(answers))]
    return sum(scores) / len(scores)


@given(st.lists(st.sampled_from("abc"), min_size=1, max_size=12), st.sampled_from("abcd"))
def test_vqa_credit_is_the_mean_over_each_answer_left_out(answers, prediction):
    matches = sum(a == prediction for a in answers)
    credit = vqa_credit(torch.tensor([matches]), torch.tensor([len(answers)]))
    assert float(credit) == pytest.approx(_leave_one_out_accuracy(prediction, answers), abs=1e-12)


def test_vqa_credit_of_ten_answers_is_three_tenths_a_match_and_one_from_four():
    credit = vqa_credit(torch.arange(11), torch.full((11,), 10))
    assert credit.tolist() == pytest.approx([0, 0.3, 0.6, 0.9] + [1] * 7)


def test_accuracy_with_several_answers_a_question_is_vqa_credit_where_given():
    meter = TypeAccuracy()
    # count: ten answers, "1" (class 1) given by two people and "2" (class 2) by eight; a prediction of 1 earns 0.6.
    # color: one answer (class 4), predicted: 1. color: three answers of which two outside the vocabulary (-1)
    # and none the prediction: 0.
    ids = torch.tensor([[1, 2, -1], [4, -1, -1], [3, -1, -1]])
    counts = torch.tensor([[2, 8, 0], [1, 0, 0], [1, 2, 0]])
    meter.update(torch.tensor([1, 4, 0]), torch.tensor([2, 4, 3]), torch.tensor([COUNT, COLOR, COLOR]), ids, counts)
    m = meter.compute()
    assert m["per_type"]["count"] == {"accuracy": pytest.approx(0.6), "count": 1}
    assert m["per_type"]["color"] == {"accuracy": pytest.approx(0.5), "count": 2}
    assert m["accuracy"] == pytest.approx(1.6 / 3)


def test_answer_weights_formula_and_clipping():
    answers = ["yes"] * 90 + ["no"] * 9 + ["purple"]
    w = compute_answer_weights(answers, min_weight=0.1, max_weight=5.0)
    assert w["yes"] == pytest.approx(math.sqrt(100 / (3 * 90)))
    assert w["no"] == pytest.approx(math.sqrt(100 / (3 * 9)))
    assert w["purple"] == 5.0  # sqrt(100 / 3) = 5.77, clipped
    assert list(w) == ["yes", "no", "purple"]


def test_answer_weights_are_clipped_from_below():
    w = compute_answer_weights(["yes"] * 999 + ["no"], min_weight=0.9, max_weight=10.0)
    assert w["yes"] == 0.9 and w["no"] == 10.0


def test_a_weights_file_saved_with_a_byte_order_mark_loads_as_the_csv_and_yaml_files_do(tmp_path):
    path = tmp_path / "w.json"
    path.write_text('{"yes": 0.5, "no": 2}', encoding="utf-8-sig")  # Windows editors write the mark
    assert load_answer_weights(path) == {"yes": 0.5, "no": 2.0}


def test_hand_written_weight_keys_are_normalised_as_answers_are(tmp_path):
    path = tmp_path / "w.json"
    path.write_text('{"Two.": 2.0, "The Yes": 0.5}')
    assert load_answer_weights(path) == {"2": 2.0, "yes": 0.5}


def test_no_questions_is_zero_accuracy_not_perfect():
    assert TypeAccuracy().compute() == {"accuracy": 0.0, "count": 0, "per_type": {}}


def test_table_prints_overall_accuracy_as_a_percentage():
    meter = TypeAccuracy()
    meter.update(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]), torch.tensor([0, 0, 1]))
    assert format_accuracy_table(meter.compute()).splitlines()[-1] == f"{'overall':<15}{'66.67':>9}%{3:>11}"


def test_answer_weights_cli_round_trip(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    csv = tmp_path / "train.csv"
    csv.write_text("image,question,answer\na.png,Is it?,Yes\na.png,Is it really?,yes\na.png,How many?,two\n")
    out = tmp_path / "w.json"
    assert answer_weights_main(["--train_csv", str(csv), "--out", str(out)]) == 0
    weights = load_answer_weights(out)
    assert set(weights) == {"yes", "2"} and weights["2"] > weights["yes"]
    assert answer_weights_main(["--train_csv", str(csv), "--out", str(out), "--max_weight", "1"]) == 0  # replaced
    assert max(load_answer_weights(out).values()) == 1
    out.write_text('{"two": 2, "2": 1.5}')  # an older weights file, refused now: regenerating it is the fix
    assert answer_weights_main(["--train_csv", str(csv), "--out", str(out)]) == 0
    assert load_answer_weights(out) == weights
    csv.write_text("image,question,answers\na.png,Is it?,yes|yes|no\na.png,Is it really?,yes\na.png,How many?,two\n")
    assert answer_weights_main(["--train_csv", str(csv), "--out", str(out)]) == 0  # each person's answer counts
    assert load_answer_weights(out) == pytest.approx(compute_answer_weights(["yes", "yes", "no", "yes", "two"]))
    assert answer_weights_main(["--train_csv", str(csv), "--out", str(out), "--min_answer_count", "2"]) == 0
    assert load_answer_weights(out) == {"yes": 1.0}  # the one class given twice: of average frequency among them


@pytest.mark.parametrize("target", ["the CSV", "a run's answers.json", "a run's steps.jsonl of one line",
                                    "a path under a file"])
def test_answer_weights_out_never_writes_over_another_file(tmp_path, capsys, target):
    (tmp_path / "a.png").write_bytes(b"")
    csv = tmp_path / "train.csv"
    csv.write_text("image,question,answer\na.png,Is it?,yes\n")
    (tmp_path / "answers.json").write_text('{"answers": ["yes"]}')
    (tmp_path / "steps.jsonl").write_text('{"step": 50, "epoch": 1, "loss": 2.31, "lr": 0.001, "lr_encoder": 0.001}\n')
    out = {"the CSV": csv, "a run's answers.json": tmp_path / "answers.json",
           "a run's steps.jsonl of one line": tmp_path / "steps.jsonl", "a path under a file": csv / "w.json"}[target]
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    assert answer_weights_main(["--train_csv", str(csv), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    if target == "a path under a file":
        assert err.startswith(f"error: cannot write --out '{out}' (") and "writable" in err
    else:
        assert f"--out '{out}' exists and is not an answer weights file (a JSON object of answer: number), so it " \
               f"is not written over" in err
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before


@pytest.mark.parametrize("content, message", [("[1, 2]", "must hold an object"), ('{"yes": -1}', "must be a number > 0"),
                                              ('{"yes": "big"}', "must be a number > 0"), ("{", "not valid JSON"),
                                              # 0 would drop the answer from the loss, nan or inf make it nan
                                              ('{"yes": 0}', "weight of 'yes' must be a number > 0"),
                                              ('{"yes": true}', "weight of 'yes' must be a number > 0"),
                                              ('{"yes": NaN}', "weight of 'yes' must be a number > 0"),
                                              ('{"yes": Infinity}', "weight of 'yes' must be a number > 0"),
                                              # one key would replace the other, the file's order deciding
                                              ('{"two": 5, "2": 0.2}', "'two' and '2' are both the answer '2' once "
                                                                       r"normalised \(weights 5 and 0\.2\)"),
                                              ('{"yes": 1, "yes": 2}', r"'yes' is given twice \(weights 1 and 2\)"),
                                              ('{"a": {"b": 1}}', r"weight of 'a' must be a number > 0, got \{'b': 1\}")])
def test_bad_answer_weights_files(tmp_path, content, message):
    path = tmp_path / "w.json"
    path.write_text(content)
    with pytest.raises(VQAError, match=message):
        load_answer_weights(path)


@pytest.mark.parametrize("args, message", [
    (["--max_weight", "0"], "must be finite, > 0, and min <= max; got 0.1 and 0.0"),
    (["--min_weight", "nan"], "must be finite, > 0"),
    (["--min_weight", "5", "--max_weight", "2"], "min <= max"),
    (["--out", "DIR"], "is a folder; give the JSON file to write"),
])
def test_answer_weights_cli_refuses_what_training_would_refuse(tmp_path, capsys, args, message):
    (tmp_path / "a.png").write_bytes(b"")
    csv = tmp_path / "train.csv"
    csv.write_text("image,question,answer\na.png,Is it?,yes\n")
    args = [str(tmp_path) if a == "DIR" else a for a in args]
    code = answer_weights_main(["--train_csv", str(csv), "--out", str(tmp_path / "w.json"), *args])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "w.json").exists()


def test_answer_weights_cli_takes_the_csv_options_its_errors_suggest(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "a.png").write_bytes(b"")
    csv = tmp_path / "data" / "train.csv"
    csv.write_text("image,question,answer\n../a.png,Is it?,yes\n,Empty image?,no\n")
    out = tmp_path / "w.json"
    assert answer_weights_main(["--train_csv", str(csv), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pass --allow_outside_paths" in err and "pass --skip_bad_rows" in err
    assert answer_weights_main(["--train_csv", str(csv), "--out", str(out), "--skip_bad_rows",
                                "--allow_outside_paths"]) == 0
    assert capsys.readouterr().out.startswith(f"skipped 1 bad row(s) (--skip_bad_rows), e.g. {csv} row 2 ")
    assert set(load_answer_weights(out)) == {"yes"}


def test_answer_weights_cli_applies_the_min_weight(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    csv = tmp_path / "train.csv"
    csv.write_text("image,question,answer\n" + "".join(f"a.png,Is it {i}?,yes\n" for i in range(9)) + "a.png,Is it?,no\n")
    out = tmp_path / "w.json"
    assert answer_weights_main(["--train_csv", str(csv), "--out", str(out), "--min_weight", "0.9"]) == 0
    assert load_answer_weights(out) == {"yes": 0.9, "no": pytest.approx(math.sqrt(10 / 2))}  # yes: sqrt(10/18) = 0.75


def test_answer_weights_from_no_answers_is_an_error():
    with pytest.raises(VQAError, match="from no answers"):
        compute_answer_weights([])


def test_answer_weights_of_equal_counts_are_listed_alphabetically():
    """The file does not depend on the CSV's row order."""
    assert list(compute_answer_weights(["red", "no", "yes", "blue", "no"])) == ["no", "blue", "red", "yes"]


@pytest.mark.parametrize("content", ['{"epochs": 3, "name": "tiny"}', "[1, 2]", '{"yes": true}', "3"])
def test_answer_weights_out_never_writes_over_json_that_is_no_weights_file(tmp_path, capsys, content):
    (tmp_path / "a.png").write_bytes(b"")
    csv = tmp_path / "train.csv"
    csv.write_text("image,question,answer\na.png,Is it?,yes\n")
    out = tmp_path / "other.json"
    out.write_text(content)
    assert answer_weights_main(["--train_csv", str(csv), "--out", str(out)]) == 2
    assert "exists and is not an answer weights file" in capsys.readouterr().err
    assert out.read_text() == content


@pytest.mark.parametrize("answer", ["?!", "\u2026", ".", " "])
def test_a_weight_for_an_answer_empty_once_normalised_is_an_error(tmp_path, answer):
    """Training refuses such answers, so the weight would silently go unused."""
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"yes": 1, answer: 3}))
    with pytest.raises(VQAError, match=f"the answer '{re.escape(answer)}' is empty once normalised"):
        load_answer_weights(path)


def test_table_lists_the_types_in_their_fixed_order_with_each_type_s_own_count():
    meter = TypeAccuracy()
    # Seen in the order yes/no, color, count: the table still follows QUESTION_TYPES (count before color).
    meter.update(torch.tensor([1, 0, 2, 2, 5]), torch.tensor([1, 0, 2, 3, 5]),
                 torch.tensor([YESNO, COLOR, COUNT, COUNT, YESNO]))
    assert format_accuracy_table(meter.compute()).splitlines() == [
        "question type    accuracy  questions",
        "-" * 36,
        "count              50.00%          2",
        "color             100.00%          1",
        "yes/no            100.00%          2",
        "-" * 36,
        "overall            80.00%          5",
    ]


def test_answer_weights_out_a_pipe_is_refused_not_read(tmp_path):
    """Looking at what --out holds read it: a named pipe (or a device) blocked the tool for ever."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes")
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "train.csv").write_text("image,question,answer\na.png,What color?,red\n")
    os.mkfifo(tmp_path / "weights.json")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "vqa.answer_weights", "--train_csv", str(tmp_path / "train.csv"),
                             "--out", str(tmp_path / "weights.json")], cwd=root, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert f"error: --out '{tmp_path / 'weights.json'}' exists and is not a file" in result.stderr


def test_answer_weights_path_that_is_a_folder_is_called_a_folder(tmp_path):
    # It exists: "does not exist; make one" would have the user make a file that is there.
    with pytest.raises(VQAError, match=r"answer weights file '.*' is a folder; give the JSON file itself"):
        load_answer_weights(tmp_path)


def test_missing_answer_weights_advice_is_a_command_that_runs(tmp_path):
    with pytest.raises(VQAError, match="make one with python -m vqa.answer_weights --train_csv TRAIN_CSV --out FILE"):
        load_answer_weights(tmp_path / "none.json")


@pytest.mark.parametrize("text", ['{"red": ' + "1" * 400 + "}", '{"red": ' + "1" * 5000 + "}",
                                  "[" * 100000 + "]" * 100000])
def test_answer_weights_a_number_or_nesting_python_cannot_hold_is_a_clear_error(tmp_path, text):
    path = tmp_path / "w.json"
    path.write_text(text)
    with pytest.raises(VQAError, match="answer weights file '.*w.json'"):
        load_answer_weights(path)


def test_answer_weights_out_nested_too_deeply_is_kept_not_a_traceback(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "train.csv").write_text("image,question,answer\na.png,What color?,red\n")
    (tmp_path / "w.json").write_text("[" * 100000 + "]" * 100000)
    assert answer_weights_main(["--train_csv", str(tmp_path / "train.csv"), "--out", str(tmp_path / "w.json")]) == 2
    assert "is not an answer weights file" in capsys.readouterr().err


def test_weights_written_as_whole_numbers_load_as_floats(tmp_path):
    """A hand-written file of integer weights gives floats: a class-weight tensor built from them is floating point,
    as the cross-entropy loss requires (an int64 tensor of weights is an error there)."""
    path = tmp_path / "w.json"
    path.write_text('{"yes": 2, "no": 1}')
    weights = load_answer_weights(path)
    assert weights == {"yes": 2.0, "no": 1.0} and all(type(w) is float for w in weights.values())
    assert torch.tensor(list(weights.values())).is_floating_point()


def test_answer_weights_are_clipped_to_0_1_and_10_by_default(tmp_path):
    """The documented clip, [0.1, 10], holds without min_weight and max_weight, and from the command line without
    --min_weight and --max_weight."""
    # yes: sqrt(20200 / (201 * 20000)) = 0.07; each digit 10.02
    answers = ["yes"] * 20_000 + [str(i) for i in range(200)]
    unclipped = compute_answer_weights(answers, min_weight=1e-9, max_weight=1e9)
    assert unclipped["yes"] < 0.1 and unclipped["0"] > 10  # so that both bounds show
    weights = compute_answer_weights(answers)
    assert weights["yes"] == 0.1 and weights["0"] == 10.0
    (tmp_path / "a.png").write_bytes(b"")
    csv = tmp_path / "train.csv"
    rows = "".join(f"a.png,Is it {i}?,yes\n" for i in range(250)) + "a.png,Is it?,no\n"
    csv.write_text("image,question,answer\n" + rows)
    out = tmp_path / "w.json"
    assert answer_weights_main(["--train_csv", str(csv), "--out", str(out)]) == 0
    assert load_answer_weights(out) == {"yes": pytest.approx(math.sqrt(251 / 500)), "no": 10.0}  # no: 11.2 unclipped
