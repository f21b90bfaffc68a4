"""End-to-end runs of the real command-line tools on a tiny config, plus the training loop's guarantees."""
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from conftest import offline_hub, serving_hub
from safetensors.torch import load_file
from vqa.errors import VQAError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train.py
ARTEFACTS = [
    "config.yaml", "tokenizer.json", "answers.json", "backbone.safetensors", "checkpoint.pt", "metrics.jsonl",
    "model_best.safetensors", "model_last.safetensors", "adapter_best.safetensors", "adapter_last.safetensors",
]


TINY_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def tiny_config(tmp_path, **train):
    data = tmp_path / "data"
    cfg = {
        "data": {"train_csv": str(data / "train.csv"), "val_csv": str(data / "val.csv"), "synthetic": True,
                 "synthetic_train_images": 8, "synthetic_val_images": 4},
        # ViT-S/14's architecture at 2 blocks of width 32: a 0.2 MB backbone, where the full one (86 MB) is
        # written, hashed, copied and read again by every run and tool of the suite.
        "model": {"vision_model": "vit_small_patch14_dinov2", "vision_kwargs": dict(TINY_VIT), "img_size": 28,
                  "hidden_dim": 32, "num_heads": 2, "question_layers": 1, "vision_lora_r": 4},
        "train": {"output_dir": str(tmp_path / "run"), "epochs": 2, "batch_size": 4, "progress": False,
                  "use_type_loss": True, **train},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args, timeout=240, check=True):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")  # not "module": worksteal interleaves modules, building it again on each return
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    result = cli("train.py", "--config", str(tiny_config(tmp)), "--vision_lora_alpha", "8")
    return tmp, result


def test_training_writes_every_artefact_and_reports(trained):
    tmp, result = trained
    run = tmp / "run"
    for name in ARTEFACTS:
        assert (run / name).is_file(), name
    assert "[LoRA] Trainable: " in result.stdout and "| Total: " in result.stdout
    assert "question type" in result.stdout and "overall" in result.stdout  # the final table
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert set(lines[-1]["per_type"]) <= {"count", "color", "location", "yes/no", "shape"}
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["vision_lora_alpha"] == 8.0  # the override
    adapter = load_file(str(run / "adapter_last.safetensors"))
    with safe_open(str(run / "adapter_last.safetensors"), framework="pt") as f:  # what timm needs to build the model
        assert (f.metadata()["model"], json.loads(f.metadata()["vision_kwargs"])) == ("vit_small_patch14_dinov2",
                                                                                     TINY_VIT)
    depth = TINY_VIT["depth"]
    assert all(".lora_" in k for k in adapter) and len(adapter) == 2 * depth  # each block's (A, B)
    import timm

    import lora
    encoder = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=28, **TINY_VIT)
    assert len(lora.load_adapter(encoder, run / "adapter_last.safetensors")) == depth  # named as in timm's model
    last = f"blocks.{depth - 1}.attn.qkv.lora_B"
    assert torch.equal(encoder.blocks[-1].attn.qkv.lora_B, adapter[last])
    assert (run / "adapter_last.safetensors").stat().st_size < 0.05 * (run / "backbone.safetensors").stat().st_size


def test_predict_and_evaluate_from_the_run(trained, monkeypatch, capsys):
    tmp, _ = trained
    run = tmp / "run"
    image = tmp / "data" / "images" / "val_00000.png"
    sys.path.insert(0, str(ROOT))
    import vqa.evaluate
    import vqa.predict

    # In-process: a `python -m` process spends seconds importing.
    assert vqa.predict.main(["--run", str(run), "--image", str(image), "--question", "How many circles are there?",
                             "--top_k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("question: How many circles are there?  (type head: ")  # the head's guess, named so
    probs = [float(l.split("%")[0]) for l in lines[1:]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 100.01
    assert vqa.evaluate.main(["--run", str(run), "--csv", str(tmp / "data" / "val.csv")]) == 0
    table = capsys.readouterr().out
    loaders, real = [], vqa.evaluate.make_loader

    def recording(*args, **kwargs):
        loaders.append(real(*args, **kwargs))
        return loaders[-1]

    monkeypatch.setattr(vqa.evaluate, "make_loader", recording)
    assert vqa.evaluate.main(["--run", str(run), "--csv", str(tmp / "data" / "val.csv"), "--num_workers", "2",
                              "--batch_size", "3"]) == 0
    assert [loader.num_workers for loader in loaders] == [2]
    assert capsys.readouterr().out == table  # loader processes and other batches change nothing counted
    best = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    overall = [l for l in table.splitlines() if l.startswith("overall")][0]
    assert overall.split()[-2] == f"{100 * max(json.loads(l)['accuracy'] for l in (run / 'metrics.jsonl').read_text().splitlines()):.2f}%"
    assert best["count"] == int(overall.split()[-1].replace(",", ""))


def test_evaluate_takes_the_csv_option_its_error_suggests(trained, tmp_path, capsys):
    import vqa.evaluate

    tmp, _ = trained
    rows = (tmp / "data" / "val.csv").read_text().splitlines()
    csv = tmp_path / "val.csv"  # elsewhere, naming the images by their absolute paths
    csv.write_text("\n".join([rows[0]] + [str(tmp / "data" / row) for row in rows[1:]]) + "\n")
    args = ["--run", str(tmp / "run"), "--csv", str(csv)]
    assert vqa.evaluate.main(args) == 2
    assert "pass --allow_outside_paths" in capsys.readouterr().err
    assert vqa.evaluate.main(args + ["--allow_outside_paths"]) == 0
    assert "overall" in capsys.readouterr().out


def test_predictions_of_a_csv_are_each_question_s_own_in_the_csv_s_order(trained, tmp_path, capsys):
    import csv

    import vqa.evaluate
    import vqa.predict
    from vqa.data import build_transform
    from vqa.predictions import ANSWER_COLUMNS, COLUMNS
    from vqa.run_files import load_run
    from vqa.text import normalize_answer

    tmp, _ = trained
    run, val = tmp / "run", tmp / "data" / "val.csv"
    rows = list(csv.DictReader(val.open()))
    # Without answers, the images' questions interleaved (the dataset groups them by image), some images named
    # another way, one question asked twice, a blank line: the file gives them back in this order, as written.
    asked = rows[1::2] + rows[::2] + rows[:1]
    shutil.copytree(val.parent / "images", tmp_path / "images")
    questions = tmp_path / "questions.csv"
    written = [("./" if i % 3 else "") + row["image"] for i, row in enumerate(asked)]
    lines = [f"\"{row['question']}\",{image}\n" for row, image in zip(asked, written)]
    questions.write_text("question,image\n" + "".join(lines[:3]) + "\n" + "".join(lines[3:]))
    out = tmp_path / "out" / "predictions.csv"
    args = ["--run", str(run), "--csv", str(questions), "--out", str(out), "--batch_size", "3"]
    assert vqa.predict.main(args) == 0
    assert f"wrote the {len(asked)} predictions (4 images) to {out}" in capsys.readouterr().out
    got = list(csv.DictReader(out.open()))
    assert list(got[0]) == list(COLUMNS)
    assert [(r["row"], r["image"], r["question"]) for r in got] == [
        (str(n), image, row["question"]) for n, (row, image) in enumerate(zip(asked, written), start=1)]
    model, tokenizer, answers, cfg = load_run(run)
    transform = build_transform(model.backbone, cfg.model.img_size)
    for row in got:  # each question alone gives the same answer and probability
        [(answer, p)] = vqa.predict.predict(model, tokenizer, answers, transform, tmp_path / row["image"],
                                            row["question"], top_k=1)[0]
        assert (row["prediction"], float(row["probability"])) == (answer, pytest.approx(p, abs=2e-4)), row
    assert len({r["probability"] for r in got}) > len(got) // 2  # apart enough to tell rows apart

    # Scored: answers spelt otherwise than the classes (" RED." is red) count as evaluation counts them. The first
    # row's answer is its prediction so spelt, the second's another class.
    by_question = {(r["image"].removeprefix("./"), r["question"]): r["prediction"] for r in got}
    predicted = [by_question[r["image"], r["question"]] for r in rows[:2]]
    other = next(a for a in answers.itos if a != predicted[1])
    respelt = [{**r, "answer": f" {answer.upper()}."} for r, answer in zip(rows, [predicted[0], other])] + rows[2:]
    scored_csv = tmp_path / "scored_in.csv"
    with scored_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(respelt)
    scored = tmp_path / "scored.csv"
    assert vqa.evaluate.main(["--run", str(run), "--csv", str(scored_csv), "--predictions", str(scored)]) == 0
    printed = capsys.readouterr().out
    table = list(csv.DictReader(scored.open()))
    assert list(table[0]) == list(ANSWER_COLUMNS)
    assert [r["answer"] for r in table] == [r["answer"].strip() for r in respelt]
    assert [r["correct"] for r in table] == [str(int(r["prediction"] == normalize_answer(r["answer"]))) for r in table]
    assert [r["correct"] for r in table[:2]] == ["1", "0"] and table[0]["answer"] != table[0]["prediction"]
    hits = sum(int(r["correct"]) for r in table)
    overall = [line for line in printed.splitlines() if line.startswith("overall")][0]
    assert overall.split()[-2] == f"{100 * hits / len(table):.2f}%"  # the file scores as the table does
    assert all(by_question[r["image"], r["question"]] == r["prediction"] for r in table)  # the two tools agree


def test_a_run_on_several_answers_a_question_learns_every_answer_and_scores_vqa_accuracy(trained, tmp_path, capsys):
    import csv

    import train
    import vqa.evaluate
    from vqa.text import normalize_answer

    tmp, _ = trained
    shutil.copytree(tmp / "data" / "images", tmp_path / "images")
    answered = {}
    for split in ("train", "val"):  # each question's answer from three people, another from one or two: for a
        rows = list(csv.DictReader((tmp / "data" / f"{split}.csv").open()))  # third, "zebra", never a true answer
        others = ["zebra", "no", "red"]
        answered[split] = [{"image": r["image"], "question": r["question"], "answers": "|".join(
            [r["answer"]] * 3 + [others[i % 3]] * (1 + i % 2))} for i, r in enumerate(rows)]
        with (tmp_path / f"{split}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "question", "answers"])
            writer.writeheader()
            writer.writerows(answered[split])
    run = tmp_path / "run"
    assert train.cli(["--config", str(tiny_config(tmp_path, epochs=1)), "--synthetic", "false", "--train_csv",
                      str(tmp_path / "train.csv"), "--val_csv", str(tmp_path / "val.csv")]) == 0
    assert "zebra" in json.loads((run / "answers.json").read_text())["answers"]  # every person's answer is a class
    scored = tmp_path / "scored.csv"
    assert vqa.evaluate.main(["--run", str(run), "--which", "last", "--csv", str(tmp_path / "val.csv"),
                              "--predictions", str(scored)]) == 0
    printed = capsys.readouterr().out
    table = list(csv.DictReader(scored.open()))
    assert [r["answer"] for r in table] == [r["answers"] for r in answered["val"]]
    credits = []
    for r in table:  # VQA v2's accuracy, each answer left out in turn
        given = [normalize_answer(a) for a in r["answer"].split("|")]
        left_out = [min(1, (given[:i] + given[i + 1:]).count(r["prediction"]) / 3) for i in range(len(given))]
        credits.append(sum(left_out) / len(given))
        assert float(r["correct"]) == pytest.approx(credits[-1], abs=1e-4), r
    assert {r["correct"] for r in table} - {"0", "1"}  # some are worth part of a question
    overall = [line for line in printed.splitlines() if line.startswith("overall")][0]
    assert overall.split()[-2] == f"{100 * sum(credits) / len(credits):.2f}%"
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"{100 * last['accuracy']:.2f}%" == overall.split()[-2]  # validation scores as evaluation does
    # A question none of whose answers the run knows is counted as such; one answer it does not know keeps a resume
    # from training on it.
    for split, answers in (("val", "giraffe|okapi"), ("train", "giraffe|" + answered["train"][0]["answers"])):
        with (tmp_path / f"new_{split}.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "question", "answers"])
            writer.writeheader()
            writer.writerows([{**answered[split][0], "answers": answers}] + answered[split][1:])
    assert vqa.evaluate.main(["--run", str(run), "--csv", str(tmp_path / "new_val.csv")]) == 0
    printed = capsys.readouterr().out
    assert (f"1 of {len(table)} question(s) ({100 / len(table):.1f}%) have no answer the run trained on, which "
            f"counts as wrong") in printed
    assert "1 question(s) have 2 or 3 answers, where VQA accuracy gives a prediction all of them share 1/3" in printed
    assert train.cli(["--resume", str(run), "--epochs", "2", "--train_csv", str(tmp_path / "new_train.csv")]) == 2
    assert "1 training answer(s) are not among the run's" in capsys.readouterr().err


def test_answers_given_under_min_answer_count_times_are_no_class_and_their_questions_sit_out(trained, tmp_path,
                                                                                            capsys):
    import csv
    from collections import Counter

    import train
    from vqa.text import normalize_answer

    tmp, _ = trained
    shutil.copytree(tmp / "data", tmp_path / "data")
    counts = Counter(normalize_answer(r["answer"]) for r in csv.DictReader((tmp_path / "data" / "train.csv").open()))
    least = sorted(set(counts.values()))[1]  # the rarest answers are left out, the others kept
    run = tmp_path / "run"
    args = ["--synthetic", "false", "--min_answer_count", str(least)]
    assert train.cli(["--config", str(tiny_config(tmp_path, epochs=1))] + args) == 0
    assert set(json.loads((run / "answers.json").read_text())["answers"]) == {a for a, n in counts.items() if n >= least}
    left_out = sum(n for n in counts.values() if n < least)
    assert (f"train_csv: {left_out} of {sum(counts.values())} questions have no answer given min_answer_count "
            f"({least}) times; they are left out of training") in capsys.readouterr().out
    assert train.cli(["--resume", str(run), "--epochs", "2"]) == 0  # the answers left out are no new classes
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert train.cli(["--config", str(tiny_config(tmp_path, epochs=1)), "--output_dir", str(tmp_path / "none"),
                      "--synthetic", "false", "--min_answer_count", "1000"]) == 2
    assert "no answer of train_csv is given min_answer_count (1000) times" in capsys.readouterr().err


def test_a_vqa2_split_converted_predicted_and_made_results_answers_each_question_as_predict_does(trained, tmp_path,
                                                                                                capsys):
    """The VQA v2 test-server path: vqa.vqa2 (no annotations), vqa.predict --csv, vqa.vqa2_results."""
    import csv

    import vqa.predict
    import vqa.vqa2
    import vqa.vqa2_results

    tmp, _ = trained
    rows = list(csv.DictReader((tmp / "data" / "val.csv").open()))
    images = tmp_path / "test2015"
    images.mkdir()
    ids = {}  # each synthetic image as a COCO one
    for row in rows:
        image_id = ids.setdefault(row["image"], 100 + len(ids))
        shutil.copy(tmp / "data" / row["image"], images / f"COCO_test2015_{image_id:012d}.jpg")
    questions = [{"image_id": ids[r["image"]], "question": r["question"], "question_id": 7000 + i}
                 for i, r in enumerate(rows)]
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "test-dev2015", "questions": questions}))
    assert vqa.vqa2.main(["--questions", str(tmp_path / "q.json"), "--images", str(images),
                          "--out", str(tmp_path / "test.csv")]) == 0
    assert vqa.predict.main(["--run", str(tmp / "run"), "--csv", str(tmp_path / "test.csv"),
                             "--out", str(tmp_path / "p.csv")]) == 0
    assert vqa.vqa2_results.main(["--questions", str(tmp_path / "q.json"), "--predictions", str(tmp_path / "p.csv"),
                                  "--out", str(tmp_path / "results.json")]) == 0
    capsys.readouterr()
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["question_id"] for r in results] == [q["question_id"] for q in questions]
    predicted = [r["prediction"] for r in csv.DictReader((tmp_path / "p.csv").open())]
    assert [r["answer"] for r in results] == predicted  # no question repeats another here: the CSV's order
    assert len(set(predicted)) > 1


def test_predictions_write_over_an_earlier_predictions_file_only(trained, tmp_path, capsys):
    import vqa.evaluate
    import vqa.predict

    tmp, _ = trained
    run, val = tmp / "run", tmp / "data" / "val.csv"
    before = val.read_bytes()
    (tmp_path / "a_file").write_text("")
    refused = [(val, "is the input CSV (--csv), which is not written over"), (tmp_path, "is a folder"),
               (tmp_path / "a_file" / "p.csv", f"cannot be written: '{tmp_path / 'a_file'}' is a file, not a folder")]
    for out, message in refused:
        assert vqa.predict.main(["--run", str(run), "--csv", str(val), "--out", str(out)]) == 2
        assert f"--out '{out}' {message}" in capsys.readouterr().err
        assert vqa.evaluate.main(["--run", str(run), "--csv", str(val), "--predictions", str(out)]) == 2
        assert f"--predictions '{out}' {message}" in capsys.readouterr().err
    other = tmp_path / "other.csv"
    other.write_bytes(before)
    assert vqa.predict.main(["--run", str(run), "--csv", str(val), "--out", str(other)]) == 2
    assert f"--out '{other}' exists and is not a predictions file" in capsys.readouterr().err
    assert val.read_bytes() == before == other.read_bytes()
    earlier = tmp_path / "p.csv"
    earlier.write_text("")  # an empty file (mktemp's) holds nothing to lose
    assert vqa.evaluate.main(["--run", str(run), "--csv", str(val), "--predictions", str(earlier)]) == 0
    saved = earlier.read_text()
    earlier.write_bytes(b"\xef\xbb\xbf" + saved.replace("\n", "\r\n").encode())  # as a spreadsheet saves it
    assert vqa.predict.main(["--run", str(run), "--csv", str(val), "--out", str(earlier)]) == 0  # the other kind
    assert earlier.read_text().startswith("row,image,question,question_type,prediction,probability\n")
    for wrong, message in [(["--csv", str(val)], "--csv and --out go together"),
                           (["--csv", str(val), "--out", str(earlier), "--question", "Is it?"], "--csv and --out go"),
                           (["--csv", str(val), "--out", str(earlier), "--top_k", "2"], "--top_k lists one question"),
                           (["--image", str(val), "--question", "Is it?", "--batch_size", "2"], "--batch_size is for"),
                           ([], "give --image and --question")]:
        with pytest.raises(SystemExit) as e:
            vqa.predict.main(["--run", str(run), *wrong])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_predict_gives_the_worded_type_where_the_run_trained_no_type_head(trained):
    from vqa.data import build_transform
    from vqa.predict import predict
    from vqa.run_files import load_run

    tmp, _ = trained
    model, tokenizer, answers, cfg = load_run(tmp / "run")
    transform = build_transform(model.backbone, cfg.model.img_size)
    image = tmp / "data" / "images" / "val_00000.png"
    for question, qtype in [("How many circles are there?", "count"), ("Is there a red square?", "yes/no"),
                            ("What shape is the blue object?", "shape")]:
        ranked, got = predict(model, tokenizer, answers, transform, image, question, type_head=False)
        assert got == qtype
        assert ranked == predict(model, tokenizer, answers, transform, image, question)[0]  # the answers are the same


def test_export_writes_the_encoder_that_timm_alone_loads(trained, tmp_path, capsys):
    import timm

    from vqa.export import main as export
    from vqa.run_files import load_run

    tmp, _ = trained
    out = tmp_path / "encoder.safetensors"
    assert export(["--run", str(tmp / "run"), "--out", str(out)]) == 0
    call = capsys.readouterr().out.splitlines()[-1].strip()
    assert call == (f"timm.create_model('vit_small_patch14_dinov2', num_classes=0, img_size=28, depth=2, "
                    f"embed_dim=32, num_heads=2, checkpoint_path={str(out.resolve())!r})")  # the run's vision_kwargs
    encoder = eval(call, {"timm": timm}).eval()  # the printed call, as a user would paste it
    model, *_ = load_run(tmp / "run")
    x, t = torch.randn(2, 3, 28, 28), torch.randn(5, model.backbone.embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), model.backbone(x), rtol=1e-5, atol=1e-5)
        for plain, adapted in zip(encoder.blocks, model.backbone.blocks):  # each block's adapter is in
            qkv = adapted.attn.qkv
            assert (qkv(t) - F.linear(t, qkv.weight, qkv.bias)).abs().max() > 1e-3  # a trained adapter
            torch.testing.assert_close(plain.attn.qkv(t), qkv(t), rtol=1e-5, atol=1e-6)
    with safe_open(str(out), framework="pt") as f:
        epochs = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        best = max(epochs, key=lambda m: m["accuracy"])  # the first of the best, as training keeps it
        assert f.metadata()["weights"] == "model_best.safetensors" and f.metadata()["epoch"] == str(best["epoch"])
        assert json.loads(f.metadata()["vision_kwargs"]) == TINY_VIT
    assert export(["--run", str(tmp / "run"), "--out", str(tmp_path / "encoder.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    backbone = (tmp / "run" / "backbone.safetensors").read_bytes()
    assert export(["--run", str(tmp / "run"), "--out", str(tmp / "run" / "backbone.safetensors")]) == 2
    assert "is a file of the run itself" in capsys.readouterr().err
    assert (tmp / "run" / "backbone.safetensors").read_bytes() == backbone


def test_the_checkpoint_a_run_started_from_may_move_but_not_change(trained, tmp_path, capsys):
    """The README's chain: export a run, start a new run from the file, export that one. Written over its own
    starting checkpoint, the new run's base weights would hold its adapters, added again on every load: export
    refuses, and resume and prediction refuse a starting file whose bytes changed, where a moved copy serves."""
    sys.path.insert(0, str(ROOT))
    import train
    from vqa.export import main as export
    from vqa.run_files import load_run

    tmp, _ = trained
    encoder = tmp_path / "encoder.safetensors"
    assert export(["--run", str(tmp / "run"), "--out", str(encoder)]) == 0
    second = tmp_path / "second"
    assert train.cli(["--config", str(tmp / "tiny.yaml"), "--output_dir", str(second), "--epochs", "1",
                      "--checkpoint_path", str(encoder)]) == 0
    before = encoder.read_bytes()
    capsys.readouterr()
    assert export(["--run", str(second), "--out", str(encoder)]) == 2
    assert "is the checkpoint this run started from (checkpoint_path)" in capsys.readouterr().err
    assert encoder.read_bytes() == before
    moved = tmp_path / "moved.safetensors"
    moved.write_bytes(before)
    other = tmp_path / "other.safetensors"  # the same model's weights, other values: it loads
    assert export(["--run", str(second), "--out", str(other)]) == 0
    encoder.write_bytes(other.read_bytes())
    changed = f"checkpoint_path '{encoder}' is not the file this run started from"
    with pytest.raises(train.VQAError, match=re.escape(changed)):
        load_run(second)
    capsys.readouterr()
    assert train.cli(["--resume", str(second), "--epochs", "2"]) == 2 and changed in capsys.readouterr().err
    assert train.cli(["--resume", str(second), "--checkpoint_path", str(moved), "--epochs", "2"]) == 0
    load_run(second)  # config.yaml now names the moved copy


def test_adapters_on_every_linear_layer_of_the_blocks_train_and_reach_the_adapter_file_and_the_export(tmp_path,
                                                                                                   capsys):
    """vision_lora_targets qkv,proj,fc1,fc2: every adapter gets gradients (each B leaves zero), the adapter file
    holds them all and fits timm's model alone, and the export, merged, computes what the run's model does."""
    import timm

    import lora
    import train
    from vqa.export import main as export
    from vqa.run_files import load_run

    cfg = tiny_config(tmp_path, epochs=1)
    assert train.cli(["--config", str(cfg), "--vision_lora_targets", "fc2, qkv,fc1,proj"]) == 0
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["vision_lora_targets"] == "qkv,proj,fc1,fc2"
    adapter = load_file(str(run / "adapter_last.safetensors"))
    layers = [f"blocks.{i}.{name}" for i in range(TINY_VIT["depth"])
              for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert sorted(adapter) == sorted(f"{layer}.{p}" for layer in layers for p in ("lora_A", "lora_B"))
    assert all(adapter[f"{layer}.lora_B"].abs().max() > 0 for layer in layers)  # every one trained
    assert adapter["blocks.0.attn.qkv.lora_A"].shape[0] == 3 * 4 and adapter["blocks.0.mlp.fc1.lora_A"].shape[0] == 4
    encoder = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=28, **TINY_VIT)
    model, *_ = load_run(run, which="last")
    # The run's base weights (its backbone.safetensors, random ones here), then its adapter file on them.
    encoder.load_state_dict(load_file(str(run / "backbone.safetensors")))
    assert sorted(lora.load_adapter(encoder, run / "adapter_last.safetensors")) == sorted(layers)
    out = tmp_path / "encoder.safetensors"
    assert export(["--run", str(run), "--which", "last", "--out", str(out)]) == 0
    plain = timm.create_model("vit_small_patch14_dinov2", num_classes=0, img_size=28, checkpoint_path=str(out),
                              **TINY_VIT).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = model.backbone.eval()(x)
        torch.testing.assert_close(encoder.eval()(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)
    capsys.readouterr()


def test_a_run_from_an_export_built_with_other_vision_kwargs_is_told_the_file_s(trained, tmp_path, capsys):
    """An exported encoder holds the shape its run's vision_kwargs built: a new run from it with other ones fails
    to load it, and the error names the file's, recorded in its metadata."""
    import train
    from vqa.export import main as export

    tmp, _ = trained
    encoder = tmp_path / "encoder.safetensors"
    assert export(["--run", str(tmp / "run"), "--out", str(encoder)]) == 0
    capsys.readouterr()
    new_run = ["--config", str(tmp / "tiny.yaml"), "--output_dir", str(tmp_path / "new"), "--epochs", "1",
               "--checkpoint_path", str(encoder)]
    assert train.cli([*new_run, "--vision_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2}"]) == 2
    err = capsys.readouterr().err
    told = (f"; the file is an export of a run whose image encoder was built with vision_kwargs {TINY_VIT}, this "
            f"run's are {{'depth': 1, 'embed_dim': 32, 'num_heads': 2}}: give the same "
            f"(--vision_kwargs \"{TINY_VIT}\")")
    assert told in err, err
    assert train.cli([*new_run, "--vision_kwargs", str(TINY_VIT)]) == 0  # the advice, as given, loads it


@pytest.mark.parametrize("layout", ["current", "before torchrun support"])
def test_resume_continues_a_finished_run_for_more_epochs(layout, trained, tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    import train

    tmp, _ = trained
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(tmp / "run"), str(run)], check=True)
    if layout != "current":  # older checkpoints hold one process's random state under "rng"
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        (state["rng"],) = state.pop("rng_per_process")
        torch.save(state, run / "checkpoint.pt")
    capsys.readouterr()
    assert train.cli(["--resume", str(run), "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "epoch 3:" in out and "epoch 1:" not in out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3  # the run's setting now


def test_more_epochs_on_a_finished_run_step_at_the_rates_of_the_longer_schedule(trained, tmp_path, monkeypatch):
    """The optimizer saved the old schedule's last rate, 0 at the end of a run; the first resumed step must not
    take it but the rate the recomputed schedule gives that step."""
    sys.path.insert(0, str(ROOT))
    import train
    from vqa.config import load_config

    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained[0] / "run"), str(run)], check=True)
    done = torch.load(run / "checkpoint.pt", weights_only=True)["step"]  # 2 epochs
    rates, make_optimizer = [], train.make_optimizer

    def recording(model, cfg):
        optimizer = make_optimizer(model, cfg)
        # Each group's rate at each step, and the base rate the scheduler scales (set by LambdaLR).
        optimizer.register_step_pre_hook(
            lambda opt, *_: rates.append([(g["lr"], g["initial_lr"]) for g in opt.param_groups]))
        return optimizer

    monkeypatch.setattr(train, "make_optimizer", recording)
    assert train.cli(["--resume", str(run), "--epochs", "3"]) == 0
    factor = train.warmup_cosine(done // 2 * 3, load_config(run / "config.yaml").train.warmup_ratio)
    assert len(rates) == done // 2 and factor(done) > 0
    for i, groups in enumerate(rates):
        assert [lr for lr, _ in groups] == pytest.approx([base * factor(done + i) for _, base in groups], rel=1e-12)


def test_early_stopping_ends_a_run_whose_accuracy_has_not_risen_for_patience_epochs(tmp_path, monkeypatch, capsys):
    """Validation accuracy 0.5, 0.6, 0.6 (a tie is no rise), 0.55: with a patience of 2 the run ends after
    epoch 4 of 6, its best weights epoch 2's. A resume with that patience has nothing to train, also from a
    checkpoint written before the best epoch was kept (it is read from the metrics); a larger patience trains on."""
    sys.path.insert(0, str(ROOT))
    import train

    accuracies, evaluate = iter([0.5, 0.6, 0.6, 0.55, 0.9, 0.9]), train.evaluate

    def scripted(*args, **kwargs):
        return {**evaluate(*args, **kwargs), "accuracy": next(accuracies)}

    monkeypatch.setattr(train, "evaluate", scripted)
    config = tiny_config(tmp_path, epochs=6, early_stopping_patience=2, use_type_loss=False)
    run = tmp_path / "run"
    assert train.cli(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "epoch 4:" in out and "epoch 5:" not in out
    assert "not risen above epoch 2's 60.00% in 2 epochs (early_stopping_patience 2)" in out
    assert "validation accuracy of epoch 4 (the last; model_best holds epoch 2's, 60.00%):" in out
    assert [r["accuracy"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [
        0.5, 0.6, 0.6, 0.55]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["best"], state["best_epoch"]) == (4, 0, 0.6, 2)
    assert file_metadata(run / "model_best.safetensors")["epoch"] == "2"

    before = run_bytes(run)
    assert train.cli(["--resume", str(run)]) == 0
    assert ("validation accuracy has not risen above epoch 2's in the 2 epochs since (early_stopping_patience 2), so "
            "there is nothing to train") in capsys.readouterr().out and run_bytes(run) == before
    del state["best_epoch"]  # as a checkpoint from before 2026-11-29
    torch.save(state, run / "checkpoint.pt")
    before = run_bytes(run)
    assert train.cli(["--resume", str(run)]) == 0
    assert "N > 2, or 0" in capsys.readouterr().out and run_bytes(run) == before

    assert train.cli(["--resume", str(run), "--early_stopping_patience", "3"]) == 0
    assert "epoch 6:" in capsys.readouterr().out  # 0.9 at epoch 5, then a tie: 1 epoch without a rise
    assert torch.load(run / "checkpoint.pt", weights_only=True)["best_epoch"] == 5
    assert file_metadata(run / "model_best.safetensors")["epoch"] == "5"


@pytest.mark.parametrize("killed", ["before its random backbone was written", "during epoch 1",
                                    "between epoch 1's metrics and weights", "between epoch 1's weights and its checkpoint"])
def test_a_run_stopped_before_its_first_checkpoint_is_started_again_as_its_errors_say(killed, trained, tmp_path,
                                                                                     capsys):
    """Killed before its first checkpoint, a run folder has nothing to resume: resume, and prediction,
    evaluation and export where no weights were written either, say so and give a command (quoted for the
    shell: this folder's name has a space) that starts it again, with --overwrite where weights were written."""
    sys.path.insert(0, str(ROOT))
    import train
    import vqa.evaluate
    import vqa.export
    import vqa.predict

    run = tmp_path / "my run"
    subprocess.run(["cp", "-r", str(trained[0] / "run"), str(run)], check=True)
    written = ["config.yaml", "tokenizer.json", "answers.json", "backbone.safetensors", "metrics.jsonl",
               "model_best.safetensors", "model_last.safetensors", "adapter_best.safetensors", "adapter_last.safetensors"]
    kept = written[:{"before its random backbone was written": 3, "during epoch 1": 4,
                     "between epoch 1's metrics and weights": 5}.get(killed, len(written))]
    for name in set(ARTEFACTS) - set(kept):
        (run / name).unlink()
    assert train.cli(["--resume", str(run)]) == 2
    advice = capsys.readouterr().err.split("start it again with ")[1].splitlines()[0]
    command = shlex.split(advice.split(" (which replaces")[0])
    assert command[:2] == ["python", "train.py"] and ("--overwrite" in command) == ("metrics.jsonl" in kept)
    assert (" (which replaces the weights it wrote)" in advice) == ("--overwrite" in command)
    if "model_last.safetensors" not in kept:
        image = next((trained[0] / "data" / "images").iterdir())
        for tool, args in [(vqa.predict, ["--image", str(image), "--question", "Is it red?"]),
                           (vqa.evaluate, ["--csv", str(trained[0] / "data" / "val.csv")]),
                           (vqa.export, ["--out", str(tmp_path / "encoder.safetensors")])]:
            assert tool.main(["--run", str(run), *args]) == 2
            assert f"start it again with {shlex.join(['python', 'train.py', *command[2:]])}" in capsys.readouterr().err
    assert train.cli([*command[2:], "--epochs", "1"]) == 0 and (run / "checkpoint.pt").is_file()


def test_a_run_checkpointed_inside_its_first_epoch_is_to_be_resumed_for_weights(trained, tmp_path, capsys):
    """With checkpoint_every, a run may hold a checkpoint before the first epoch's weights: predict says to
    resume it, in a command the shell takes as it is."""
    import vqa.predict

    run = tmp_path / "my run"
    subprocess.run(["cp", "-r", str(trained[0] / "run"), str(run)], check=True)
    for name in ("model_best.safetensors", "model_last.safetensors", "adapter_best.safetensors",
                 "adapter_last.safetensors", "metrics.jsonl"):  # what the end of an epoch writes
        (run / name).unlink()
    image = next((trained[0] / "data" / "images").iterdir())
    assert vqa.predict.main(["--run", str(run), "--image", str(image), "--question", "Is it red?"]) == 2
    assert f"continue the run with python train.py --resume '{run}'" in capsys.readouterr().err


def test_a_pretrained_run_may_resume_from_a_local_copy_of_its_weights(trained, tmp_path):
    """Offline, the hub's weights cannot be fetched and the error says to give checkpoint_path: resume takes it."""
    sys.path.insert(0, str(ROOT))
    import train

    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained[0] / "run"), str(run)], check=True)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["pretrained"] = True  # as if from the hub; its weights are those the run saved
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert train.cli(["--resume", str(run), "--checkpoint_path", str(run / "backbone.safetensors"), "--epochs", "3"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_epochs_cannot_end_a_run_inside_an_epoch_it_has_begun(trained, tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    import train

    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained[0] / "run"), str(run)], check=True)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state.update(epoch=1, batch=1)  # stopped after the first batch of epoch 2
    torch.save(state, run / "checkpoint.pt")
    assert train.cli(["--resume", str(run), "--epochs", "1"]) == 2
    said = capsys.readouterr()
    assert "has trained 1 epoch and 1 batch(es) of epoch 2 already; --epochs cannot be fewer than 2" in said.err
    assert "[LoRA]" not in said.out  # said before the model is built


def test_resuming_a_finished_run_says_so_and_trains_nothing(trained, tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    import train

    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained[0] / "run"), str(run)], check=True)
    before = (run / "checkpoint.pt").read_bytes()
    assert train.cli(["--resume", str(run)]) == 0
    assert "has finished its 2 epochs, so there is nothing to train; to train longer, add --epochs N" in capsys.readouterr().out
    assert (run / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--resume", "RUN", "--hidden_dim", "64"], "--resume cannot change 'hidden_dim' (32 in "),
    (["--resume", "RUN", "--lr", "0.5"], "--resume cannot change 'lr' (0.001 in "),  # the optimizer state's lr would win
    (["--resume", "RUN", "--epochs", "1"], "has trained 2 epochs already; --epochs cannot be fewer"),
    (["--resume", "RUN", "--config", "CONFIG"], "--config cannot be given with it"),
    (["--resume", "TMP"], "is not a run folder (it has no config.yaml)"),
    (["--resume", "RUN", "--output_dir", "TMP"], "--output_dir cannot be given with it"),  # was silently ignored
    (["--resume", "RUN", "--train.output-dir=elsewhere"], "--output_dir cannot be given with it"),
    (["--config", "CONFIG", "--output_dir", "CONFIG"], "is a file, not a folder"),
    # A randomly initialised run keeps its base weights in backbone.safetensors: another file would replace them.
    (["--resume", "RUN", "--checkpoint_path", "RUN/backbone.safetensors", "--epochs", "3"],
     "--resume may move the run's checkpoint_path, not add it (None in "),
])
def test_resume_and_output_dir_mistakes_are_clear_errors(trained, tmp_path, capsys, args, message):
    sys.path.insert(0, str(ROOT))
    import train

    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained[0] / "run"), str(run)], check=True)
    before = run_bytes(run)
    paths = {"RUN": str(run), "CONFIG": str(trained[0] / "tiny.yaml"), "TMP": str(tmp_path)}
    try:
        code = train.cli([paths.get(a, a).replace("RUN/", f"{run}/") for a in args])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
    assert run_bytes(run) == before


def copied_run(trained, tmp_path) -> Path:
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained[0] / "run"), str(run)], check=True)
    return run


def test_resume_refuses_training_answers_the_run_has_no_class_for(trained, tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    import train

    run = copied_run(trained, tmp_path)
    data = trained[0] / "data"
    lines = (data / "train.csv").read_text().splitlines()
    new_csv = data / "train_new_answers.csv"  # beside the images its rows name
    new_csv.write_text("\n".join(lines[:3] + [line.rsplit(",", 2)[0] + ",purple elephant,other" for line in lines[3:]]))
    before = run_bytes(run)
    assert train.cli(["--resume", str(run), "--train_csv", str(new_csv), "--epochs", "3"]) == 2
    err = capsys.readouterr().err  # before: every such target ignored, and a batch of only those a nan loss
    assert "1 training answer(s) are not among the run's" in err and "'purple elephant'" in err
    assert run_bytes(run) == before


@pytest.mark.parametrize("csv", ["4 of the 8 images", "a moved copy", "4 of 8, a checkpoint from before the record"])
def test_resume_trains_on_as_many_images_as_the_run_did(csv, trained, tmp_path, capsys):
    """train_csv may move, not change the image count: the schedule (its length in steps) and the saved position
    in the epoch's shuffled batches count the images. With half of them, the third epoch ran at rate 0."""
    import train

    run = copied_run(trained, tmp_path)
    data = tmp_path / "moved data"
    subprocess.run(["cp", "-r", str(trained[0] / "data"), str(data)], check=True)
    header, *rows = (data / "train.csv").read_text().splitlines()
    images = sorted({row.split(",")[0] for row in rows})
    assert len(images) == 8 == torch.load(run / "checkpoint.pt", weights_only=True)["train_images"]
    new_csv = data / "renamed.csv"
    kept = rows if csv == "a moved copy" else [row for row in rows if row.split(",")[0] in images[:4]]
    new_csv.write_text("\n".join([header, *kept]) + "\n")
    if "before the record" in csv:  # older runs have nothing to compare: not checked, as before
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        del state["train_images"]
        torch.save(state, run / "checkpoint.pt")
    (run / "encoder.safetensors").write_bytes(b"exported by an earlier refusal's advice")
    before = run_bytes(run)
    code = train.cli(["--resume", str(run), "--epochs", "3", "--train_csv", str(new_csv),
                      "--val_csv", str(data / "val.csv")])
    err = capsys.readouterr().err
    if csv == "4 of the 8 images":
        assert code == 2 and run_bytes(run) == before
        assert f"--out {shlex.quote(str(run / 'encoder-2.safetensors'))}" in err  # not the file there
        assert (f"train_csv '{new_csv}' holds 4 training image(s), but the run trained on 8 ({run / 'checkpoint.pt'}): "
                f"resume continues training on the same data, which may have moved or been renamed") in err
        assert "To train on other data, start a new run, e.g. from this one's encoder: python -m vqa.export" in err
        assert "--checkpoint_path" in err and "NEW_RUN" in err
        # The new run's command keeps where this resume said the data is: pasted, it finds the moved val.csv.
        assert f"--val_csv {shlex.quote(str(data / 'val.csv'))}" in err
    else:
        assert code == 0, err
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
        assert torch.load(run / "checkpoint.pt", weights_only=True)["train_images"] == len(
            {row.split(",")[0] for row in kept})


@pytest.mark.parametrize("run_data", ["generated", "its own"])
def test_a_resume_refuses_to_generate_a_synthetic_set_it_did_not_train_on_before_writing_it(trained, tmp_path, capsys,
                                                                                             run_data):
    import train

    run = copied_run(trained, tmp_path)
    if run_data == "its own":
        saved = yaml.safe_load((run / "config.yaml").read_text())
        saved["data"]["synthetic"] = False
        (run / "config.yaml").write_text(yaml.safe_dump(saved))
    gen = tmp_path / "gen"
    code = train.cli(["--resume", str(run), "--epochs", "3", "--train_csv", str(gen / "train.csv"), "--val_csv",
                      str(gen / "val.csv"), "--synthetic", "true", "--synthetic_train_images", "6"])
    assert code == 2 and not gen.exists()  # refused before a data set it could not use was written
    expected = {"generated": "with 6 training images (synthetic_train_images), but the run trained on 8; give "
                             "--synthetic_train_images 8 to generate its data set again",
                "its own": "but the run did not train on one (synthetic is off in its config.yaml); point "
                           "--train_csv and --val_csv at the data it trained on"}[run_data]
    assert expected in capsys.readouterr().err


def test_an_unreadable_starting_file_is_an_error_of_ours(tmp_path):
    from vqa.errors import VQAError
    from vqa.run_files import file_sha256

    with pytest.raises(VQAError, match=r"cannot read checkpoint_path '.*' \(Is a directory\); check the path"):
        file_sha256(tmp_path)


@pytest.mark.parametrize("damage, message", [
    ("backbone.safetensors", "backbone.safetensors' is missing: the run's backbone was randomly initialised"),
    ("tokenizer.json", "has a missing or damaged tokenizer.json"),
    ("answers.json", "has a missing or damaged answers.json"),
])
def test_a_run_missing_or_damaging_a_file_it_needs_is_refused_by_resume_and_predict(trained, tmp_path, capsys, damage,
                                                                                   message):
    sys.path.insert(0, str(ROOT))
    import train
    import vqa.predict

    run = copied_run(trained, tmp_path)
    if damage == "backbone.safetensors":  # before: a fresh random backbone, a different answer every call
        (run / damage).unlink()
    else:
        (run / damage).write_text("[1]")
    image = trained[0] / "data" / "images" / "val_00000.png"
    assert vqa.predict.main(["--run", str(run), "--image", str(image), "--question", "How many?"]) == 2
    assert message in capsys.readouterr().err
    assert train.cli(["--resume", str(run), "--epochs", "3"]) == 2
    assert message in capsys.readouterr().err


def test_an_epoch_logged_before_a_crash_is_logged_once_after_the_resume(trained, tmp_path):
    sys.path.insert(0, str(ROOT))
    import train

    run = copied_run(trained, tmp_path)
    history = run / "metrics.jsonl"
    # Killed between writing epoch 3's metrics and its checkpoint: the checkpoint is still at epoch 2.
    third = {**json.loads(history.read_text().splitlines()[-1]), "epoch": 3}
    history.write_text(history.read_text() + json.dumps(third) + "\n")
    assert train.cli(["--resume", str(run), "--epochs", "3"]) == 0
    assert [json.loads(line)["epoch"] for line in history.read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("damage, line", [
    (lambda lines: lines[:-1] + [lines[-1][:20]], 2),
    (lambda lines: ["[1]"] + lines[1:], 1),
    (lambda lines: [lines[0].replace('"epoch": 1', '"epoch": "1"')] + lines[1:], 1),
], ids=["cut short", "not a record", "epoch a string"])
def test_a_damaged_metrics_file_stops_a_resume_before_it_trains(trained, tmp_path, capsys, monkeypatch, damage, line):
    """Named by file and line at the start, where it was read only after an epoch's training, and crashed there."""
    sys.path.insert(0, str(ROOT))
    import train

    run = copied_run(trained, tmp_path)
    history = run / "metrics.jsonl"
    history.write_text("\n".join(damage(history.read_text().splitlines())) + "\n")
    checkpoint = (run / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    assert train.cli(["--resume", str(run), "--epochs", "3"]) == 2
    assert f"{history}, line {line}: " in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == checkpoint


def test_blank_lines_in_the_metrics_file_are_skipped_and_the_epochs_kept(trained, tmp_path):
    sys.path.insert(0, str(ROOT))
    import train

    run = copied_run(trained, tmp_path)
    history = run / "metrics.jsonl"
    before = history.read_text().splitlines()
    history.write_text("\n".join(before) + "\n\n")  # an editor's empty last line
    assert train.cli(["--resume", str(run), "--epochs", "3"]) == 0
    assert history.read_text().splitlines()[:2] == before


def test_the_metrics_file_is_one_record_per_line_none_where_missing_and_lines_of_spaces_are_blank(tmp_path):
    from vqa.run_files import read_history

    history = tmp_path / "metrics.jsonl"
    assert read_history(history) == []  # a run stopped before its first validation has none
    history.write_text('{"epoch": 1, "accuracy": 0.5}\n  \t\n{"epoch": 2, "accuracy": 0.6}\n')
    assert read_history(history) == [{"epoch": 1, "accuracy": 0.5}, {"epoch": 2, "accuracy": 0.6}]


@pytest.mark.parametrize("line", [
    '{"epoch": true, "accuracy": 0.5}',
    "[" * 100_000,  # json.loads raises RecursionError, not ValueError
    '{"epoch": 1, "accuracy": 0.5, "note": "' + "x" * 200,
], ids=["epoch a boolean", "nested too deep", "a long line cut short"])
def test_a_metrics_line_that_is_not_a_record_is_named_by_line_and_shown_shortened(tmp_path, line):
    from vqa.errors import VQAError
    from vqa.run_files import read_history

    history = tmp_path / "metrics.jsonl"
    history.write_text('{"epoch": 1, "accuracy": 0.5}\n' + line + "\n")
    with pytest.raises(VQAError) as e:
        read_history(history)
    assert str(e.value).startswith(f"{history}, line 2: {line[:60]!r} is not an epoch's metrics")


def test_a_metrics_file_that_is_not_utf8_or_cannot_be_read_is_a_clear_error(tmp_path, monkeypatch):
    import errno

    from vqa.errors import VQAError
    from vqa.run_files import read_history

    history = tmp_path / "metrics.jsonl"
    history.write_bytes(b'{"epoch": 1, "answer": "caf\xe9"}\n')  # Latin-1, as an editor might save it
    with pytest.raises(VQAError, match=re.escape(f"'{history}' is not UTF-8 text")):
        read_history(history)

    def denied(self, *args, **kwargs):  # chmod would not stop root
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(VQAError, match=re.escape(f"cannot read metrics file '{history}' (Permission denied)")):
        read_history(history)


def test_a_metrics_path_that_is_a_folder_is_refused_before_training(tmp_path):
    from vqa.errors import VQAError
    from vqa.run_files import read_history

    history = tmp_path / "metrics.jsonl"
    history.mkdir()
    with pytest.raises(VQAError, match=re.escape(f"'{history}' is not a file, and train.py writes each epoch's")):
        read_history(history)


@pytest.mark.parametrize("content, message", [
    ('{"zebra": 2.0}', r"w\.json' weighs none of the run's \d+ answers \(it has e\.g\. 'zebra'"),  # another set's
    (None, r"w\.json"),  # no such file
])
def test_answer_weights_that_fit_none_of_the_answers_are_refused_before_the_model_is_built(tmp_path, monkeypatch,
                                                                                            content, message):
    """Every weight would silently be 1; and the file is read before the model is built (a pretrained backbone's
    download or load), so a bad one costs no time."""
    sys.path.insert(0, str(ROOT))
    import train
    from vqa.config import load_config

    weights = tmp_path / "w.json"
    if content is not None:
        weights.write_text(content)
    cfg = load_config(tiny_config(tmp_path), ["--answer_weights", str(weights)])
    monkeypatch.setattr(train, "build_model", lambda *args, **kwargs: pytest.fail("the model was built first"))
    with pytest.raises(train.VQAError, match=message):
        train.main(cfg)


def test_an_error_before_training_still_leaves_the_process_group(tmp_path, monkeypatch):
    """Under torchrun, a bad setting found before training must not leave the process group behind (NCCL would
    warn about it under the error, in every process)."""
    sys.path.insert(0, str(ROOT))
    import torch.distributed as dist
    import train
    from vqa.config import load_config

    def setup(device):  # a one-process gloo group, as torchrun's processes hold one after distributed.setup
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
        return train.distributed.Processes(0, 2), device

    monkeypatch.setattr(train.distributed, "setup", setup)
    (tmp_path / "run").write_text("")  # output_dir is a file: an error before any collective
    try:
        with pytest.raises(train.VQAError, match="is a file, not a folder"):
            train.main(load_config(tiny_config(tmp_path)))
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_bytes(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir())}


def test_a_new_run_refuses_a_folder_holding_a_run(trained, capsys):
    """Running the same command twice must not start wiping the first run's checkpoint and weights."""
    sys.path.insert(0, str(ROOT))
    import train

    tmp, _ = trained
    before = run_bytes(tmp / "run")
    assert train.cli(["--config", str(tmp / "tiny.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp / 'run'} holds a run already (checkpoint.pt, metrics.jsonl" in err
    assert f"--resume {tmp / 'run'}" in err and "--overwrite" in err and "--output_dir" in err
    assert run_bytes(tmp / "run") == before


def test_overwrite_replaces_the_run_only_once_the_data_is_good(trained, tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    import train

    tmp, _ = trained
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(tmp / "run"), str(run)], check=True)
    (run / "notes.txt").write_text("mine")
    before = run_bytes(run)
    config = ["--config", str(tmp / "tiny.yaml"), "--output_dir", str(run), "--overwrite"]
    for mistake, message in [(["--train_csv", str(tmp_path / "missing.csv")], "missing.csv"),
                             (["--vision_model", "vit_tiny_dinov5"], "unknown timm model"),
                             (["--unfreeze_encoder_layers", "13"], "unfreeze_encoder_layers"),
                             (["--answer_weights", str(tmp_path / "missing.json")], "missing.json")]:
        assert train.cli([*config, *mistake]) == 2
        assert message in capsys.readouterr().err
        assert run_bytes(run) == before, mistake  # a mistake, in the data or a setting, deletes nothing
    assert train.cli([*config, "--epochs", "1", "--use_vision_lora", "false"]) == 0
    out = capsys.readouterr().out
    assert "note: replacing the run in" in out and "[no LoRA] Trainable: " in out and "[LoRA]" not in out
    assert [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (run / "adapter_last.safetensors").exists()  # the old run's adapters, not left beside the new model
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are deleted
    with pytest.raises(SystemExit) as usage:  # argparse's usage error: resume and start over are exclusive
        train.cli(["--resume", str(run), "--overwrite"])
    assert usage.value.code == 2 and "--overwrite: not allowed with argument --resume" in capsys.readouterr().err


def test_a_new_run_keeps_nothing_of_a_run_that_never_checkpointed(trained, tmp_path):
    """A run killed before its first checkpoint leaves only its vocabularies, random backbone and step log: nothing
    trained, so a new run may start there, but predict would load that stale backbone if it stayed."""
    sys.path.insert(0, str(ROOT))
    import train

    tmp, _ = trained
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "tokenizer.json", "answers.json", "backbone.safetensors"):
        (run / name).write_bytes((tmp / "run" / name).read_bytes())
    (run / "steps.jsonl").write_text('{"step": 50, "epoch": 1, "loss": 2.5, "lr": 0.001, "lr_encoder": 0.001}\n')
    (tmp_path / "given.safetensors").write_bytes((run / "backbone.safetensors").read_bytes())  # one's own backbone
    assert train.cli(["--config", str(tmp / "tiny.yaml"), "--output_dir", str(run), "--epochs", "1",
                      "--checkpoint_path", str(tmp_path / "given.safetensors")]) == 0
    assert (run / "checkpoint.pt").is_file() and not (run / "backbone.safetensors").exists()
    assert not (run / "steps.jsonl").exists()  # the old run's 50 steps; this one logged none of its 2


def test_a_new_run_keeps_its_own_input_found_in_its_folder(trained, tmp_path):
    """A backbone file given as checkpoint_path may sit where the run writes: it is an input, not a leftover."""
    sys.path.insert(0, str(ROOT))
    import train
    from vqa.run_files import load_run

    tmp, _ = trained
    run = tmp_path / "run"
    run.mkdir()
    given = (tmp / "run" / "backbone.safetensors").read_bytes()
    (run / "backbone.safetensors").write_bytes(given)
    assert train.cli(["--config", str(tmp / "tiny.yaml"), "--output_dir", str(run), "--epochs", "1",
                      "--checkpoint_path", str(run / "backbone.safetensors")]) == 0
    assert (run / "backbone.safetensors").read_bytes() == given
    load_run(run)  # prediction finds the backbone the run was built from


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus", "1"], "unknown config key '--bogus'"),
        (["--vision_lora_r", "0"], "'vision_lora_r' must be > 0"),
        (["--img_size", "30"], "img_size=30 is not divisible"),
        (["--vision_model", "vit_tiny_dinov5"], "unknown timm model 'vit_tiny_dinov5'"),
        (["--checkpoint_path", "/nonexistent/ckpt.pth"], "does not exist"),
        (["--unfreeze_encoder_layers", "13"], "unfreeze_encoder_layers"),
        (["--vision_kwargs", "{drop_path: 0.1}"], "error: timm cannot build 'vit_small_patch14_dinov2' with "
                                                  "drop_path=0.1: TypeError"),
        (["--vision_kwargs", "{img_size: 56}"], "'vision_kwargs' may not set 'img_size'"),
    ],
)
def test_user_mistakes_exit_2_with_a_message(tmp_path, args, message, capsys):
    sys.path.insert(0, str(ROOT))
    import train

    assert train.cli(["--config", str(tiny_config(tmp_path)), *args]) == 2  # in this process: no exception escaped
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("train_csv, message", [("trian.csv", "can only be written as DIR/train.csv"),
                                                 ("train.csv", "would overwrite it")])
def test_synthetic_data_never_lands_on_ones_own_files(tmp_path, train_csv, message, capsys):
    """The demo config generates its data where train_csv points when that file is missing; a mistyped path
    to one's own data must not fill that folder with shapes, over one's val.csv."""
    sys.path.insert(0, str(ROOT))
    import train

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "val.csv").write_text("mine")
    if train_csv != "train.csv":
        (mine / "train.csv").write_text("mine too")
    before = run_bytes(mine)
    assert train.cli(["--config", str(tiny_config(tmp_path)), "--train_csv", str(mine / train_csv),
                      "--val_csv", str(mine / "val.csv")]) == 2
    assert "config key 'synthetic' is on" in (err := capsys.readouterr().err) and message in err
    assert run_bytes(mine) == before


def test_a_user_mistake_ends_the_process_with_2_and_no_traceback(tmp_path):
    result = cli("train.py", "--config", str(tiny_config(tmp_path)), "--vision_model", "vit_tiny_dinov5", check=False)
    assert result.returncode == 2
    assert "unknown timm model 'vit_tiny_dinov5'" in result.stderr and "Traceback" not in result.stderr


def read_adapter(path):
    return {k: v for k, v in load_file(str(path)).items()}


# train.py's command line in a process that stops for good after its ``argv[1]``-th checkpoint, so that the test
# kills it at a known step however busy the machine is (a test polling the run's checkpoint could miss the step).
STOP_AFTER_CHECKPOINTS = """
import sys, time
import train

save, saves = train.save_checkpoint, []

def save_then_wait(*args, **kwargs):
    save(*args, **kwargs)
    saves.append(1)
    if len(saves) == int(sys.argv[1]):
        print("saved", flush=True)
        time.sleep(300)  # where the test kills it

train.save_checkpoint = save_then_wait
sys.exit(train.cli(sys.argv[2:]))
"""


@pytest.mark.parametrize("checkpoints, position, accumulate", [(6, (1, 1, 5), 1), (5, (1, 0, 4), 1),
                                                                (4, (0, 4, 4), 1), (4, (1, 2, 3), 2)])
def test_killed_run_resumes_to_the_same_weights(tmp_path, checkpoints, position, accumulate):
    """SIGKILL mid-epoch (or at an epoch's end, or after its last step and before its validation), resume, and
    land on the weights and the logged losses of a run that was never interrupted. Also with 2 batches a step."""
    sys.path.insert(0, str(ROOT))
    import train

    options = dict(checkpoint_every=1, epochs=3, batch_size=2, grad_accum_steps=accumulate)
    killed = tiny_config(tmp_path / "b", **options)
    run = tmp_path / "b" / "run"
    # 4 steps an epoch, each checkpointed, then the epoch's own: the 6th is epoch 2's first step, of 3 epochs. With
    # 2 batches a step, 2 steps an epoch: the 4th is epoch 2's first step, at its second batch.
    proc = subprocess.Popen([sys.executable, "-c", STOP_AFTER_CHECKPOINTS, str(checkpoints), "--config", str(killed)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # up to the line it prints as it stops, or to its end
            lines.append(line)
            if line == "saved\n":
                break
    finally:
        proc.kill()  # SIGKILL
        proc.communicate()
    assert lines[-1:] == ["saved\n"], "".join(lines)[-3000:]
    before = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (before["epoch"], before["batch"], before["step"]) == position
    # The resume and the uninterrupted run, in this process (a process of its own spends seconds on imports).
    assert train.cli(["--resume", str(run)]) == 0
    assert train.cli(["--config", str(tiny_config(tmp_path / "a", **options))]) == 0
    a = read_adapter(tmp_path / "a" / "run" / "adapter_last.safetensors")
    b = read_adapter(run / "adapter_last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    head_a = load_file(str(tmp_path / "a" / "run" / "model_last.safetensors"))
    head_b = load_file(str(run / "model_last.safetensors"))
    for key in head_a:
        torch.testing.assert_close(head_b[key], head_a[key], rtol=0, atol=1e-6)
    # The epoch the kill cut logs the loss of all its steps, those before the resume too, and the next epoch its own.
    logged = [[json.loads(line)["train_loss"] for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
              for folder in (tmp_path / "a", tmp_path / "b")]
    assert logged[1] == pytest.approx(logged[0], rel=1e-6, abs=0) and len(logged[0]) == 3


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    """In a process of its own, and with SIGTERM coming twice (a cluster scheduler signals every process and
    torchrun passes its own on): only a Ctrl-C after the first signal means "stop now". (One signal: the
    in-process tests below, and the torchrun tests.)"""
    config = tiny_config(tmp_path, epochs=50, batch_size=2)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.05)
    for _ in range(2):
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)  # separate deliveries: pending signals of one kind merge into one
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM: checkpoint saved" in out and "--resume" in out and "Traceback" not in err
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] >= 4  # at least the first epoch's 4 steps


def nan_after(loss_fn, calls: int):
    """``loss_fn``, returning NaN from its ``calls + 1``-th call in training on (validation's, under no_grad, are left
    as they are and not counted)."""
    made = []

    def poisoned(*args, **kwargs):
        loss = loss_fn(*args, **kwargs)
        if not torch.is_grad_enabled():
            return loss
        made.append(1)
        return loss * float("nan") if len(made) > calls else loss

    return poisoned


def test_a_nonfinite_loss_before_any_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    import train
    from vqa.config import load_config

    cfg = load_config(tiny_config(tmp_path, epochs=1))
    monkeypatch.setattr(train.F, "cross_entropy", nan_after(train.F.cross_entropy, 0))
    with pytest.raises(train.VQAError, match=r"loss is nan at epoch 1, step 1; stopped without saving, so no "
                                             r"checkpoint had been written yet"):
        train.main(cfg)
    assert not (Path(cfg.train.output_dir) / "checkpoint.pt").exists()


def test_a_nonfinite_loss_in_fp16_names_the_precisions_to_go_on_with(tmp_path, monkeypatch):
    """fp16 overflows above 65,504, so a loss that turns non-finite under it may be fp16's doing, not the rate's:
    after a checkpoint the advice is to resume in another precision, before one to start again in it."""
    import train
    from vqa.config import load_config

    for precision, calls in (("fp16", 2 * 2), ("fp32", 2 * 2), ("fp16", 0), ("fp32", 0)):
        cfg = load_config(tiny_config(tmp_path / f"{precision}{calls}", epochs=2, precision=precision))
        monkeypatch.setattr(train.F, "cross_entropy", nan_after(train.F.cross_entropy, calls))
        with pytest.raises(train.VQAError) as e:
            train.main(cfg)
        monkeypatch.undo()
        advice = str(e.value).partition("To go on: ")[2]
        if calls:
            assert advice == ("resume with --precision bf16 (on GPUs from Ampere on) or fp32, fp16 overflowing above "
                              "65,504; or " * (precision == "fp16") + "check the data, or start over with a lower --lr "
                              "(--overwrite)")
        else:
            assert advice == "check the data, or start again with --overwrite and a lower --lr" + (
                " or --precision bf16 (on GPUs from Ampere on) or fp32" * (precision == "fp16"))


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    import train
    from vqa.config import load_config

    cfg = load_config(tiny_config(tmp_path, epochs=2))
    # NaN from epoch 2: 2 steps an epoch, 2 losses a step (answer and question type).
    monkeypatch.setattr(train.F, "cross_entropy", nan_after(train.F.cross_entropy, 2 * 2))
    with pytest.raises(train.VQAError, match=r"loss is nan at epoch 2, step 3"):
        train.main(cfg)
    state = torch.load(Path(cfg.train.output_dir) / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)  # the end of epoch 1, untouched


def run_until_stopped(train, cfg) -> dict:
    """Runs ``train.main(cfg)``, which a SIGTERM sent during it must stop with exit code 143, leaving SIGTERM
    ignored so that another cannot kill the exit; returns the checkpoint it saved."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_:
            train.main(cfg)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_.value.code == 128 + signal.SIGTERM
    return torch.load(Path(cfg.train.output_dir) / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("at_call, during", [(3, "forward"), (4, "backward")])
def test_a_signal_stops_training_after_the_step_it_came_in(tmp_path, monkeypatch, at_call, during):
    """SIGTERM during step 3's forward pass stops the run after step 3; during the backward pass of the
    epoch's last step (4), after the step's check, it stops before validation, not after it."""
    sys.path.insert(0, str(ROOT))
    import train
    from vqa.config import load_config

    cfg = load_config(tiny_config(tmp_path, epochs=3, batch_size=2, use_type_loss=False))  # 4 steps an epoch
    calls, loss_fn = [], train.F.cross_entropy

    def signal_now(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # handled by train.py's handler, in this process

    def signalling(*args, **kwargs):
        calls.append(1)
        loss = loss_fn(*args, **kwargs)
        if len(calls) == at_call:
            signal_now() if during == "forward" else loss.register_hook(signal_now)
        return loss

    monkeypatch.setattr(train.F, "cross_entropy", signalling)
    state = run_until_stopped(train, cfg)
    assert (state["epoch"], state["batch"], state["step"]) == (0, at_call, at_call)
    assert not (Path(cfg.train.output_dir) / "metrics.jsonl").exists()  # no validation ran


def test_a_signal_during_validation_stops_after_the_batch_in_progress(tmp_path, monkeypatch):
    """A launcher sends SIGKILL some seconds after its SIGTERM (torchrun: 30 s), less than a large validation
    takes: the run stops after the validation batch in progress, with the epoch's training saved, and the
    resumed run validates that epoch again."""
    sys.path.insert(0, str(ROOT))
    import train
    import vqa.evaluate
    from vqa.config import load_config

    cfg = load_config(tiny_config(tmp_path, epochs=2, batch_size=2, use_type_loss=False))  # 4 steps, 2 val batches
    updates = []

    class Signalling(vqa.evaluate.TypeAccuracy):
        def update(self, *args):
            updates.append(1)
            if len(updates) == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by train.py's handler, in this process
            super().update(*args)

    monkeypatch.setattr(vqa.evaluate, "TypeAccuracy", Signalling)
    state = run_until_stopped(train, cfg)
    run = Path(cfg.train.output_dir)
    assert len(updates) == 1  # the second batch never ran
    assert (state["epoch"], state["batch"], state["step"]) == (0, 4, 4)
    assert not (run / "metrics.jsonl").exists()
    monkeypatch.undo()
    train.main(load_config(run / "config.yaml"), resume=True)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in logged] == [1, 2] and all(m["count"] == logged[0]["count"] > 0 for m in logged)
    # The epoch validated again logs the training it had before the stop, not the moment the resume spent.
    assert state["epoch_seconds"] > 0 and abs(logged[0]["train_seconds"] - state["epoch_seconds"]) < 0.01


def test_loss_goes_down_on_a_batch_it_overfits():
    sys.path.insert(0, str(ROOT))
    from vqa import DeterministicVQA

    torch.manual_seed(0)
    model = DeterministicVQA(vision_model="vit_small_patch14_dinov2", img_size=28, vocab_size=20, num_answers=5,
                             hidden_dim=32, num_heads=2, question_layers=1, vision_lora_r=4,
                             backbone_kwargs=dict(depth=2))
    model.freeze_pretrained()
    pixels, ids = torch.randn(4, 3, 28, 28), torch.randint(3, 20, (8, 6))
    image_index, answers = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.randint(0, 5, (8,))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(pixels, ids, None, image_index).logits, answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_a_checkpoints_generator_states_continue_every_stream_exactly(tmp_path):
    sys.path.insert(0, str(ROOT))
    import random

    import numpy as np

    import train
    from vqa.run_files import load_checkpoint, save_checkpoint

    def draws():
        return torch.rand(3).tolist(), random.random(), np.random.rand(3).tolist(), np.random.standard_normal()

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    draws()  # numpy mid-block, with a normal cached
    save_checkpoint({"rng": train.rng_state()}, tmp_path / "checkpoint.pt")
    want = draws()
    train.set_rng_state(load_checkpoint(tmp_path / "checkpoint.pt")["rng"])
    assert draws() == want


def test_the_optimizer_is_fused_adamw_stepping_like_the_default_one():
    sys.path.insert(0, str(ROOT))
    import copy

    import train
    from vqa import DeterministicVQA
    from vqa.config import RunConfig

    cfg = RunConfig()
    cfg.train.lr, cfg.train.lr_encoder, cfg.train.weight_decay = 1e-2, 3e-3, 0.1
    torch.manual_seed(0)
    model = DeterministicVQA(vision_model="vit_small_patch14_dinov2", img_size=28, vocab_size=20, num_answers=5,
                             hidden_dim=32, num_heads=2, question_layers=1, vision_lora_r=4,
                             backbone_kwargs=dict(depth=1))
    model.freeze_pretrained()
    reference, before = copy.deepcopy(model), {n: p.detach().clone() for n, p in model.named_parameters()}
    fused, default = train.make_optimizer(model, cfg), torch.optim.AdamW(train.param_groups(reference, cfg))
    assert fused.defaults["fused"] and not default.defaults["fused"]
    for step in range(3):
        for opt, net in ((fused, model), (default, reference)):
            torch.manual_seed(step)  # the same gradients for both
            for p in (p for g in opt.param_groups for p in g["params"]):
                p.grad = torch.randn_like(p)
            opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)  # the groups' lr and decay kept
        assert torch.equal(p, before[name]) != p.requires_grad, name  # what trains moved, nothing else


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_help_lists_the_options_and_every_config_key(capsys, monkeypatch):
    sys.path.insert(0, str(ROOT))
    import train

    monkeypatch.setenv("COLUMNS", "60")
    with pytest.raises(SystemExit) as done:
        train.cli(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and all(option in out for option in ("--config", "--resume", "--overwrite"))
    # Then every config key, by section, as argparse lays out options, wrapped to the terminal's width.
    keys = out.split("config keys, section data:")[1]
    for section, names in (("model", ["vision_model", "vision_kwargs"]), ("train", ["output_dir", "progress"])):
        assert f"config keys, section {section}:" in keys and all(f"--{name} " in keys for name in names)
    assert "--vision_lora_r INT" in keys and "LoRA rank (default: 8)" in keys
    assert "--section.key VALUE" in out and max(len(line) for line in out.splitlines()) <= 58


def test_print_config_prints_what_would_train_as_a_config_file_and_writes_nothing(trained, tmp_path, capsys,
                                                                                     monkeypatch):
    sys.path.insert(0, str(ROOT))
    import train
    from vqa.config import load_config

    config, overrides = tiny_config(tmp_path), ["--lr", "3e-4", "--vision_kwargs", "{depth: 1}", "--use_type_loss"]
    assert train.cli(["--config", str(config), *overrides, "--print_config"]) == 0
    (tmp_path / "printed.yaml").write_text(capsys.readouterr().out)
    assert load_config(tmp_path / "printed.yaml") == load_config(config, overrides)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["printed.yaml", "tiny.yaml"]  # no run, no data made
    assert train.cli(["--config", str(config), "--lr", "-1", "--print_config"]) == 2  # checked as for training
    assert "'lr' must be > 0" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")  # under torchrun: the main process alone prints it
    assert train.cli(["--config", str(config), "--print_config"]) == 0 and capsys.readouterr().out == ""
    monkeypatch.delenv("RANK")
    run = copied_run(trained, tmp_path)
    before = run_bytes(run)
    assert train.cli(["--resume", str(run), "--epochs", "5", "--print-config"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())  # the run's own, here and as resume would run it
    want = {**saved, "train": {**saved["train"], "epochs": 5, "output_dir": str(run)}}
    assert yaml.safe_load(capsys.readouterr().out) == want and run_bytes(run) == before
    assert train.cli(["--resume", str(run), "--grad_accum_steps", "2", "--print_config"]) == 2  # as resume refuses it
    assert "--resume cannot change 'grad_accum_steps'" in capsys.readouterr().err and run_bytes(run) == before


def test_help_shows_a_key_s_text_as_written_and_is_read_only_for_help(capsys, monkeypatch):
    sys.path.insert(0, str(ROOT))
    import train

    monkeypatch.setenv("COLUMNS", "1")  # narrower than any word: wrapped at argparse's least width, no error
    monkeypatch.setattr(train, "key_help", lambda: {"train": [("lr", "FLOAT", "50% of %(default)s (default: 0.001)")]})
    with pytest.raises(SystemExit):
        train.cli(["--help"])
    assert "50% of %(default)s" in " ".join(capsys.readouterr().out.split())  # argparse formats no % in it

    def unread():
        raise AssertionError("the config keys' help was read without --help")

    monkeypatch.setattr(train, "key_help", unread)
    with pytest.raises(SystemExit) as done:
        train.cli([])  # nothing to train: argparse's usage error, the keys' help unread
    assert done.value.code == 2 and "nothing to train" in capsys.readouterr().err


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


def test_resume_refuses_a_checkpoint_carrying_code(tmp_path):
    sys.path.insert(0, str(ROOT))
    from vqa.errors import VQAError
    from vqa.run_files import load_checkpoint

    marker = tmp_path / "pwned"
    torch.save({"model": {}, "extra": Payload(str(marker))}, tmp_path / "checkpoint.pt")
    with pytest.raises(VQAError, match=r"cannot load checkpoint .* safely \(Unsupported global: GLOBAL \S*open") as e:
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert not marker.exists()
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage" * 100)
    with pytest.raises(VQAError, match="safely .*: the file is damaged, or is not a checkpoint train.py wrote") as e2:
        load_checkpoint(tmp_path / "checkpoint.pt")
    for error in (e, e2):  # never torch's advice to load it without weights_only, which would run its code
        assert "weights_only" not in str(error.value) and "trust" not in str(error.value)


def tool_args(tool: str, tmp_path: Path) -> list[str]:
    """The arguments besides --run that vqa.evaluate or vqa.predict requires (files that need not exist)."""
    return {"evaluate": ["--csv", str(tmp_path / "val.csv")],
            "predict": ["--image", str(tmp_path / "a.png"), "--question", "What color?"]}[tool]


@pytest.mark.parametrize("tool, option, value, message", [
    ("evaluate", "--batch_size", "0", "must be >= 1, got 0"),
    ("evaluate", "--num_workers", "two", "expected an integer >= 0, got 'two'"),
    ("predict", "--top_k", "-3", "must be >= 1, got -3"),
])
def test_evaluate_and_predict_refuse_a_bad_count_naming_the_option(tool, option, value, message, tmp_path, capsys):
    import vqa.evaluate
    import vqa.predict
    args = tool_args(tool, tmp_path)
    with pytest.raises(SystemExit) as exit_:
        getattr(vqa, tool).main(["--run", str(tmp_path), *args, option, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {option}" in err and message in err


def test_predict_refuses_a_top_k_below_one():
    from vqa.predict import predict
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        predict(None, None, None, None, Path("a.png"), "What color?", top_k=0)  # checked before anything is read


class _Scripted(torch.nn.Module):
    """A model whose answer and type logits are given per batch; it records whether it ran in training mode."""

    def __init__(self, outputs):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.outputs, self.modes = iter(outputs), []

    def forward(self, pixel_values, input_ids, attention_mask, image_index):
        from vqa.model import VQAOutput
        self.modes.append(self.training)
        answers, types = next(self.outputs)
        return VQAOutput(F.one_hot(torch.tensor(answers), 4).float(), F.one_hot(torch.tensor(types), 6).float())


def _batch(answer, question_type):
    n = len(answer)
    return {"pixel_values": torch.zeros(n, 3, 2, 2), "input_ids": torch.ones(n, 2, dtype=torch.long),
            "attention_mask": torch.ones(n, 2, dtype=torch.long), "image_index": torch.arange(n),
            "answer": torch.tensor(answer), "question_type": torch.tensor(question_type)}


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_counts_each_question_under_its_csv_type_in_eval_mode_and_restores_the_mode(training):
    from vqa.evaluate import evaluate
    from vqa.text import QUESTION_TYPES

    count, color = QUESTION_TYPES.index("count"), QUESTION_TYPES.index("color")
    # The type head says "color" for every question: the CSV's types, not the head's guesses, are counted.
    model = _Scripted([([1, 2, 3], [color] * 3), ([0], [color])]).train(training)
    loader = [_batch([1, 2, 0], [count, count, color]), _batch([0], [color])]
    m = evaluate(model, loader, torch.device("cpu"))
    assert m == {"accuracy": 0.75, "count": 4, "per_type": {"count": {"accuracy": 1.0, "count": 2},
                                                             "color": {"accuracy": 0.5, "count": 2}}}
    assert model.modes == [False, False] and model.training is training


def test_evaluate_reduces_both_the_hits_and_the_questions():
    """Under torchrun each process scores a share: accuracy is the summed hits over the summed questions."""
    from vqa.evaluate import evaluate

    model = _Scripted([([1, 0], [0, 0])])
    seen = []

    def other_rank_scored_all_of_its_3(t):  # another process: 3 questions of type 0, every one right
        seen.append(t.clone())
        return t + F.one_hot(torch.tensor(0), len(t)) * 3

    m = evaluate(model, [_batch([1, 2], [0, 0])], torch.device("cpu"), reduce=other_rank_scored_all_of_its_3)
    assert len(seen) == 2 and m["count"] == 5 and m["accuracy"] == pytest.approx(4 / 5)


def test_auto_picks_cuda_where_there_is_one_and_a_cuda_index_must_exist(monkeypatch):
    from vqa.errors import VQAError
    from vqa.evaluate import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == torch.device("cuda") and pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(VQAError, match=r"--device asks for 'cuda:2' but this machine has 2 CUDA device\(s\)"):
        pick_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")


def test_auto_precision_is_bf16_on_gpus_from_ampere_on_fp16_before_and_fp32_on_the_cpu(monkeypatch):
    from contextlib import nullcontext

    from vqa.evaluate import autocast, autocast_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert isinstance(autocast(cpu), nullcontext) and autocast_dtype(cpu) is None
    for capability, dtype in [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16), ((7, 5), torch.float16),
                              ((7, 0), torch.float16)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert autocast_dtype(cuda) == dtype
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else nullcontext():  # "CUDA is not available"
        context = autocast(cuda)
    assert isinstance(context, torch.autocast) and (context.device, context.fast_dtype) == ("cuda", torch.float16)
    for device in (cpu, cuda):  # named, a precision is the same everywhere
        assert [autocast_dtype(device, p) for p in ("bf16", "fp16", "fp32")] == [torch.bfloat16, torch.float16, None]
    assert isinstance(autocast(cpu, "fp32"), nullcontext)
    assert (autocast(cpu, "fp16").device, autocast(cpu, "fp16").fast_dtype) == ("cpu", torch.float16)


def test_auto_precision_is_fp16_in_every_process_where_any_process_takes_fp16(monkeypatch):
    """Under torchrun auto is agreed on: a V100 beside an A100 makes every process fp16 (one process scaling its
    loss and another not would average unlike gradients); a named precision asks no other process."""
    import train
    from vqa.distributed import Processes

    asked, others = [], []

    def max_over_ranks(values, procs, device):  # the other processes' flags, simulated
        asked.append(values)
        return [max([v, *others]) for v in values]

    monkeypatch.setattr(train.distributed, "max_over_ranks", max_over_ranks)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    two, cpu, cuda = Processes(rank=0, world_size=2), torch.device("cpu"), torch.device("cuda")
    assert [train.run_precision(d, "auto", two) for d in (cpu, cuda)] == ["fp32", "bf16"]
    others.append(1)  # another process's GPU takes fp16
    assert [train.run_precision(d, "auto", two) for d in (cpu, cuda)] == ["fp16", "fp16"]
    asked.clear()
    assert [train.run_precision(cuda, p, two) for p in ("bf16", "fp32")] == ["bf16", "fp32"] and asked == []


def test_a_resume_in_auto_precision_says_where_it_differs_from_the_run_s_so_far(tmp_path, capsys):
    """A run that trained in bf16 (on an A100, say) and resumes in auto precision where that is fp32 (or fp16, on a
    V100) says so, and how to keep bf16; given the same precision, or named, nothing is said."""
    import train

    assert train.cli(["--config", str(tiny_config(tmp_path, epochs=1))]) == 0
    run = tmp_path / "run"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["precision"] == "fp32"
    for recorded, args, said in (("bf16", [], True), ("bf16", ["--precision", "fp32"], False),
                                 ("fp32", [], False), (None, [], False)):  # None: a checkpoint from before the key
        state = {k: v for k, v in state.items() if k != "precision"} | ({"precision": recorded} if recorded else {})
        torch.save(state, run / "checkpoint.pt")
        capsys.readouterr()
        assert train.cli(["--resume", str(run), *args]) == 0
        note = "note: precision auto is fp32 here, and the run trained in bf16 until now; --precision bf16 keeps that"
        assert (note in capsys.readouterr().out) is said


def test_fp16_scales_the_loss_skips_a_step_whose_gradients_overflowed_and_resumes_with_its_scale(tmp_path,
                                                                                                 monkeypatch, capsys):
    """With precision fp16 the model trains and validates under fp16 autocast. The gradients clipping sees are the
    true ones (unscaled: fp32's, to fp16's rounding); a step whose gradients hold an inf is skipped, by AdamW's own
    step count, and halves the scale, which the checkpoint keeps for a resume."""
    import train
    from vqa.config import load_config

    seen, clipped, build, clip = [], [], train.build_model, torch.nn.utils.clip_grad_norm_

    def building(*args, **kwargs):  # records, at each forward, whether it trains and autocast's dtype
        model = build(*args, **kwargs)
        model.backbone.patch_embed.register_forward_hook(lambda *_: seen[-1].add(
            (torch.is_grad_enabled(), torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)))
        return model

    def recording(params, *args, **kwargs):
        clipped[-1].append([p.grad.clone() for p in params])
        return clip(params, *args, **kwargs)

    monkeypatch.setattr(train, "build_model", building)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    for precision in ("fp32", "fp16"):
        seen.append(set())
        clipped.append([])
        train.main(load_config(tiny_config(tmp_path / precision, epochs=1), [
            "--precision", precision, "--vision_lora_dropout", "0", "--dropout", "0"]))
    assert seen == [{(True, None), (False, None)}, {(True, torch.float16), (False, torch.float16)}]
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: precision")]
    assert len(notes) == 1 and notes[0].startswith("note: precision fp16 on the CPU runs far slower than fp32")
    full, half = (steps[0] for steps in clipped)  # the first step's, from the same weights
    for a, b in zip(full, half):
        torch.testing.assert_close(b, a, rtol=0.05, atol=1e-4)

    unscale = torch.amp.GradScaler.unscale_
    overflowed = []

    def overflowing(self, optimizer):  # the first step's gradients overflow, before they are unscaled
        if not overflowed:
            overflowed.append(next(p for g in optimizer.param_groups for p in g["params"] if p.grad is not None))
            overflowed[0].grad.view(-1)[0] = math.inf
        return unscale(self, optimizer)

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", overflowing)
    run = tmp_path / "overflow" / "run"
    train.main(load_config(tiny_config(tmp_path / "overflow", epochs=1, precision="fp16")))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and state["scaler"]["scale"] == 2.0**15  # halved from 2**16, once
    assert {s["step"].item() for s in state["optimizer"]["state"].values()} == {1.0}  # one step of the two taken
    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", unscale)
    train.main(load_config(run / "config.yaml", ["--epochs", "2"]), resume=True)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["scaler"]["scale"] == 2.0**15  # not a new scaler's 2**16
    assert {s["step"].item() for s in state["optimizer"]["state"].values()} == {3.0}


def test_the_tools_run_the_model_in_the_run_s_precision(trained, tmp_path, monkeypatch, capsys):
    """vqa.evaluate and vqa.predict (an image, a CSV) run a run trained in fp16 under fp16 autocast, as its
    validation ran; a run in auto precision in fp32 on the CPU."""
    import vqa.evaluate
    import vqa.predict
    import vqa.run_files

    seen, load = [], vqa.run_files.load_run

    def loading(*args, **kwargs):
        model, *rest = load(*args, **kwargs)
        model.backbone.patch_embed.register_forward_hook(lambda *_: seen.append(
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
        return model, *rest

    monkeypatch.setattr(vqa.run_files, "load_run", loading)
    data = trained[0] / "data"
    for precision, dtype in (("fp16", torch.float16), ("auto", None)):
        run = tmp_path / precision
        shutil.copytree(trained[0] / "run", run)
        edited_config(run, "train", "precision", precision)
        seen.clear()
        assert vqa.evaluate.main(["--run", str(run), "--csv", str(data / "val.csv")]) == 0
        assert vqa.predict.main(["--run", str(run), "--image", str(data / "images" / "val_00000.png"),
                                 "--question", "How many circles are there?"]) == 0
        assert vqa.predict.main(["--run", str(run), "--csv", str(data / "val.csv"), "--out",
                                 str(tmp_path / f"{precision}.csv")]) == 0
        assert len(seen) >= 3 and set(seen) == {dtype}
    capsys.readouterr()


def test_predict_gives_the_answers_and_type_the_model_gives_the_question_in_a_batch(trained):
    """predict's probabilities are the model's for that image and question, as evaluation batches them."""
    from vqa.data import VQADataset, build_transform, collate, read_split
    from vqa.predict import predict
    from vqa.run_files import load_run
    from vqa.text import QUESTION_TYPES

    tmp, _ = trained
    model, tokenizer, answers, cfg = load_run(tmp / "run")
    transform = build_transform(model.backbone, cfg.model.img_size)
    rows = [r for r in read_split(tmp / "data" / "val.csv").rows if r.image.name == "val_00001.png"][:3]  # 3 types
    batch = collate([VQADataset(rows, transform, tokenizer, answers)[0]])
    with torch.no_grad():
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["image_index"])
    for q, row in enumerate(rows):
        ranked, qtype = predict(model, tokenizer, answers, transform, row.image, row.question, top_k=len(answers))
        expected = dict(zip(answers.itos, out.logits[q].softmax(-1).tolist()))
        assert dict(ranked) == pytest.approx(expected, abs=1e-5) and ranked[0][0] == max(expected, key=expected.get)
        assert qtype == QUESTION_TYPES[int(out.type_logits[q].argmax())]


def test_evaluate_which_last_scores_the_last_epoch_s_weights_and_pins_memory_only_for_cuda(trained, monkeypatch, capsys):
    import vqa.evaluate
    import vqa.run_files

    tmp, _ = trained
    asked, real = [], vqa.run_files.load_run

    def recording(run, device, which, *args):
        asked.append(which)
        return real(run, device, which, *args)

    monkeypatch.setattr(vqa.run_files, "load_run", recording)
    pinned, make_loader = [], vqa.evaluate.make_loader
    monkeypatch.setattr(vqa.evaluate, "make_loader",
                        lambda *args, pin_memory: pinned.append(pin_memory) or make_loader(*args, pin_memory=pin_memory))
    csv = tmp / "data" / "val.csv"
    assert vqa.evaluate.main(["--run", str(tmp / "run"), "--csv", str(csv), "--which", "last"]) == 0
    assert vqa.evaluate.main(["--run", str(tmp / "run"), "--csv", str(csv)]) == 0
    assert asked == ["last", "best"]
    assert pinned == [torch.cuda.is_available()] * 2  # pinned memory only for copies to a GPU
    last = json.loads((tmp / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    overall = [line for line in capsys.readouterr().out.splitlines() if line.startswith("overall")]
    assert overall[0].split()[-2] == f"{100 * last['accuracy']:.2f}%"


@pytest.mark.parametrize("tool", ["evaluate", "predict"])
@pytest.mark.parametrize("device, message", [("gpu0", "unknown device 'gpu0'"), ("cuda", "CUDA is not available"),
                                             ("meta", "a device this project does not run on")])
def test_a_bad_device_is_a_clear_error_in_evaluate_and_predict(tool, device, message, tmp_path, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    import vqa.evaluate
    import vqa.predict
    args = tool_args(tool, tmp_path)
    code = getattr(vqa, tool).main(["--run", str(tmp_path), "--device", device, *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --device ") and message in err


def test_the_schedule_warms_up_linearly_then_decays_by_a_half_cosine_to_zero():
    import train

    factor = train.warmup_cosine(100, 0.1)  # 10 warm-up steps
    assert [factor(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factor(10) == pytest.approx(1.0)  # the peak right after warm-up, never above it
    assert factor(55) == pytest.approx(0.5)  # half-way through the decay
    assert factor(99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert factor(100) == pytest.approx(0.0, abs=1e-12)
    decay = [factor(s) for s in range(10, 101)]
    assert decay == sorted(decay, reverse=True) and max(factor(s) for s in range(101)) <= 1.0
    assert train.warmup_cosine(10, 0.0)(0) == 1.0  # no warm-up: at least one step of it, at the full rate


def test_parameter_groups_give_each_part_its_rate_and_decay_only_matrices():
    import train
    from vqa import DeterministicVQA
    from vqa.config import RunConfig

    cfg = RunConfig()
    cfg.train.lr, cfg.train.lr_encoder, cfg.train.weight_decay = 1e-2, 3e-3, 0.1
    model = DeterministicVQA(vision_model="vit_small_patch14_dinov2", img_size=28, vocab_size=20, num_answers=5,
                             hidden_dim=32, num_heads=2, question_layers=1, vision_lora_r=4,
                             backbone_kwargs=dict(depth=1))
    model.freeze_pretrained()
    where = {id(p): (g["lr"], g["weight_decay"]) for g in train.param_groups(model, cfg) for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(where) == {id(p) for p in trainable.values()}  # each trainable parameter once, nothing else
    for name, p in trainable.items():
        lr = 3e-3 if name.startswith("backbone.") else 1e-2
        decay = 0.1 if p.ndim >= 2 and name not in ("image_pos", "word_pos") else 0.0
        assert where[id(p)] == (lr, decay), name


@pytest.mark.parametrize("args, message", [
    (["--batch_size", "2"], "--resume cannot change 'batch_size' (4 in "),
    (["--grad_accum_steps", "2"], "--resume cannot change 'grad_accum_steps' (1 in "),
    (["--vision_lora_targets", "qkv,fc2"], "--resume cannot change 'vision_lora_targets' ('qkv' in "),
    (["--seed", "7"], "--resume cannot change 'seed' (0 in "),
    (["--warmup_ratio", "0.5"], "--resume cannot change 'warmup_ratio'"),
    (["--use_type_loss", "false"], "--resume cannot change 'use_type_loss'"),
    (["--lr_encoder", "0.5"], "--resume cannot change 'lr_encoder' (0.001 in "),  # the optimizer state's would win
    (["--weight_decay", "0.5"], "--resume cannot change 'weight_decay' (0.01 in "),
    (["--vision_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2}"], "--resume cannot change 'vision_kwargs' ({"),
])
def test_resume_refuses_what_fixes_the_batch_order_or_the_schedule(trained, tmp_path, capsys, args, message):
    import train

    run = copied_run(trained, tmp_path)
    before = run_bytes(run)
    assert train.cli(["--resume", str(run), "--epochs", "3", *args]) == 2
    assert message in capsys.readouterr().err
    assert run_bytes(run) == before


def recording_cross_entropy(monkeypatch, train):
    """Records each training loss call's ``weight`` and result (not validation's, under no_grad); returns the list."""
    calls, real = [], train.F.cross_entropy

    def recording(*args, **kwargs):
        loss = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls.append((kwargs.get("weight"), loss.item()))
        return loss

    monkeypatch.setattr(train.F, "cross_entropy", recording)
    return calls


def test_answer_weights_weigh_the_answer_loss_and_unlisted_answers_weigh_one(trained, tmp_path, monkeypatch):
    """A file that weighs some of the answers is taken (the refusal is for one that weighs none), and each
    answer class's weight is the file's, or 1 for an answer it does not list. Also: a run returns with the
    signal handlers it found."""
    import train
    from vqa.config import load_config
    from vqa.text import AnswerVocab

    tmp, _ = trained
    answers = AnswerVocab.from_json((tmp / "run" / "answers.json").read_text()).itos
    weights = tmp_path / "w.json"
    weights.write_text(json.dumps({answers[0]: 3.0, "zebra": 2.0}))  # one answer of the run, one of another set
    cfg = load_config(tmp / "tiny.yaml", ["--answer_weights", str(weights), "--output_dir", str(tmp_path / "run"),
                                          "--epochs", "1"])
    calls = recording_cross_entropy(monkeypatch, train)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    train.main(cfg)
    weighted = [w for w, _ in calls if w is not None]
    assert len(weighted) == 2  # the answer loss of each of the 2 steps; the type loss unweighted
    for w in weighted:
        assert w.tolist() == [3.0] + [1.0] * (len(answers) - 1)
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_the_step_loss_is_the_answer_loss_plus_the_weighted_type_loss_and_gradients_are_clipped(
        trained, tmp_path, monkeypatch):
    import train
    from vqa.config import load_config

    tmp, _ = trained
    cfg = load_config(tmp / "tiny.yaml", ["--output_dir", str(tmp_path / "run"), "--epochs", "1",
                                          "--type_loss_weight", "0.25", "--grad_clip", "0.5"])
    calls = recording_cross_entropy(monkeypatch, train)
    losses, isfinite = [], math.isfinite

    def recording_isfinite(x):  # train.py's batch_check calls it once a step, on the step's loss.item()
        if sys._getframe(1).f_code.co_name == "batch_check":
            losses.append(x)
        return isfinite(x)

    monkeypatch.setattr(train.math, "isfinite", recording_isfinite)
    clips, clip = [], torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm, *a, **k: clips.append(max_norm) or clip(params, max_norm, *a, **k))
    train.main(cfg)
    assert len(losses) == 2 and clips == [0.5, 0.5]
    for step, loss in enumerate(losses):
        (_, answer), (_, qtype) = calls[2 * step], calls[2 * step + 1]
        assert loss == pytest.approx(answer + 0.25 * qtype, rel=1e-6)
    clips.clear()
    train.main(load_config(tmp / "tiny.yaml", ["--output_dir", str(tmp_path / "run0"), "--epochs", "1",
                                                "--grad_clip", "0"]))
    assert clips == []  # 0 disables clipping


def _several(ids, counts, g):
    """A loss batch of questions with several answers (class ids, -1 for none known, and how many gave each)."""
    ids = torch.tensor(ids)
    return {"answer": ids[:, 0], "answer_ids": ids, "answer_counts": torch.tensor(counts),
            "question_type": torch.randint(0, 5, (len(ids),), generator=g)}


def _single(ids, g):
    """A loss batch of questions with one answer each (class ids, -1 for none known)."""
    return {"answer": torch.tensor(ids), "question_type": torch.randint(0, 5, (len(ids),), generator=g)}


def _joined(group):
    """The batches of ``group`` as one, those of one answer a question as collate gives them beside several."""
    k = max(b["answer_ids"].shape[1] if "answer_ids" in b else 1 for b in group)
    if k > 1:
        group = [
            {**b, "answer_ids": F.pad(b["answer_ids"], (0, k - b["answer_ids"].shape[1]), value=-1),
             "answer_counts": F.pad(b["answer_counts"], (0, k - b["answer_counts"].shape[1]))} if "answer_ids" in b
            else {**b, "answer_ids": F.pad(b["answer"][:, None], (0, k - 1), value=-1),
                  "answer_counts": F.pad(torch.ones(len(b["answer"]), 1, dtype=torch.long), (0, k - 1))}
            for b in group]
    return {key: torch.cat([b[key] for b in group]) for key in group[0]}


def test_the_loss_shares_make_a_step_of_several_batches_the_loss_of_one_batch_of_all_their_questions():
    """Scaled by their shares, the batches' answer and type losses add up to the losses of the batches put together,
    with answer weights, questions of several answers beside questions of one, and batches of other sizes."""
    import train
    from vqa.model import answer_loss

    g = torch.Generator().manual_seed(0)
    weight = torch.rand(6, generator=g) + 0.2
    groups = [
        [_single([5, 5, 1], g), _single([0, 2], g), _single([4], g)],
        [_single([3, 1], g), _several([[1, 4, -1], [2, 5, 0]], [[3, 1, 1], [1, 1, 2]], g), _several([[0]], [[4]], g)],
    ]
    for group in groups:
        logits = [torch.randn(len(b["answer"]), 6, generator=g) for b in group]
        type_logits = [torch.randn(len(b["answer"]), 5, generator=g) for b in group]
        whole = _joined(group)
        for w in (None, weight):
            shares = train.loss_shares(group, w)
            assert len({a for a, _ in shares}) == len(group)  # unequal shares: a mean of the losses would be wrong
            answers = sum(a * answer_loss(x, b, w) for (a, _), x, b in zip(shares, logits, group))
            assert answers.item() == pytest.approx(answer_loss(torch.cat(logits), whole, w).item(), rel=1e-5)
            types = sum(q * F.cross_entropy(x, b["question_type"]) for (_, q), x, b in zip(shares, type_logits, group))
            assert types.item() == pytest.approx(
                F.cross_entropy(torch.cat(type_logits), whole["question_type"]).item(), rel=1e-5)
    assert train.loss_shares([_single([5, 5, 1], g)], weight) == [(1.0, 1.0)]  # one batch a step: its loss as it is


class _Given(torch.nn.Module):
    """A model that gives the answer and type logits it is handed, batch by batch."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = iter(outputs)

    def forward(self, *inputs):
        from vqa.model import VQAOutput
        return VQAOutput(*next(self.outputs))


@pytest.mark.parametrize("several", [False, True])
def test_evaluate_gives_the_training_losses_of_all_its_batches_as_one_batch(several):
    """evaluate's answer_loss and type_loss are the losses of every question put in one batch (answer weights, a
    batch with no known answer, batches of other sizes, questions of several answers beside ones of one), with
    the sums of the other processes added in; a set with no known answer has no answer_loss."""
    from vqa.evaluate import evaluate
    from vqa.model import answer_loss

    g = torch.Generator().manual_seed(1)
    weight = torch.rand(6, generator=g) + 0.2
    group = [_single([5, 5, 1], g), _single([-1, -1], g), _single([4], g)]
    if several:
        group[2] = _several([[1, 4, -1], [2, 5, 0]], [[3, 1, 1], [1, 1, 2]], g)
    outputs = [(torch.randn(len(b["answer"]), 6, generator=g), torch.randn(len(b["answer"]), 5, generator=g))
               for b in group]
    whole, logits, type_logits = _joined(group), *(torch.cat(x) for x in zip(*outputs))
    inputs = ("pixel_values", "input_ids", "attention_mask", "image_index")  # _Given's model reads none of them
    group = [{**b, **dict.fromkeys(inputs, torch.zeros(len(b["answer"])))} for b in group]
    for w in (None, weight):
        m = evaluate(_Given(outputs), group, torch.device("cpu"), losses=True, class_weights=w)
        assert m["answer_loss"] == pytest.approx(answer_loss(logits, whole, w).item(), rel=1e-6)
        assert m["type_loss"] == pytest.approx(F.cross_entropy(type_logits, whole["question_type"]).item(), rel=1e-6)

    def with_another(t):  # another process's sums, (answer loss, type loss) above their divisors
        return t + torch.tensor([[3.0, 1.0], [2.0, 4.0]], dtype=t.dtype) if t.shape == (2, 2) else t

    m = evaluate(_Given(outputs), group, torch.device("cpu"), with_another, losses=True, class_weights=weight)
    total = answer_loss(logits, whole, weight).item() * _answer_total(whole, weight)
    assert m["answer_loss"] == pytest.approx((total + 3.0) / (_answer_total(whole, weight) + 2.0), rel=1e-6)
    n = len(whole["question_type"])
    assert m["type_loss"] == pytest.approx((F.cross_entropy(type_logits, whole["question_type"]).item() * n + 1.0)
                                           / (n + 4.0), rel=1e-6)
    m = evaluate(_Given(outputs[1:2]), group[1:2], torch.device("cpu"), losses=True)
    assert "answer_loss" not in m and m["type_loss"] > 0
    assert "type_loss" not in evaluate(_Given(outputs), group, torch.device("cpu"))  # only when asked


def _answer_total(batch, weight) -> float:
    from vqa.model import answer_loss_total
    return float(answer_loss_total(batch, weight))


@pytest.mark.parametrize("half", [2, 3])
def test_a_step_of_accumulated_batches_has_the_gradients_of_one_batch_of_all_of_them(tmp_path, monkeypatch, half):
    """grad_accum_steps 2 with batches of ``half`` images takes the steps of batches of twice that (the same images in
    the same order), with the same gradients, loss and schedule; of 8 images, batches of 3 make a last step of one
    batch. BatchNorm is taken out, as its statistics are a batch's own; answer weights make the halves of a step
    weigh differently."""
    import train
    from vqa.config import load_config

    monkeypatch.setattr(torch.nn.BatchNorm1d, "forward", lambda self, x: x)
    grads, real_step = [], torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        grads[-1].append([None if p.grad is None else p.grad.clone() for g in self.param_groups for p in g["params"]])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps({"yes": 4.0, "no": 0.5, "1": 3.0, "2": 0.25, "red": 2.0}))
    runs = {}
    for batch_size, accumulate in ((2 * half, 1), (half, 2)):
        grads.append([])
        run = tmp_path / f"run{accumulate}"
        train.main(load_config(tiny_config(tmp_path, epochs=2), [
            "--batch_size", str(batch_size), "--grad_accum_steps", str(accumulate), "--output_dir", str(run),
            "--answer_weights", str(weights), "--vision_lora_dropout", "0", "--dropout", "0", "--grad_clip", "0"]))
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        runs[accumulate] = {**json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]),
                            "lr": [g["lr"] for g in state["optimizer"]["param_groups"]]}
    one, accumulated = grads
    assert len(one) == len(accumulated) == 4 and runs[2]["step"] == runs[1]["step"] == 4
    assert runs[2]["lr"] == runs[1]["lr"]  # the schedule counts steps, not batches (epoch 2's steps tell)
    for a, b in zip(one, accumulated):
        assert [g is None for g in a] == [g is None for g in b]
        for x, y in zip(a, b):
            if x is not None:
                torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-7)
    assert runs[2]["train_loss"] == pytest.approx(runs[1]["train_loss"], rel=1e-5)


@pytest.mark.parametrize("accumulate, at_call, position", [(1, 3, (0, 3, 3)), (2, 3, (0, 4, 2)), (2, 2, (0, 2, 1))])
def test_a_signal_stops_training_after_the_step_it_came_in_with_accumulated_batches(tmp_path, monkeypatch,
                                                                                    accumulate, at_call, position):
    """With 2 batches a step, a SIGTERM during a step's first batch (call 3: step 2's first) stops after that step's
    second batch; the checkpoint's position is the step's end."""
    import train
    from vqa.config import load_config

    cfg = load_config(tiny_config(tmp_path, epochs=3, batch_size=2, use_type_loss=False,
                                  grad_accum_steps=accumulate))  # 4 batches an epoch
    calls, loss_fn = [], train.F.cross_entropy

    def signalling(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss_fn(*args, **kwargs)

    monkeypatch.setattr(train.F, "cross_entropy", signalling)
    state = run_until_stopped(train, cfg)
    assert (state["epoch"], state["batch"], state["step"]) == position
    assert len(calls) == position[1]  # no batch after the step's last


def test_a_repeated_sigterm_during_a_step_changes_nothing(tmp_path, monkeypatch):
    """A scheduler and torchrun may both send SIGTERM, within one step: the run stops after that step as for
    one signal, never as for a Ctrl-C (an abort without a checkpoint)."""
    import train
    from vqa.config import load_config

    cfg = load_config(tiny_config(tmp_path, epochs=3, batch_size=2, use_type_loss=False))
    calls, loss_fn = [], train.F.cross_entropy

    def signalling(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # handled before the next bytecode: a separate delivery
        return loss_fn(*args, **kwargs)

    monkeypatch.setattr(train.F, "cross_entropy", signalling)
    try:
        state = run_until_stopped(train, cfg)
    except KeyboardInterrupt:
        pytest.fail("a second SIGTERM aborted the run like a Ctrl-C")
    assert (state["epoch"], state["batch"], state["step"]) == (0, 2, 2)


def test_a_signal_during_the_last_update_of_an_epoch_stops_before_any_validation(tmp_path, monkeypatch):
    import train
    import vqa.evaluate
    from vqa.config import load_config

    cfg = load_config(tiny_config(tmp_path, epochs=3, batch_size=2, use_type_loss=False))  # 4 steps an epoch
    calls, loss_fn, updates = [], train.F.cross_entropy, []

    def signalling(*args, **kwargs):
        calls.append(1)
        loss = loss_fn(*args, **kwargs)
        if len(calls) == 4:  # during the backward pass, after the step's stop check
            loss.register_hook(lambda grad: os.kill(os.getpid(), signal.SIGTERM))
        return loss

    class Counting(vqa.evaluate.TypeAccuracy):
        def update(self, *args):
            updates.append(1)
            super().update(*args)

    monkeypatch.setattr(train.F, "cross_entropy", signalling)
    monkeypatch.setattr(vqa.evaluate, "TypeAccuracy", Counting)
    state = run_until_stopped(train, cfg)
    assert (state["epoch"], state["batch"], state["step"]) == (0, 4, 4)
    assert updates == []  # not one validation batch


def test_skipped_training_rows_are_counted_at_the_start_and_at_the_end(trained, tmp_path, capsys):
    import train

    tmp, _ = trained
    data = tmp / "data"
    csv = data / "train_one_bad.csv"  # beside the images its rows name
    csv.write_text(data.joinpath("train.csv").read_text() + "images/missing.png,What color is it?,red,color\n")
    assert train.cli(["--config", str(tmp / "tiny.yaml"), "--output_dir", str(tmp_path / "run"), "--epochs", "1",
                      "--train_csv", str(csv), "--skip_bad_rows", "true"]) == 0
    out = capsys.readouterr().out
    first = out.index("train_csv: skipped 1 bad row(s) (--skip_bad_rows), e.g. ")
    assert "images/missing.png" in out[first:].splitlines()[0] and first < out.index("epoch 1:")
    assert "\nskipped 1 bad row(s) (--skip_bad_rows)\n" in out[out.index("epoch 1:"):]  # the summary again


def edited_config(run: Path, section: str, key: str, value) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg[section][key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize("section, key, value, message", [
    ("model", "hidden_dim", 64, "has shape"),  # a size that differs from the weights'
    ("model", "use_vision_lora", False, "which the model does not have"),  # weights the model has no place for
])
def test_weights_that_do_not_fit_the_run_config_are_a_clear_error(trained, tmp_path, capsys, section, key, value,
                                                                   message):
    import vqa.predict

    run = copied_run(trained, tmp_path)
    edited_config(run, section, key, value)
    image = trained[0] / "data" / "images" / "val_00000.png"
    assert vqa.predict.main(["--run", str(run), "--image", str(image), "--question", "How many circles?"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model_best.safetensors" in err and message in err


def test_tools_name_a_folder_that_is_no_run(tmp_path, capsys):
    import vqa.predict

    assert vqa.predict.main(["--run", str(tmp_path), "--image", str(tmp_path / "a.png"), "--question", "Is it?"]) == 2
    assert f"'{tmp_path}' is not a run folder: it has no config.yaml" in capsys.readouterr().err


def test_export_which_last_writes_the_last_weights_and_names_them(trained, tmp_path):
    from safetensors.torch import load_file

    import lora
    from vqa.export import main as export

    run = copied_run(trained, tmp_path)
    last_epoch = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["epoch"]
    # A best file whose adapters surely differ from the last one's.
    weights = {k: (v + 1 if k.endswith("lora_B") else v) for k, v in load_file(str(run / "model_last.safetensors")).items()}
    lora.save_safetensors(weights, run / "model_best.safetensors", {"epoch": "1", "val_accuracy": "0.9"})
    for which in ("best", "last"):
        assert export(["--run", str(run), "--out", str(tmp_path / f"{which}.safetensors"), "--which", which]) == 0
    meta = file_metadata(tmp_path / "last.safetensors")
    assert meta["weights"] == "model_last.safetensors" and meta["epoch"] == str(last_epoch)
    (run / "model_best.safetensors").unlink()  # now best falls back to the last weights
    assert export(["--run", str(run), "--out", str(tmp_path / "fallback.safetensors")]) == 0
    last, best, fallback = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("last", "best", "fallback"))
    assert last.keys() == fallback.keys() and all(torch.equal(last[k], fallback[k]) for k in last)
    assert not all(torch.equal(last[k], best[k]) for k in last)


def file_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_export_metadata_names_the_model_its_size_and_the_run(trained, tmp_path):
    from vqa.export import main as export

    tmp, _ = trained
    out = tmp_path / "encoder.safetensors"
    assert export(["--run", str(tmp / "run"), "--out", str(out)]) == 0
    meta = file_metadata(out)
    assert meta["architecture"] == "vit_small_patch14_dinov2" and meta["img_size"] == "28"
    assert meta["run"] == str((tmp / "run").resolve())


def test_export_metadata_records_the_run_resolved_and_the_epoch_and_accuracy_of_its_weights(trained, tmp_path,
                                                                                         monkeypatch):
    from vqa.export import main as export

    tmp, _ = trained
    monkeypatch.chdir(tmp)
    out = tmp_path / "encoder.safetensors"
    assert export(["--run", "run", "--out", str(out)]) == 0  # a relative --run: the file records where it is
    meta, weights = file_metadata(out), file_metadata(tmp / "run" / "model_best.safetensors")
    assert meta["run"] == str((tmp / "run").resolve())
    assert (meta["epoch"], meta["val_accuracy"]) == (weights["epoch"], weights["val_accuracy"])


def test_export_never_writes_over_a_file_of_the_run_even_with_overwrite(trained, tmp_path, capsys, monkeypatch):
    """Told the file exists, a user adds --overwrite: a file of the run itself is still refused, however spelt."""
    from vqa.export import main as export
    from vqa.run_files import RUN_FILES

    run = copied_run(trained, tmp_path)
    monkeypatch.chdir(run)
    names = [name for name in RUN_FILES if name.endswith(".safetensors")]
    assert len(names) == 5
    for name in names:
        before = (run / name).read_bytes()
        for spelling in (str(run / name), name, f"../run/{name}"):
            assert export(["--run", str(run), "--out", spelling, "--overwrite"]) == 2, spelling
            assert "is a file of the run itself" in capsys.readouterr().err
        assert (run / name).read_bytes() == before, name


def test_a_config_kept_where_the_run_writes_its_own_is_refused_not_replaced(tmp_path, capsys):
    import train

    mine = tiny_config(tmp_path / "run")  # run/tiny.yaml, output_dir run/run; moved to run/config.yaml, alone
    cfg = yaml.safe_load(mine.read_text())
    cfg["train"]["output_dir"] = str(tmp_path / "run")
    written = "# my notes\n" + yaml.safe_dump(cfg)
    (tmp_path / "run" / "config.yaml").write_text(written)
    assert train.cli(["--config", str(tmp_path / "run" / "config.yaml"), "--lr", "5e-4"]) == 2
    assert "is where the run in output_dir" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.yaml").read_text() == written
    # A run's own config.yaml, alone in its folder (a run cut short after writing it): the restart advice works.
    from vqa.config import load_config

    own = load_config(tmp_path / "run" / "config.yaml").to_dict()
    (tmp_path / "run" / "tiny.yaml").unlink()
    # As written by a version before vision_kwargs: a key fewer, the rest as train.py writes them. The advice holds.
    older = {section: {k: v for k, v in values.items() if k != "vision_kwargs"} for section, values in own.items()}
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(older, sort_keys=False))
    assert train.cli(["--config", str(tmp_path / "run" / "config.yaml"), "--epochs", "1"]) == 0
    assert "vision_kwargs: {}" in (tmp_path / "run" / "config.yaml").read_text()  # written in full again
    for mine in ("# my notes\n" + yaml.safe_dump(own, sort_keys=False), yaml.safe_dump(own, sort_keys=True)):
        (tmp_path / "run" / "config.yaml").write_text(mine)  # a comment, or another order: not train.py's
        assert train.cli(["--config", str(tmp_path / "run" / "config.yaml"), "--epochs", "1", "--overwrite"]) == 2
        assert "is where the run in output_dir" in capsys.readouterr().err
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(own, sort_keys=False))
    assert train.cli(["--config", str(tmp_path / "run" / "config.yaml"), "--epochs", "1", "--overwrite"]) == 0


def test_no_arguments_is_a_usage_error_that_names_the_demo(tmp_path, capsys, monkeypatch):
    """Bare ``python train.py`` trains nothing, even where the defaults' data exist: the defaults alone are no run
    anyone asked for."""
    import train

    from vqa.synth import generate

    monkeypatch.chdir(tmp_path)
    generate(tmp_path / "data" / "synth", train_images=4, val_images=2)  # where the defaults read
    with pytest.raises(SystemExit) as exit_:
        train.cli([])
    assert exit_.value.code == 2
    assert "nothing to train: give --config (the demo: python train.py --config configs/demo.yaml)" in (
        capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()
    # Settings given: the defaults plus those, as documented (this one fails on its data, not on the usage).
    assert train.cli(["--train_csv", "mine/train.csv"]) == 2
    assert "nothing to train" not in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["config file", "CSV file", "answer weights file"])
def test_an_unreadable_input_is_an_error_naming_it(tmp_path, capsys, monkeypatch, kind):
    """Permission denied on a file the run reads (simulated: as root every file is readable)."""
    import train

    config = tiny_config(tmp_path)
    weights = tmp_path / "w.json"
    weights.write_text('{"yes": 1.0}')
    target = {"config file": config, "CSV file": tmp_path / "data" / "train.csv", "answer weights file": weights}[kind]
    for method in ("read_text", "read_bytes"):
        def refusing(self, *args, _real=getattr(Path, method), **kwargs):
            if self == target:
                raise PermissionError(13, "Permission denied", str(self))
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(Path, method, refusing)
    assert train.cli(["--config", str(config), "--answer_weights", str(weights)]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot read {kind} '{target}' (Permission denied); check its "
                                              f"permissions")


@pytest.mark.parametrize("where", ["output_dir", "train_csv"])
def test_a_folder_that_cannot_be_made_is_an_error_not_a_traceback(tmp_path, capsys, where):
    """An output_dir, or a synthetic data set's folder, under a file (as a read-only place would be)."""
    import train

    (tmp_path / "a_file").write_text("")
    inside = tmp_path / "a_file"
    args = (["--output_dir", str(inside / "run")] if where == "output_dir"
            else ["--train_csv", str(inside / "train.csv"), "--val_csv", str(inside / "val.csv")])
    assert train.cli(["--config", str(tiny_config(tmp_path)), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write '{tmp_path / 'a_file'}") and "can be made and written to" in err
    assert (tmp_path / "a_file").read_text() == ""


def test_export_replaces_an_existing_file_only_with_overwrite(trained, tmp_path, capsys):
    """A run started from an export records its SHA-256: an export pasted again over it would orphan that run."""
    from vqa.export import main as export

    tmp, _ = trained
    out = tmp_path / "encoder.safetensors"
    out.write_bytes(b"a new run's starting weights")
    assert export(["--run", str(tmp / "run"), "--out", str(out)]) == 2
    assert f"--out '{out}' exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"a new run's starting weights"
    assert export(["--run", str(tmp / "run"), "--out", str(out), "--overwrite"]) == 0
    assert file_metadata(out)["architecture"] == "vit_small_patch14_dinov2"


def test_export_to_an_unwritable_place_is_a_clear_error(trained, tmp_path, capsys):
    from vqa.export import main as export

    tmp, _ = trained
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "encoder.safetensors"  # a "folder" that is a file
    assert export(["--run", str(tmp / "run"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot write --out '{out}'")


@pytest.fixture(scope="session")  # not "module": worksteal interleaves modules, building it again on each return
def started_from_export(trained, tmp_path_factory):
    """A second run, started from the first run's exported encoder (checkpoint_path)."""
    import train
    from vqa.export import main as export

    tmp, _ = trained
    here = tmp_path_factory.mktemp("second")
    encoder = here / "encoder.safetensors"
    assert export(["--run", str(tmp / "run"), "--out", str(encoder)]) == 0
    second = here / "second"
    assert train.cli(["--config", str(tmp / "tiny.yaml"), "--output_dir", str(second), "--epochs", "1",
                      "--checkpoint_path", str(encoder)]) == 0
    return here, encoder, second


def test_export_refuses_the_starting_checkpoint_however_its_path_is_spelled(started_from_export, capsys, monkeypatch):
    from vqa.export import main as export

    here, encoder, second = started_from_export
    before = encoder.read_bytes()
    monkeypatch.chdir(here)
    for spelling in ("encoder.safetensors", str(here / "second" / ".." / "encoder.safetensors")):
        capsys.readouterr()
        assert export(["--run", str(second), "--out", spelling]) == 2, spelling
        assert "is the checkpoint this run started from" in capsys.readouterr().err
    assert encoder.read_bytes() == before


def test_a_run_from_before_the_sha256_record_still_loads_and_resumes(started_from_export, tmp_path, capsys):
    """Runs trained before checkpoints recorded base_sha256 have nothing to compare: they are not refused."""
    import train
    from safetensors.torch import load_file

    import lora
    from vqa.run_files import load_run

    _, _, second = started_from_export
    run = tmp_path / "old"
    subprocess.run(["cp", "-r", str(second), str(run)], check=True)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state.pop("base_sha256")
    torch.save(state, run / "checkpoint.pt")
    for name in ("model_best.safetensors", "model_last.safetensors"):
        meta = {k: v for k, v in file_metadata(run / name).items() if k != "base_sha256"}
        lora.save_safetensors(load_file(str(run / name)), run / name, meta)
    load_run(run)
    assert train.cli(["--resume", str(run), "--epochs", "2"]) == 0, capsys.readouterr().err


def test_predict_prints_the_worded_type_for_a_run_trained_without_the_type_loss(trained, tmp_path, capsys):
    import vqa.predict
    from vqa.data import build_transform
    from vqa.run_files import load_run
    from vqa.text import infer_question_type

    run = copied_run(trained, tmp_path)
    edited_config(run, "train", "use_type_loss", False)  # as if trained without it: the head is untrained
    model, tokenizer, answers, cfg = load_run(run)
    transform = build_transform(model.backbone, cfg.model.img_size)
    image = trained[0] / "data" / "images" / "val_00000.png"
    questions = ["How many circles are there?", "Is there a red square?", "What shape is the blue object?",
                 "What color is the circle?", "Where is the square?"]
    # A question on which the type head and the wording disagree, so the printed type tells which one spoke.
    question = next(q for q in questions
                    if vqa.predict.predict(model, tokenizer, answers, transform, image, q)[1] != infer_question_type(q))
    assert vqa.predict.main(["--run", str(run), "--image", str(image), "--question", question]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"question: {question}  (type: {infer_question_type(question)}, from its wording)"


def test_predict_refuses_an_empty_question_and_lists_at_most_every_answer(trained, capsys):
    import vqa.predict
    from vqa.text import AnswerVocab

    tmp, _ = trained
    image = tmp / "data" / "images" / "val_00000.png"
    assert vqa.predict.main(["--run", str(tmp / "run"), "--image", str(image), "--question", "   "]) == 2
    assert "--question is empty" in capsys.readouterr().err
    n = len(AnswerVocab.from_json((tmp / "run" / "answers.json").read_text()).itos)
    assert vqa.predict.main(["--run", str(tmp / "run"), "--image", str(image), "--question", "How many?",
                             "--top_k", str(n + 10)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + n


def test_evaluate_takes_outside_paths_where_the_run_trained_with_them(trained, tmp_path, capsys):
    import vqa.evaluate

    tmp, _ = trained
    run = copied_run(trained, tmp_path)
    edited_config(run, "data", "allow_outside_paths", True)
    rows = (tmp / "data" / "val.csv").read_text().splitlines()
    csv = tmp_path / "val.csv"  # elsewhere, naming the images by their absolute paths
    csv.write_text("\n".join([rows[0]] + [str(tmp / "data" / row) for row in rows[1:]]) + "\n")
    assert vqa.evaluate.main(["--run", str(run), "--csv", str(csv)]) == 0, capsys.readouterr().err


def test_evaluate_takes_the_smallest_counts_and_counts_skipped_rows(trained, tmp_path, capsys):
    import vqa.evaluate

    tmp, _ = trained
    csv = tmp / "data" / "val_one_bad.csv"  # beside the images
    csv.write_text((tmp / "data" / "val.csv").read_text() + "images/missing.png,What color is it?,red,color\n")
    args = ["--run", str(tmp / "run"), "--csv", str(csv), "--skip_bad_rows"]
    assert vqa.evaluate.main([*args, "--batch_size", "1", "--num_workers", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"skipped 1 bad row(s) (--skip_bad_rows), e.g. {csv} row ")  # before the table
    assert "images/missing.png" in out.splitlines()[0] and out.endswith("\nskipped 1 bad row(s) (--skip_bad_rows)\n")


def test_under_torchrun_the_schedule_counts_each_process_s_steps(tmp_path, monkeypatch):
    """With N processes a step takes N batches: the cosine must span epochs x (batches // N) steps, or it would
    end a fraction of the way down (its rate never decays)."""
    import torch.distributed as dist

    import train
    from vqa import run_data
    from vqa.config import load_config

    def setup(device):  # one gloo process posing as rank 0 of 2 (as in test_train's process-group test)
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
        return train.distributed.Processes(0, 2), device

    class Planned(Exception):
        pass

    totals = []

    def recording(total_steps, warmup_ratio):
        totals.append(total_steps)
        raise Planned

    monkeypatch.setattr(train.distributed, "setup", setup)
    monkeypatch.setattr(run_data, "shared_bad_images", lambda images, procs: run_data.bad_images(images))  # all, alone
    monkeypatch.setattr(train, "warmup_cosine", recording)
    cfg = load_config(tiny_config(tmp_path, epochs=3, batch_size=2))  # 8 images: 4 batches, 2 per process
    try:
        with pytest.raises(Planned):
            train.main(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert totals == [3 * 2]


def test_the_data_s_image_check_is_shared_out_among_this_run_s_processes(tmp_path, monkeypatch):
    """Both splits' images go to shared_bad_images with the run's processes (rank 0 of 2 here, the collectives
    left out), where each process would otherwise decode them all."""
    import train
    from vqa import run_data
    from vqa.config import load_config

    procs, shared = train.distributed.Processes(0, 2), []

    def sharing(images, processes):
        shared.append((len(images), processes))
        return {}

    monkeypatch.setattr(train.distributed, "barrier", lambda processes: None)
    monkeypatch.setattr(run_data, "shared_bad_images", sharing)
    train.prepare_data(load_config(tiny_config(tmp_path)), procs)
    assert shared == [(8, procs), (4, procs)]  # 8 training images, then 4 validation ones


def tool_runs(trained, tmp_path) -> dict:
    """Each tool and its arguments but --run; export writes to a new file each call."""
    import vqa.evaluate
    import vqa.export
    import vqa.predict

    outs = iter(range(100))
    image = trained[0] / "data" / "images" / "val_00000.png"
    return {"predict": (vqa.predict, lambda: ["--image", str(image), "--question", "How many circles are there?"]),
            "evaluate": (vqa.evaluate, lambda: ["--csv", str(trained[0] / "data" / "val.csv")]),
            "export": (vqa.export, lambda: ["--out", str(tmp_path / f"encoder{next(outs)}.safetensors")])}


def test_tools_take_a_local_copy_of_a_pretrained_run_s_weights_offline(trained, tmp_path, monkeypatch, capsys):
    """Offline, a pretrained run's backbone cannot come from the hub: prediction, evaluation and export say to give
    their own --checkpoint_path and take it (a copy no SHA-256 was recorded for: the hub's is not kept), as
    resume does."""
    import train

    run = copied_run(trained, tmp_path)
    edited_config(run, "model", "pretrained", True)  # as if from the hub: its weights are those the run saved
    local = tmp_path / "local copy.safetensors"
    (run / "backbone.safetensors").rename(local)  # nowhere in the run folder: only the option can bring them
    offline_hub(monkeypatch)
    tools = tool_runs(trained, tmp_path)
    for name, (tool, args) in tools.items():
        assert tool.main(["--run", str(run), *args()]) == 2, name
        err = capsys.readouterr().err
        assert "cannot get the pretrained weights of 'vit_small_patch14_dinov2' through timm's download" in err
        assert f"give a local copy of them, a .safetensors or .pth of this model: python -m vqa.{name} " \
               f"--checkpoint_path PATH" in err, err
        assert tool.main(["--run", str(run), *args(), "--checkpoint_path", str(local)]) == 0, capsys.readouterr().err
    # The copy's weights are the ones used: the encoder is the one the run that saved them exports.
    assert tools["export"][0].main(["--run", str(trained[0] / "run"), *tools["export"][1]()]) == 0
    first, second = (load_file(str(tmp_path / f"encoder{i}.safetensors")) for i in (1, 2))  # 0: the refused call
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    mistyped = tmp_path / "local copy.safetensor"  # a mistake in the option, not in the run's config.yaml
    for name, (tool, args) in tools.items():
        assert tool.main(["--run", str(run), *args(), "--checkpoint_path", str(mistyped)]) == 2, name
        assert (f"--checkpoint_path '{mistyped}' is not a file; give the path of a local copy of the weights run "
                f"'{run}' started from") in capsys.readouterr().err
    assert train.cli(["--resume", str(run), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "on a machine without network, resume with --checkpoint_path PATH" in err and "vqa." not in err
    assert "pretrained: false" not in err  # which resume would refuse
    assert train.cli(["--resume", str(run), "--epochs", "3", "--checkpoint_path", str(local)]) == 0


@pytest.mark.parametrize("unfrozen", ["0", "1"])  # 1: a trained block, so the run's weights differ from the base
def test_a_hub_run_records_its_weights_and_refuses_others_however_they_come(trained, tmp_path, monkeypatch, capsys,
                                                                          unfrozen):
    """The hub's weights under a model's name may change: a run records the SHA-256 of the weights it loaded, and
    resume and the tools refuse others, from the hub or a local copy, where a copy of the same weights serves."""
    from safetensors.torch import save_file

    import train

    tmp, _ = trained
    hub = load_file(str(tmp / "run" / "backbone.safetensors"))  # what the hub serves for the model here
    serving_hub(monkeypatch, hub)
    run = tmp_path / "run"
    assert train.cli(["--config", str(tmp / "tiny.yaml"), "--output_dir", str(run), "--epochs", "1",
                      "--pretrained", "true", "--unfreeze_encoder_layers", unfrozen]) == 0
    copy, other = tmp_path / "copy.safetensors", tmp_path / "other.safetensors"
    save_file(hub, str(copy))
    hub["norm.weight"] = hub["norm.weight"] + 1  # the hub's weights change
    save_file(hub, str(other))
    tools = tool_runs(trained, tmp_path)
    capsys.readouterr()
    for name, (tool, args) in tools.items():
        option = f"python -m vqa.{name} --checkpoint_path PATH"
        for given in ([], ["--checkpoint_path", str(other)]):
            assert tool.main(["--run", str(run), *args(), *given]) == 2, name
            err = capsys.readouterr().err
            assert "the base weights loaded now are not those this run started from" in err, err
            assert f"give a local copy of the weights the run started from ({option})" in err
        assert tool.main(["--run", str(run), *args(), "--checkpoint_path", str(copy)]) == 0, capsys.readouterr().err
    assert train.cli(["--resume", str(run), "--epochs", "2"]) == 2
    assert "(resume with --checkpoint_path PATH)" in capsys.readouterr().err
    assert train.cli(["--resume", str(run), "--epochs", "2", "--checkpoint_path", str(copy)]) == 0


def test_tools_refuse_a_starting_file_with_other_bytes_where_the_run_recorded_its_sha256(started_from_export, trained,
                                                                                       tmp_path, capsys):
    """A run from a checkpoint_path file that has moved: each tool takes a copy with the same bytes through its
    --checkpoint_path, refuses one with other bytes, and export will not write over the copy."""
    from safetensors.torch import save_file

    here, encoder, second = started_from_export
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(second), str(run)], check=True)
    edited_config(run, "model", "checkpoint_path", str(tmp_path / "gone" / "encoder.safetensors"))  # moved away
    moved = tmp_path / "moved.safetensors"
    moved.write_bytes(encoder.read_bytes())
    other = tmp_path / "other.safetensors"  # the same model, one weight changed: it loads
    weights = load_file(str(encoder))
    weights["norm.weight"] = weights["norm.weight"] + 1
    save_file(weights, str(other))
    tools = tool_runs(trained, tmp_path)
    for name, (tool, args) in tools.items():
        option = f"python -m vqa.{name} --checkpoint_path PATH"
        assert tool.main(["--run", str(run), *args()]) == 2
        assert f"does not exist; if the file moved, give where it is now: {option}" in capsys.readouterr().err
        assert tool.main(["--run", str(run), *args(), "--checkpoint_path", str(moved)]) == 0, capsys.readouterr().err
        capsys.readouterr()
        assert tool.main(["--run", str(run), *args(), "--checkpoint_path", str(other)]) == 2
        err = capsys.readouterr().err
        assert f"checkpoint_path '{other}' is not the file this run started from" in err
        assert f"point checkpoint_path at a copy of the original file ({option})" in err
    before = moved.read_bytes()
    assert tools["export"][0].main(["--run", str(run), "--out", str(moved), "--checkpoint_path", str(moved)]) == 2
    assert "is the checkpoint this run started from" in capsys.readouterr().err and moved.read_bytes() == before


def test_tools_refuse_a_starting_file_for_a_run_from_random_weights(trained, tmp_path, capsys):
    """A randomly initialised run's base weights are its backbone.safetensors: another file would replace them."""
    run = trained[0] / "run"
    copy = tmp_path / "backbone copy.safetensors"
    copy.write_bytes((run / "backbone.safetensors").read_bytes())
    for name, (tool, args) in tool_runs(trained, tmp_path).items():
        assert tool.main(["--run", str(run), *args(), "--checkpoint_path", str(copy)]) == 2
        err = capsys.readouterr().err
        assert (f"--checkpoint_path '{copy}' was given, but run '{run}' started from random weights, which its own "
                f"{run / 'backbone.safetensors'} holds") in err and "drop --checkpoint_path" in err, name
    assert not list(tmp_path.glob("encoder*"))


@pytest.mark.parametrize("relative", ["the input", "the run folder"])
def test_remove_run_keeps_an_input_given_by_a_relative_path(tmp_path, monkeypatch, relative):
    from vqa.run_files import remove_run

    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    for name in ("checkpoint.pt", "config.yaml", "backbone.safetensors"):
        (run / name).write_bytes(b"old")
    (run / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    typed = Path("runs") / "x"  # --checkpoint_path or --output_dir as typed
    if relative == "the input":
        remove_run(run, keep=[typed / "backbone.safetensors", None])
    else:
        remove_run(typed, keep=[run / "backbone.safetensors", None])
    assert sorted(p.name for p in run.iterdir()) == ["backbone.safetensors", "notes.txt"]


def test_a_removal_cut_short_leaves_no_trained_file_behind(tmp_path):
    """The trained files go first: a run folder whose removal stopped midway holds nothing to resume or load."""
    from vqa.run_files import RUN_FILES, remove_run, trained_files

    run = tmp_path / "run"
    run.mkdir()
    for name in RUN_FILES:
        (run / name).write_bytes(b"old")
    (run / "config.yaml").unlink()
    (run / "config.yaml").mkdir()  # cannot be unlinked: the removal stops at it
    with pytest.raises(OSError):
        remove_run(run)
    assert trained_files(run) == []


def test_the_sha256_of_a_starting_file_covers_all_of_its_bytes(tmp_path):
    """A checkpoint_path file changed anywhere, even past the first piece read, has another fingerprint."""
    import hashlib

    from vqa.run_files import file_sha256

    data = bytes(range(256)) * ((2 << 20) // 256 + 1)  # a little over 2 MiB: three pieces of 1 MiB
    original, changed = tmp_path / "original.safetensors", tmp_path / "changed.safetensors"
    original.write_bytes(data)
    changed.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit of the last byte
    assert file_sha256(original) == hashlib.sha256(data).hexdigest()
    assert file_sha256(changed) != file_sha256(original)


def test_a_failed_checkpoint_or_text_write_keeps_the_previous_file(tmp_path):
    from vqa.run_files import load_checkpoint, save_checkpoint, write_text

    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": torch.tensor(3)}, path)
    with pytest.raises(Exception):
        save_checkpoint({"step": torch.tensor(4), "bad": lambda: 0}, path)  # fails while being written
    assert load_checkpoint(path)["step"] == 3
    text = tmp_path / "answers.json"
    write_text(text, '{"answers": ["yes"]}')
    with pytest.raises(UnicodeEncodeError):
        write_text(text, '{"answers": ["\ud800"]}')  # no UTF-8 for a lone surrogate, found mid-write
    assert text.read_text() == '{"answers": ["yes"]}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.json", "checkpoint.pt"]  # no temporary left


@pytest.fixture
def one_block(monkeypatch):
    """tiny_config's backbone with one block."""
    monkeypatch.setitem(TINY_VIT, "depth", 1)


def test_the_progress_bar_gives_the_run_s_rate_which_under_torchrun_is_every_process_s(tmp_path, monkeypatch,
                                                                                      capsys, one_block):
    """Each process counts its own questions; the processes step together on equal shares of the batches, so the
    run's rate is the main process's times their number, and that is what its bar shows."""
    import train
    from vqa.distributed import Processes

    one, two = Processes(), Processes(rank=0, world_size=2)
    assert train.questions_per_second(40, 2.0, one) == 20 and train.questions_per_second(40, 2.0, two) == 40
    real, steps = train.questions_per_second, []

    def marked(seen, seconds, procs):  # the bar shows what the function gives, once a step
        steps.append(real(seen, seconds, procs))
        return 12345.0

    monkeypatch.setattr(train, "questions_per_second", marked)
    assert train.cli(["--config", str(tiny_config(tmp_path)), "--epochs", "1", "--progress", "true"]) == 0
    assert len(steps) == 2 and "q_per_s=12345" in capsys.readouterr().err  # 8 images in batches of 4: 2 steps


def test_each_epoch_logs_the_mean_of_its_steps_losses(tmp_path, monkeypatch, capsys, one_block):
    """metrics.jsonl's train_loss is the mean of the epoch's step losses, each the loss the step optimised (the
    answer loss plus the weighted type loss), and the epoch's line says it."""
    import train

    terms, cross_entropy = [], train.F.cross_entropy

    def recording(*args, **kwargs):
        loss = cross_entropy(*args, **kwargs)
        if torch.is_grad_enabled():  # training's, not validation's
            terms.append(loss)
        return loss

    monkeypatch.setattr(train.F, "cross_entropy", recording)
    assert train.cli(["--config", str(tiny_config(tmp_path)), "--type_loss_weight", "0.25"]) == 0
    steps = [(answer + 0.25 * question_type).item() for answer, question_type in zip(terms[::2], terms[1::2])]
    assert len(steps) == 4  # 2 epochs of 8 images in batches of 4
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_loss"] for m in logged] == [(0.0 + steps[0] + steps[1]) / 2, (0.0 + steps[2] + steps[3]) / 2]
    out = capsys.readouterr().out
    assert (f"epoch 2: train loss {logged[1]['train_loss']:.4f}, val loss {logged[1]['val_loss']:.4f}, val accuracy "
            f"{100 * logged[1]['accuracy']:.2f}%") in out
    # Under torchrun the mean covers every process's steps: another process's tally, simulated in the sum (the loss
    # tally is the one sum of two numbers; validation sums a credit and a count per question type).
    real_sum = train.distributed.sum_over_ranks

    def with_another(t, procs, device):
        return t + torch.tensor([10.0, 3]) if t.shape == (2,) else real_sum(t, procs, device)

    monkeypatch.setattr(train.distributed, "sum_over_ranks", with_another)
    assert train.cli(["--config", str(tiny_config(tmp_path / "two")), "--type_loss_weight", "0.25"]) == 0
    both = [json.loads(line) for line in (tmp_path / "two" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_loss"] for m in both] == [(2 * m["train_loss"] + 10.0) / 5 for m in logged]  # the same steps


@pytest.mark.parametrize("type_loss", [True, False])
def test_each_epoch_logs_the_loss_training_optimises_on_the_validation_set(tmp_path, type_loss, one_block):
    """metrics.jsonl's val_loss is the answer loss, with the run's answer weights, plus the weighted type loss
    (with use_type_loss), of the last weights on every validation question as one batch."""
    import train
    from vqa.answer_weights import load_answer_weights
    from vqa.data import VQADataset, build_transform, read_split
    from vqa.evaluate import make_loader
    from vqa.model import answer_loss
    from vqa.run_files import load_run

    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps({"yes": 4.0, "no": 0.5, "1": 3.0, "2": 0.25, "red": 2.0}))
    config = tiny_config(tmp_path, epochs=1, use_type_loss=type_loss, type_loss_weight=0.25)
    assert train.cli(["--config", str(config), "--answer_weights", str(weights)]) == 0
    (logged,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    model, tokenizer, answers, cfg = load_run(tmp_path / "run", which="last")
    val = VQADataset(read_split(cfg.data.val_csv).rows, build_transform(model.backbone, cfg.model.img_size),
                     tokenizer, answers)
    (batch,) = make_loader(val, [list(range(len(val)))])
    table = load_answer_weights(weights)
    with torch.no_grad():
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["image_index"])
    expected = answer_loss(out.logits, batch, torch.tensor([table.get(a, 1.0) for a in answers.itos]))
    if type_loss:
        expected = expected + 0.25 * F.cross_entropy(out.type_logits, batch["question_type"])
    assert logged["val_loss"] == pytest.approx(expected.item(), rel=1e-4)


def test_a_validation_loss_that_is_not_finite_is_left_out_of_the_metrics_file(tmp_path, monkeypatch, one_block):
    """JSON has no NaN (Python writes one that other readers refuse): such a val_loss is not logged."""
    import train

    evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: {**evaluate(*a, **k), "answer_loss": math.nan})
    assert train.cli(["--config", str(tiny_config(tmp_path, epochs=1))]) == 0

    def refuse(constant):
        raise AssertionError(f"{constant} in metrics.jsonl")

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    (logged,) = [json.loads(line, parse_constant=refuse) for line in lines]
    assert "val_loss" not in logged and "train_loss" in logged


def test_the_step_log_gives_every_log_every_steps_their_mean_loss_and_rates_and_a_resume_logs_as_one_run(
        tmp_path, monkeypatch, one_block):
    """steps.jsonl: at every 3rd step, the mean loss of the 3 steps (every process's: another one's simulated in the
    sum) and the two learning rates the step took. A run stopped at step 5, whose log a kill left with a line beyond
    that checkpoint and a line cut short, resumes to the log of an uninterrupted run: the checkpoint keeps the steps
    since the last line."""
    import train
    from vqa.config import load_config

    losses, isfinite, cross_entropy = [], math.isfinite, train.F.cross_entropy
    sum_over_ranks = train.distributed.sum_over_ranks
    monkeypatch.setattr(train.math, "isfinite", lambda x: (
        losses.append(x) if sys._getframe(1).f_code.co_name == "batch_check" else None) or isfinite(x))

    def with_another(t, procs, device):  # another process's 3 steps since the last line, of losses summing to 6
        logging = sys._getframe(1).f_code.co_name == "log_steps"
        return t + torch.tensor([6.0, 3]) if logging else sum_over_ranks(t, procs, device)

    monkeypatch.setattr(train.distributed, "sum_over_ranks", with_another)
    settings = ["--log_every", "3", "--lr_encoder", "5e-4", "--warmup_ratio", "0.25"]
    config = tiny_config(tmp_path / "whole", batch_size=2, use_type_loss=False)  # 4 steps an epoch, 8 in all
    train.main(load_config(config, settings))
    whole = [json.loads(line) for line in (tmp_path / "whole" / "run" / "steps.jsonl").read_text().splitlines()]
    factor = train.warmup_cosine(8, 0.25)
    assert whole == [
        {"step": 3, "epoch": 1, "loss": pytest.approx((sum(losses[:3]) + 6) / 6, rel=1e-12),
         "lr": pytest.approx(1e-3 * factor(2), rel=1e-12), "lr_encoder": pytest.approx(5e-4 * factor(2), rel=1e-12)},
        {"step": 6, "epoch": 2, "loss": pytest.approx((sum(losses[3:6]) + 6) / 6, rel=1e-12),
         "lr": pytest.approx(1e-3 * factor(5), rel=1e-12), "lr_encoder": pytest.approx(5e-4 * factor(5), rel=1e-12)}]

    calls = []

    def signalling(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        if calls.count(True) == 5 and calls[-1]:  # step 5, epoch 2's first
            os.kill(os.getpid(), signal.SIGTERM)
        return cross_entropy(*args, **kwargs)

    monkeypatch.setattr(train.F, "cross_entropy", signalling)
    cfg = load_config(tiny_config(tmp_path / "stopped", batch_size=2, use_type_loss=False), settings)
    assert run_until_stopped(train, cfg)["step"] == 5
    monkeypatch.setattr(train.F, "cross_entropy", cross_entropy)
    log = tmp_path / "stopped" / "run" / "steps.jsonl"
    with log.open("a") as f:
        f.write('{"step": 6, "epoch": 2, "loss": 9.0, "lr": 1.0, "lr_encoder": 1.0}\n{"step": 9, "epo')
    train.main(load_config(log.parent / "config.yaml"), resume=True)
    assert [json.loads(line) for line in log.read_text().splitlines()] == whole


def test_a_step_log_s_last_line_cut_short_is_left_out_and_a_damaged_line_named(tmp_path):
    from vqa.errors import VQAError
    from vqa.run_files import read_history

    log = tmp_path / "steps.jsonl"
    log.write_text('{"step": 3, "loss": 1.5}\n{"step": 6, "lo')
    assert read_history(log, "step") == [{"step": 3, "loss": 1.5}]
    log.write_text('{"step": 3, "loss": 1.5}\n{"step": 6, "lo\n')  # a whole line, damaged
    with pytest.raises(VQAError, match=re.escape(f"{log}, line 2: '{{\"step\": 6, \"lo' is not a step's loss")):
        read_history(log, "step")
    log.write_text('{"step": 3, "loss": 1.5}\n{"epoch": 1}')  # whole, if without its newline: not a step's
    with pytest.raises(VQAError, match="line 2"):
        read_history(log, "step")


def test_each_epoch_draws_another_order_of_the_images_and_the_same_again_on_resume():
    """The shuffled batches are a pure function of (seed, epoch): each epoch's order is its own, and repeatable."""
    import train

    orders = [train.epoch_batches(8, 3, seed=0, epoch=epoch) for epoch in range(3)]
    for batches in orders:
        assert [len(b) for b in batches] == [3, 3, 2] and sorted(i for b in batches for i in b) == list(range(8))
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    assert train.epoch_batches(8, 3, seed=0, epoch=1) == orders[1]


def test_without_warm_up_the_first_step_is_the_one_warm_up_step_at_the_full_rate():
    """warmup_ratio 0 (or a share of the steps below one) still warms up for one step: the decay then spans the
    other steps, from the full rate."""
    import train

    factor = train.warmup_cosine(10, 0.0)
    want = [1.0] + [0.5 * (1 + math.cos(math.pi * (s - 1) / 9)) for s in range(1, 11)]
    assert [factor(s) for s in range(11)] == pytest.approx(want, abs=1e-12)
    assert [train.warmup_cosine(10, 0.05)(s) for s in range(11)] == pytest.approx(want, abs=1e-12)


def test_a_stopped_and_resumed_run_checkpoints_logs_and_keeps_its_best_epoch_as_one_run(tmp_path, monkeypatch,
                                                                                        one_block):
    """Stopped mid-epoch and resumed: each checkpoint_every-th step and each epoch's end are saved at their own
    batch and step (an epoch's end with none of the next epoch's seconds), each epoch logs its step count, and
    model_best stays the best epoch's: the resume keeps the best accuracy, and a tie is not better."""
    import train
    from vqa.config import load_config

    cfg = load_config(tiny_config(tmp_path, epochs=3, batch_size=4, use_type_loss=False, checkpoint_every=2))
    run = Path(cfg.train.output_dir)  # 2 steps an epoch
    saved, save = [], train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda state, path: saved.append(
        {k: state[k] for k in ("epoch", "batch", "step", "best", "epoch_seconds")}) or save(state, path))
    accuracies, evaluate = iter([0.5, 0.25, 0.5]), train.evaluate  # epoch 3 ties epoch 1
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: {**evaluate(*a, **k), "accuracy": next(accuracies)})
    calls, loss_fn = [], train.F.cross_entropy

    def signalling(*args, **kwargs):
        calls.append(torch.is_grad_enabled())  # training's loss, not validation's
        if calls.count(True) == 3 and calls[-1]:  # step 3: epoch 2's first
            os.kill(os.getpid(), signal.SIGTERM)  # handled by train.py's handler, in this process
        return loss_fn(*args, **kwargs)

    monkeypatch.setattr(train.F, "cross_entropy", signalling)
    run_until_stopped(train, cfg)
    monkeypatch.setattr(train.F, "cross_entropy", loss_fn)
    train.main(load_config(run / "config.yaml"), resume=True)
    assert [(s["epoch"], s["batch"], s["step"]) for s in saved] == [
        (0, 2, 2), (1, 0, 2), (1, 1, 3),  # the stop
        (1, 2, 4), (2, 0, 4), (2, 2, 6), (3, 0, 6)]
    assert [s["best"] for s in saved] == [-1.0] + [0.5] * 6
    assert all((s["epoch_seconds"] == 0.0) == (s["batch"] == 0) for s in saved)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["step"], m["accuracy"]) for m in logged] == [(1, 2, 0.5), (2, 4, 0.25), (3, 6, 0.5)]
    assert file_metadata(run / "model_best.safetensors")["epoch"] == "1"
    assert file_metadata(run / "model_last.safetensors")["epoch"] == "3"


def test_a_signal_while_an_epoch_s_weights_are_written_stops_at_that_epoch_s_end(tmp_path, monkeypatch, one_block):
    """SIGTERM after the validation, while the epoch's weights are saved: the run stops with the epoch's end
    checkpoint, before any step of the next epoch, and leaves SIGTERM ignored for its exit."""
    import train
    from vqa.config import load_config

    cfg = load_config(tiny_config(tmp_path, epochs=2, batch_size=8, use_type_loss=False))  # 1 step an epoch
    save = train.lora.save_safetensors

    def signalling(tensors, path, *args, **kwargs):
        if Path(path).name == "model_last.safetensors":
            os.kill(os.getpid(), signal.SIGTERM)  # handled by train.py's handler, in this process
        return save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(train.lora, "save_safetensors", signalling)
    state = run_until_stopped(train, cfg)
    assert (state["epoch"], state["batch"], state["step"]) == (1, 0, 1)
    logged = (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in logged] == [1]


def test_a_failed_metrics_write_keeps_the_epochs_logged_before(tmp_path, monkeypatch, one_block):
    """metrics.jsonl is replaced whole: a write that fails part-way (here an answer no UTF-8 encodes) leaves the
    earlier epochs' lines."""
    import train
    from vqa.config import load_config

    cfg = load_config(tiny_config(tmp_path, epochs=2, batch_size=8, use_type_loss=False))
    dumps = train.json.dumps
    monkeypatch.setattr(train.json, "dumps", lambda obj, *a, **k: dumps(obj, *a, **k) + (
        "\ud800" if isinstance(obj, dict) and obj.get("epoch") == 2 and "accuracy" in obj else ""))
    with pytest.raises(UnicodeEncodeError):
        train.main(cfg)
    history = (Path(cfg.train.output_dir) / "metrics.jsonl").read_text()
    assert [json.loads(line)["epoch"] for line in history.splitlines()] == [1]


def test_every_process_validates_with_the_main_process_s_buffers(tmp_path, monkeypatch, one_block):
    """Before each validation the buffers (BatchNorm statistics) of the main process, those it saves, are copied
    to every process: each process's own differ (test_distributed checks the copy)."""
    import train
    from vqa.config import load_config

    calls, evaluate = [], train.evaluate
    monkeypatch.setattr(train.distributed, "sync_buffers", lambda model, procs: calls.append(("sync", model)))
    monkeypatch.setattr(train, "evaluate", lambda model, *a, **k: calls.append(("evaluate", model)) or evaluate(
        model, *a, **k))
    train.main(load_config(tiny_config(tmp_path, epochs=2, batch_size=8, use_type_loss=False)))
    assert [what for what, _ in calls] == ["sync", "evaluate"] * 2
    assert len({id(model) for _, model in calls}) == 1


def test_resume_refuses_more_images_too_and_its_advice_exports_to_a_free_file(tmp_path):
    """Any other image count is refused, more as well as fewer; the export in the advice names the first
    encoder file not already in the run folder."""
    from types import SimpleNamespace

    import train
    from vqa.config import RunConfig

    run = tmp_path / "run"
    run.mkdir()
    for name in ("encoder.safetensors", "encoder-2.safetensors"):
        (run / name).write_bytes(b"exported before")
    data = SimpleNamespace(path=tmp_path / "train.csv", skipped=[])
    with pytest.raises(train.VQAError, match=r"holds 8 training image\(s\), but the run trained on 4 ") as e:
        train.check_same_images(8, 4, data, run, 1, RunConfig(), RunConfig())
    assert f"--out {shlex.quote(str(run / 'encoder-3.safetensors'))}" in str(e.value)
    train.check_same_images(8, 8, data, run, 1, RunConfig(), RunConfig())
    train.check_same_images(8, None, data, run, 1, RunConfig(), RunConfig())  # a run from before the record


@pytest.mark.parametrize("written, running", [(2, 1), (1, 2)])
def test_a_resume_with_another_process_count_is_refused_with_the_command_of_the_count_that_wrote_it(tmp_path,
                                                                                                    written, running):
    sys.path.insert(0, str(ROOT))
    import train

    run = tmp_path / "run"
    state = {"rng_per_process": [{}] * written}
    with pytest.raises(train.VQAError) as e:
        train.check_same_processes(state, run, running)
    assert f"was written by {written} training process(es), this resume runs {running}; " in str(e.value)
    assert f", {train.train_command('--resume', str(run), processes=written)}, " in str(e.value)
    train.check_same_processes(state, run, written)
    train.check_same_processes({"rng": {}}, run, 1)  # an older run's checkpoint holds one process's random state
    with pytest.raises(train.VQAError, match=re.escape("written by 1 training process(es), this resume runs 2")):
        train.check_same_processes({"rng": {}}, run, 2)


def test_a_run_of_two_processes_resumed_in_one_is_refused_before_the_model_is_built(trained, tmp_path, capsys,
                                                                                   monkeypatch):
    """Where each of the two processes' random streams would otherwise go on silently in the one (rank 0's)."""
    sys.path.insert(0, str(ROOT))
    import train

    run = copied_run(trained, tmp_path)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["rng_per_process"] = state["rng_per_process"] * 2
    torch.save(state, run / "checkpoint.pt")
    (run / "metrics.jsonl").write_text("[1]\n")  # damaged too: the process count, told first, is not hidden
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    assert train.cli(["--resume", str(run), "--epochs", "3"]) == 2
    assert "written by 2 training process(es), this resume runs 1; resume with the same number, torchrun " \
        "--nproc_per_node 2 train.py --resume" in capsys.readouterr().err


def test_a_collective_another_process_left_is_one_line_under_torchrun_and_other_runtime_errors_keep_their_traceback(
        tmp_path, monkeypatch, capsys):
    """gloo's transport error is told as a lost contact only where there are other processes (WORLD_SIZE > 1); a
    RuntimeError of this process's own, or any in a single process, is raised as it was."""
    import train

    config = tiny_config(tmp_path)
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                        "[127.0.0.1]:5555. This is typically caused by a remote worker")
    own = RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")
    raised = []

    def failing(*args, **kwargs):  # as a collective in training would
        raise raised[-1]

    monkeypatch.setattr(train, "main", failing)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for error in (gloo, own):
        raised.append(error)
        with pytest.raises(RuntimeError) as e:
            train.cli(["--config", str(config)])
        assert e.value is error
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError) as e:
        train.cli(["--config", str(config)])
    assert e.value is own
    raised.append(gloo)
    capsys.readouterr()
    assert train.cli(["--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        "error: training process 1 of 2 lost contact with another, which most likely failed or was killed "
        "(Connection closed by peer [127.0.0.1]:5555); that process's error says why (torchrun's report lists the "
        "processes that failed)\n")


def test_a_failed_write_in_the_run_folder_names_the_file_and_other_os_errors_pass_through(tmp_path, monkeypatch,
                                                                                         capsys):
    """A file of the run that exists but cannot be written is named as one to read or write, a file outside the run's
    folders that may not be opened as such; an OSError naming no file (a full disk, say) keeps its own traceback."""
    import errno

    import train

    config = tiny_config(tmp_path)
    history = tmp_path / "run" / "metrics.jsonl"
    history.parent.mkdir()
    history.write_text("")
    raised = []

    def failing(*args, **kwargs):  # as a write in the run's training would
        raise raised[-1]

    monkeypatch.setattr(train, "main", failing)
    raised.append(PermissionError(errno.EACCES, "Permission denied", str(history)))
    assert train.cli(["--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot read or write '{history}': Permission denied; ")
    raised.append(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "elsewhere.txt")))
    assert train.cli(["--config", str(config)]) == 2
    assert capsys.readouterr().err == (f"error: cannot get at '{tmp_path / 'elsewhere.txt'}' (Permission denied); "
                                       f"check the path, and the permissions of the file and of the folders on it\n")
    for error in (OSError(errno.ENOSPC, "No space left on device"),
                  OSError(errno.EIO, "Input/output error", str(tmp_path / "elsewhere.txt"))):
        raised.append(error)
        with pytest.raises(OSError) as e:
            train.cli(["--config", str(config)])
        assert e.value is error


def started_with_relative_paths(tmp_path, monkeypatch):
    """A one-epoch run started in FIRST with relative data paths and output_dir 'run'; returns FIRST and an
    empty folder beside it, the working folder now."""
    import train

    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = yaml.safe_load(tiny_config(first).read_text())
    config["data"].update(train_csv="data/train.csv", val_csv="data/val.csv")
    config["train"].update(output_dir="run", epochs=1)
    (first / "tiny.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(first)
    assert train.cli(["--config", "tiny.yaml"]) == 0
    monkeypatch.chdir(elsewhere)
    return first, elsewhere


def test_a_run_started_with_relative_paths_resumes_and_predicts_from_another_folder(tmp_path, monkeypatch, capsys):
    """The run's config.yaml keeps its paths absolute: resumed from elsewhere, a relative data path would
    silently be another (here a synthetic set generated again in the new folder)."""
    import train
    from vqa.config import load_config
    from vqa.predict import main as predict

    first, elsewhere = started_with_relative_paths(tmp_path, monkeypatch)
    saved = load_config(first / "run" / "config.yaml")
    assert (saved.data.train_csv, saved.data.val_csv) == (str(first / "data/train.csv"), str(first / "data/val.csv"))
    assert saved.train.output_dir == str(first / "run")
    capsys.readouterr()
    assert train.cli(["--resume", "../first/run", "--epochs", "2"]) == 0
    assert "epoch 2:" in capsys.readouterr().out
    assert list(elsewhere.iterdir()) == []  # no data set generated here
    assert load_config(first / "run" / "config.yaml").data == saved.data
    image = next((first / "data" / "images").iterdir())
    assert predict(["--run", "../first/run", "--image", str(image), "--question", "How many circles are there?"]) == 0


def test_an_old_run_with_relative_paths_is_not_resumed_from_another_folder(tmp_path, monkeypatch, capsys):
    """A config.yaml from before the paths were kept absolute: from elsewhere its relative data paths would be
    other files (a synthetic set generated there), then written into config.yaml as absolute."""
    import train

    first, elsewhere = started_with_relative_paths(tmp_path, monkeypatch)
    as_old_run(first / "run", output_dir="run")
    capsys.readouterr()
    assert train.cli(["--resume", "../first/run", "--epochs", "2"]) == 2
    assert (f"relative path(s) train_csv 'data/train.csv', val_csv 'data/val.csv' mean files in '{first}' (where "
            "the run started if it was not copied or moved since, output_dir 'run'), not here;"
            ) in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []
    as_old_run(first / "run", output_dir=str(first / "run"))  # where the run started does not show
    assert train.cli(["--resume", str(first / "run"), "--epochs", "2"]) == 2
    assert "mean files in the folder the run started in, and not all of them are here;" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []
    monkeypatch.chdir(first)
    as_old_run(first / "run", output_dir="run")
    shutil.copytree(first / "run", first / "copy")  # as --resume's advice says: copied, resumed from the start folder
    assert train.cli(["--resume", "copy", "--epochs", "2"]) == 0
    assert train.cli(["--resume", "run", "--epochs", "2"]) == 0
    assert yaml.safe_load((first / "run" / "config.yaml").read_text())["data"]["train_csv"] == str(first / "data/train.csv")


def as_old_run(run, output_dir):
    """Gives the run's config.yaml the relative data paths it had before they were kept absolute."""
    old = yaml.safe_load((run / "config.yaml").read_text())
    old["data"].update(train_csv="data/train.csv", val_csv="data/val.csv")
    old["train"].update(output_dir=output_dir)
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))


def test_a_synthetic_set_found_with_another_size_is_used_and_said(tmp_path, capsys):
    """With synthetic on, a set already in the folder is trained on as it is; where its size is not
    synthetic_train_images (a set left by a smaller trial run), the run says so instead of passing for the other."""
    import train
    from vqa.config import load_config
    from vqa.distributed import Processes

    cfg = load_config(tiny_config(tmp_path))  # 8 training images
    first, _ = train.prepare_data(cfg, Processes())
    assert "generating the synthetic shapes data set" in capsys.readouterr().out
    again, _ = train.prepare_data(cfg, Processes())
    assert capsys.readouterr().out == "" and again.rows == first.rows
    larger = load_config(tiny_config(tmp_path), ["--synthetic_train_images", "12"])
    again, _ = train.prepare_data(larger, Processes())
    assert capsys.readouterr().out == (f"note: training on the data set already in {tmp_path / 'data'} (8 training, "
                                       f"4 validation images); synthetic_train_images (12) applies only to a set "
                                       f"generated where none is\n")
    assert again.rows == first.rows
    train.prepare_data(load_config(tiny_config(tmp_path), ["--synthetic_val_images", "5"]), Processes())
    assert "4 validation images); synthetic_val_images (5) applies only" in capsys.readouterr().out
    train.prepare_data(larger, Processes(), images=8, saved=cfg)  # a resume: its own check counts the images
    assert capsys.readouterr().out == ""
    next((tmp_path / "data" / "images").glob("train_*")).unlink()
    skipping = load_config(tiny_config(tmp_path), ["--skip_bad_rows"])
    assert len(train.prepare_data(skipping, Processes())[0].skipped) == 5  # the image's questions: not another size
    assert "note:" not in capsys.readouterr().out


def test_a_resume_names_every_input_file_that_moved_and_asks_where_it_is_now(trained, tmp_path, capsys):
    import train

    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained[0] / "run"), str(run)], check=True)
    edited_config(run, "data", "answer_weights", str(tmp_path / "gone" / "w.json"))
    edited_config(run, "data", "val_csv", str(tmp_path / "gone" / "val.csv"))
    assert train.cli(["--resume", str(run), "--epochs", "3"]) == 2
    assert (f"error: the run reads answer_weights '{tmp_path / 'gone' / 'w.json'}', val_csv "
            f"'{tmp_path / 'gone' / 'val.csv'}', which do not exist (set in {run / 'config.yaml'}, or here); if moved, "
            f"give where they are now: --answer_weights NEW_PATH --val_csv NEW_PATH") in capsys.readouterr().err
    edited_config(run, "data", "synthetic", False)  # the data set is no longer made where it is missing: named too
    edited_config(run, "data", "train_csv", str(tmp_path / "gone" / "train.csv"))
    assert train.cli(["--resume", str(run), "--epochs", "3", "--answer_weights", "none", "--val_csv",
                      str(trained[0] / "data" / "val.csv")]) == 2
    assert f"reads train_csv '{tmp_path / 'gone' / 'train.csv'}', which does not exist" in capsys.readouterr().err
    assert not (tmp_path / "gone").exists()


def test_a_run_in_training_holds_its_folder_and_a_second_train_py_is_refused(trained, tmp_path, monkeypatch, capsys):
    """Two train.py on one run folder (a resume started while the run still trains, an --overwrite) would write the
    same files: the one training holds an advisory lock on the folder, and the other stops before writing."""
    fcntl = pytest.importorskip("fcntl")
    import train

    def locked_elsewhere(folder: Path) -> bool:
        fd = os.open(folder, os.O_RDONLY)  # another open file: flock refuses it as it would another process
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    held, save = [], train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda state, path: (held.append(locked_elsewhere(path.parent)),
                                                                       save(state, path)))
    new = tmp_path / "new"
    assert train.cli(["--config", str(trained[0] / "tiny.yaml"), "--output_dir", str(new), "--epochs", "1"]) == 0
    assert held == [True] and not locked_elsewhere(new)  # from its first write on, and released at the end
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained[0] / "run"), str(run)], check=True)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    fd = os.open(run, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as the process training it holds it
    try:
        capsys.readouterr()
        assert train.cli(["--resume", str(run), "--epochs", "3"]) == 2
        err = capsys.readouterr().err
        assert f"error: another train.py is training the run in {run} (it holds the folder's lock)" in err
        assert train.cli(["--config", str(trained[0] / "tiny.yaml"), "--output_dir", str(run), "--overwrite"]) == 2
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    finally:
        os.close(fd)
    assert train.cli(["--resume", str(run), "--epochs", "3"]) == 0


def test_a_forked_child_such_as_a_loader_worker_does_not_keep_a_run_locked(tmp_path):
    """A lock lasts while any copy of its descriptor is open: a loader worker (forked) that outlives its killed
    parent for seconds must not keep the resume out, so children close their copies."""
    pytest.importorskip("fcntl")
    from vqa.run_lock import RunLock

    lock = RunLock(tmp_path)
    assert lock.take() and not RunLock(tmp_path).take()  # a second lock on the folder is refused
    started_r, started_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: lives on while the parent lets go, until the parent has looked
        os.close(done_w)
        os.write(started_w, b"x")  # its own code runs after the fork hooks
        os.read(done_r, 1)  # until the parent closes its end
        os._exit(0 if lock.fd is None else 1)
    try:
        os.close(done_r)
        assert os.read(started_r, 1) == b"x"
        lock.release()
        other = RunLock(tmp_path)
        assert other.take() and other.fd is not None  # while the child still runs
        other.release()
    finally:
        os.close(done_w)
        _, status = os.waitpid(pid, 0)
        os.close(started_r), os.close(started_w)
    assert os.waitstatus_to_exitcode(status) == 0

def test_a_ctrl_c_that_aborts_says_where_the_last_checkpoint_is_without_a_traceback(trained, tmp_path, monkeypatch,
                                                                                   capsys):
    """A Ctrl-C after a first signal stops at once (a KeyboardInterrupt through the run): train.py ends with 130
    and a line naming the checkpoint that stays, as a Ctrl-C before training ends with one line too."""
    import train

    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained[0] / "run"), str(run)], check=True)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run_training", interrupted)
    assert train.cli(["--resume", str(run), "--epochs", "3"]) == 130
    assert capsys.readouterr().err == (f"error: interrupted, so stopped at once; {run / 'checkpoint.pt'} holds the "
                                       f"last checkpoint: continue with python train.py --resume {run}\n")
    assert train.cli(["--config", str(trained[0] / "tiny.yaml"), "--output_dir", str(tmp_path / "new")]) == 130
    assert capsys.readouterr().err == "error: interrupted, so stopped at once\n"


def test_a_new_run_whose_folder_another_train_py_locked_meanwhile_is_refused_before_writing(trained, tmp_path,
                                                                                          monkeypatch, capsys):
    """Two new runs on a folder that does not exist yet: both pass the check at the start, and the second to reach
    its first write must stop there, not delete the first one's files and train beside it."""
    fcntl = pytest.importorskip("fcntl")
    import train

    new, fds, prepare = tmp_path / "new", [], train.prepare_data

    def meanwhile(*args, **kwargs):  # the other train.py creates the folder and locks it during this one's data
        data = prepare(*args, **kwargs)
        new.mkdir()
        (new / "config.yaml").write_text("theirs")
        fds.append(os.open(new, os.O_RDONLY))
        fcntl.flock(fds[0], fcntl.LOCK_EX)
        return data

    monkeypatch.setattr(train, "prepare_data", meanwhile)
    try:
        assert train.cli(["--config", str(trained[0] / "tiny.yaml"), "--output_dir", str(new), "--epochs", "1"]) == 2
    finally:
        for fd in fds:
            os.close(fd)
    assert f"error: another train.py is training the run in {new}" in capsys.readouterr().err
    assert [p.name for p in new.iterdir()] == ["config.yaml"] and (new / "config.yaml").read_text() == "theirs"


@pytest.mark.parametrize("found", [False, True])
def test_prepare_data_syncs_every_process_before_the_synthetic_set_is_written(tmp_path, monkeypatch, found):
    """Under torchrun every process looks for the synthetic set before the main one writes it (rank 1 once found
    val.csv written and train.csv not yet, and refused), and every process passes the same barriers, whatever
    it found, so that their collectives pair up."""
    import train
    import vqa.synth
    from vqa.config import load_config
    from vqa.distributed import Processes

    cfg = load_config(tiny_config(tmp_path))
    if found:
        train.prepare_data(cfg, Processes())
    events, generate = [], vqa.synth.generate
    monkeypatch.setattr(train.distributed, "barrier", lambda procs: events.append("barrier"))
    monkeypatch.setattr(train.distributed, "gather", lambda found, procs: events.append("gather") or [found, {}])
    monkeypatch.setattr(vqa.synth, "generate", lambda *a, **k: (events.append("generate"), generate(*a, **k)))
    for rank in (0, 1):
        events.clear()
        train.prepare_data(cfg, Processes(rank, 2))
        written = not found and rank == 0
        checks = ["gather", "gather"]  # the images of each split, checked in shares
        assert events == (["barrier", "generate", "barrier"] if written else ["barrier", "barrier"]) + checks
        found = True  # rank 0 wrote it


def test_the_commands_train_py_prints_run_from_the_folder_it_was_started_in(tmp_path, monkeypatch):
    """Advice such as 'continue with python train.py --resume RUN' names train.py as the shell reaches it from the
    working folder: by its name in the checkout, by its whole path elsewhere (a run started from another folder)."""
    from vqa.run_files import train_command

    monkeypatch.chdir(ROOT)
    assert train_command("--resume", "runs/a b") == "python train.py --resume 'runs/a b'"
    monkeypatch.chdir(tmp_path)
    command = shlex.split(train_command("--resume", "run", processes=2))
    assert command[:3] == ["torchrun", "--nproc_per_node", "2"] and command[4:] == ["--resume", "run"]
    assert Path(command[3]) == ROOT / "train.py" and Path(command[3]).is_file()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_run_that_trained_in_the_folder_while_a_new_run_read_its_data_is_not_deleted(tmp_path, monkeypatch, capsys,
                                                                                       one_block, overwrite):
    """The folder did not exist when the new run looked for a run there, so it held no lock; another train.py
    trained there, and ended, while the new run read its data: without --overwrite its files must stay."""
    import train

    run = tmp_path / "run"
    other = {"checkpoint.pt": b"the other run's checkpoint", "metrics.jsonl": b'{"epoch": 1}\n',
             "config.yaml": b"the other run's config\n"}
    prepare = train.prepare_data

    def another_run_trains_meanwhile(*args, **kwargs):
        data = prepare(*args, **kwargs)
        run.mkdir()
        for name, content in other.items():
            (run / name).write_bytes(content)
        return data

    monkeypatch.setattr(train, "prepare_data", another_run_trains_meanwhile)
    config = tiny_config(tmp_path, epochs=1)
    assert not run.exists()
    # --overwrite too: it replaces the run the folder held at the start (none), not one it never saw.
    assert train.cli(["--config", str(config), *overwrite]) == 2
    assert f"error: {run} holds a run already (checkpoint.pt, metrics.jsonl)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == other


def test_export_to_a_folder_named_like_the_file_is_a_clear_error_even_with_overwrite(trained, tmp_path, capsys):
    """--overwrite replaces a file: a folder at --out was a ValueError's traceback from the atomic write."""
    from vqa.export import main as export

    tmp, _ = trained
    out = tmp_path / "encoder.safetensors"
    (out / "inside").mkdir(parents=True)
    assert export(["--run", str(tmp / "run"), "--out", str(out), "--overwrite"]) == 2
    assert f"error: --out '{out}' exists and is not a file" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["inside"]


def test_a_synthetic_run_whose_train_csv_is_a_folder_is_a_clear_error(tmp_path, capsys, one_block):
    """synthetic on and train_csv no file: generation wrote the images, then its atomic write of train.csv
    refused the folder with a ValueError's traceback."""
    import train

    (tmp_path / "data" / "train.csv").mkdir(parents=True)
    assert train.cli(["--config", str(tiny_config(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert f"error: config key 'synthetic' is on and train_csv '{tmp_path / 'data' / 'train.csv'}' is not a file" in err
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["train.csv"]  # nothing generated


def test_resume_naming_the_same_files_by_other_paths_leaves_config_yaml_as_it_was(trained, tmp_path, capsys):
    """A resume that changes nothing, its run folder and data named by other spellings of the same paths
    (through '..' or '.'), leaves config.yaml byte for byte as it was: those are not new settings."""
    import train

    run = copied_run(trained, tmp_path)
    assert train.cli(["--resume", str(run)]) == 0  # the copy's own output_dir: the one change there is
    before = run_bytes(run)
    (tmp_path / "sub").mkdir()
    data = trained[0] / "data"
    assert train.cli(["--resume", str(tmp_path / "sub" / ".." / "run"), "--train_csv", str(data / "." / "train.csv"),
                      "--val_csv", str(data / ".." / "data" / "val.csv")]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert run_bytes(run) == before


def test_a_checkpoint_path_that_is_a_folder_is_an_error_line_not_a_traceback(tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    import train

    code = train.cli(["--config", str(tiny_config(tmp_path)), "--checkpoint_path", str(tmp_path),
                      "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and f"error: checkpoint file '{tmp_path}' is a folder" in err
    assert not (tmp_path / "run").exists()


def test_a_runs_checkpoint_path_replaced_by_a_folder_is_called_a_folder(tmp_path):
    from vqa.config import RunConfig
    from vqa.errors import VQAError
    from vqa.run_files import load_run
    from vqa.text import AnswerVocab, Tokenizer

    run, base = tmp_path / "run", tmp_path / "base.safetensors"
    run.mkdir()
    base.mkdir()  # the file the run started from, replaced by a folder of the same name
    cfg = RunConfig()
    cfg.model.checkpoint_path = str(base)
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "tokenizer.json").write_text(Tokenizer.build(["what color"], max_length=8).to_json())
    (run / "answers.json").write_text(AnswerVocab.build(["red"]).to_json())
    (run / "model_last.safetensors").write_bytes(b"")
    with pytest.raises(VQAError, match=r"'.*base.safetensors', the checkpoint_path .* is a folder, not the weights file"):
        load_run(run, tool="python -m vqa.predict")


def test_unfreezing_more_blocks_than_the_backbone_has_names_the_key_and_the_depth(tmp_path, capsys, one_block):
    import train

    assert train.cli(["--config", str(tiny_config(tmp_path)), "--unfreeze_encoder_layers", "2"]) == 2
    err = capsys.readouterr().err
    assert "error: config key 'unfreeze_encoder_layers' is 2, but vit_small_patch14_dinov2 has 1 block; give at most " \
           "1" in err
    assert "unfreeze_last" not in err  # the library's own argument name, which the user never set
    assert not (tmp_path / "run").exists()
    assert train.cli(["--config", str(tiny_config(tmp_path)), "--unfreeze_encoder_layers", "1", "--epochs", "1"]) == 0


def test_a_stdout_that_is_gone_at_an_epochs_end_loses_no_training(tmp_path, monkeypatch):
    """`train.py ... | head` closes the pipe: the epoch's line then fails to print. The epoch's weights and
    checkpoint are saved before it, so the run resumes after that epoch rather than from nothing."""
    sys.path.insert(0, str(ROOT))
    import train
    from vqa.config import load_config

    def closed_pipe(*args, **kwargs):
        if str(args[0]).startswith("epoch "):
            raise BrokenPipeError(32, "Broken pipe")

    cfg = load_config(tiny_config(tmp_path, epochs=2))
    monkeypatch.setattr(train, "print", closed_pipe, raising=False)
    with pytest.raises(BrokenPipeError):
        train.main(cfg)
    run = Path(cfg.train.output_dir)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert (run / "model_last.safetensors").is_file()


def test_evaluate_says_how_many_answers_the_run_never_trained_on(trained, tmp_path, capsys):
    """Such a question counts as wrong whatever the model says: the tool says how many there are, which explains
    a low score at once."""
    import vqa.evaluate
    from vqa.run_files import load_vocabularies

    tmp, _ = trained
    header, *rows = (tmp / "data" / "val.csv").read_text().splitlines()
    _, answers = load_vocabularies(tmp / "run")
    rows[0] = ",".join([*rows[0].split(",")[:2], "purple elephant", *rows[0].split(",")[3:]])
    unseen = sum(answers.id(row.split(",")[2]) < 0 for row in rows)  # the elephant and any the run never saw
    assert unseen >= 1
    csv = tmp_path / "val.csv"
    csv.write_text("\n".join([header] + [str(tmp / "data" / row) for row in rows]) + "\n")
    assert vqa.evaluate.main(["--run", str(tmp / "run"), "--csv", str(csv), "--allow_outside_paths"]) == 0
    out = capsys.readouterr().out
    assert f"{unseen} of {len(rows)} question(s) ({100 * unseen / len(rows):.1f}%) have an answer the " \
           f"run never trained on, which counts as wrong" in out


def test_a_finished_run_ends_with_the_commands_that_read_it(trained, tmp_path, capsys):
    """The last lines name the run folder and the evaluate, predict and export commands for it, which run as
    printed (evaluate here; predict once its placeholders are filled in)."""
    import vqa.evaluate
    import vqa.predict

    tmp, result = trained
    run = tmp / "run"
    tail = result.stdout.split(f"the run is in {run}; next:\n")[1].splitlines()
    commands = [shlex.split(line) for line in tail]
    assert [c[:3] for c in commands] == [["python", "-m", f"vqa.{tool}"] for tool in ("evaluate", "predict", "export")]
    assert all(c[3:5] == ["--run", str(run)] for c in commands)
    assert vqa.evaluate.main(commands[0][3:]) == 0
    assert "overall" in capsys.readouterr().out
    image = str(tmp / "data" / "images" / "val_00000.png")
    filled = [{"IMAGE": image, "QUESTION": "How many circles are there?"}.get(word, word) for word in commands[1][3:]]
    assert vqa.predict.main(filled) == 0
    assert commands[2][5:] == ["--out", str(run / "encoder.safetensors")]


def test_unfreeze_encoder_layers_trains_the_last_blocks_and_saves_them_with_the_run(tmp_path, one_block):
    """unfreeze_encoder_layers N trains the backbone's last N blocks and its final norm beside the adapters: the
    run's weights hold them, moved away from the base weights the run started from, and the layers before them
    (the patch embedding) stay frozen and out of the run's weights."""
    import train

    assert train.cli(["--config", str(tiny_config(tmp_path)), "--unfreeze_encoder_layers", "1", "--epochs", "1"]) == 0
    run = tmp_path / "run"
    weights, base = load_file(run / "model_last.safetensors"), load_file(run / "backbone.safetensors")
    unfrozen = [k for k in base if k.startswith(("blocks.0.", "norm."))]
    assert unfrozen and all(f"backbone.{k}" in weights for k in unfrozen)
    assert not any(k.startswith("backbone.patch_embed.") for k in weights)
    assert any(not torch.equal(weights[f"backbone.{k}"], base[k]) for k in unfrozen)


def test_every_training_step_runs_the_model_in_training_mode(tmp_path, monkeypatch, one_block):
    """Dropout and BatchNorm's running statistics act in every training step, in an epoch after a validation
    (which runs the model in eval mode) too."""
    import train
    import vqa.model
    from vqa.config import load_config

    models, build = [], train.build_model
    monkeypatch.setattr(train, "build_model", lambda *a, **k: models.append(build(*a, **k)) or models[-1])
    modes, real = [], train.F.cross_entropy
    steps = (train.__file__, vqa.model.__file__)  # the type loss, and the answer loss (vqa.model.answer_loss)

    def recording(*args, **kwargs):
        if sys._getframe(1).f_code.co_filename in steps and torch.is_grad_enabled():  # the step's losses only
            modes.append(all(m.training for m in models[0].modules()))
        return real(*args, **kwargs)

    monkeypatch.setattr(train.F, "cross_entropy", recording)
    train.main(load_config(tiny_config(tmp_path, epochs=2)))
    assert len(modes) == 8 and all(modes)  # 2 epochs of 2 steps, each an answer loss and a type loss


def test_a_fork_after_a_run_released_its_lock_runs_the_fork_hook_cleanly(tmp_path, monkeypatch):
    """A lock released (its run ended) is no longer the fork hook's: a loader worker forked later closes the
    copies of the locks still held, with no error for the released one, whose descriptor is gone."""
    pytest.importorskip("fcntl")
    from vqa.run_lock import RunLock

    errors = []
    monkeypatch.setattr(sys, "unraisablehook", errors.append)  # where an at-fork hook's exception goes
    (tmp_path / "ended").mkdir()
    (tmp_path / "held").mkdir()
    ended, held = RunLock(tmp_path / "ended"), RunLock(tmp_path / "held")
    assert ended.take() and held.take()
    ended.release()
    try:
        pid = os.fork()
        if pid == 0:  # the child: its hooks have run
            os._exit(0 if not errors and held.fd is None else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not errors and held.fd is not None  # the parent keeps its lock
    finally:
        held.release()


@pytest.mark.parametrize("key, value, names", [("question_layers", 2, "question_encoder."),
                                               ("unfreeze_encoder_layers", 1, "backbone.blocks.1.")])
def test_a_run_whose_config_yaml_was_edited_since_it_trained_is_refused_by_the_tools_and_by_resume(
        trained, tmp_path, capsys, key, value, names):
    """Before, the tools ran the layers the edit added with their random initialisation, silently, and a resume
    failed in the optimizer's load_state_dict with a traceback."""
    sys.path.insert(0, str(ROOT))
    import train
    from vqa.run_files import load_run

    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained[0] / "run"), str(run)], check=True)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"][key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    message = (rf"'{re.escape(str(run))}/model_best\.safetensors' holds no weights for '{re.escape(names)}[^']*', "
               rf"which the model built from the run's config\.yaml trains: the config's model settings differ "
               rf"from the ones the run trained with \(was config\.yaml edited\?\); put them back")
    with pytest.raises(VQAError, match=message):
        load_run(run)
    assert train.cli(["--resume", str(run), "--epochs", "3"]) == 2
    assert re.search(message.replace("model_best\\.safetensors", "checkpoint\\.pt"), capsys.readouterr().err)


def test_a_resume_whose_config_yaml_splits_a_learning_rate_is_an_error_not_a_traceback(trained, tmp_path, capsys):
    """The run trained with lr = lr_encoder, one optimizer group for both: lr_encoder edited apart makes two."""
    sys.path.insert(0, str(ROOT))
    import train

    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained[0] / "run"), str(run)], check=True)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["lr_encoder"] == config["train"]["lr"]
    config["train"]["lr_encoder"] = 2 * config["train"]["lr"]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert train.cli(["--resume", str(run), "--epochs", "3"]) == 2
    assert re.match(rf"error: {re.escape(str(run))}/checkpoint\.pt: its optimizer state does not fit the parameter "
                    rf"groups the run's config\.yaml gives \(.*\); was config\.yaml edited\? put its settings back\n$",
                    capsys.readouterr().err)


def test_weights_for_a_layer_the_model_keeps_frozen_are_refused_and_nothing_is_copied():
    from vqa.run_files import copy_weights

    class Model(torch.nn.Linear):
        def trainable_state_dict(self):
            return {"weight": self.weight}

    model = Model(2, 2)
    before = model.bias.detach().clone()
    with pytest.raises(VQAError, match=r"'w\.safetensors' holds trained weights for 'bias', which the model built from "
                                       r"the run's config\.yaml keeps frozen"):
        copy_weights(model, {"weight": torch.zeros(2, 2), "bias": torch.ones(2)}, Path("w.safetensors"))
    assert torch.equal(model.bias, before) and not torch.equal(model.weight, torch.zeros(2, 2))
    copy_weights(model, {"weight": torch.zeros(2, 2)}, Path("w.safetensors"))
    assert torch.equal(model.weight, torch.zeros(2, 2))


def test_a_weights_file_that_may_not_be_read_says_so_and_a_missing_one_names_the_other(trained, tmp_path,
                                                                                        monkeypatch):
    import vqa.run_files
    from vqa.run_files import load_weights, weights_file

    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained[0] / "run"), str(run)], check=True)
    real = os.access
    monkeypatch.setattr(vqa.run_files.os, "access", lambda path, mode: path != run / "model_best.safetensors"
                        and real(path, mode))  # as a file of another user's, mode 600 (root may read anything)
    with pytest.raises(VQAError, match=r"cannot read weights file '.*model_best\.safetensors' \(permission denied\); "
                                       r"check its permissions"):
        load_weights(None, run / "model_best.safetensors")
    (run / "model_last.safetensors").unlink()
    with pytest.raises(VQAError, match=r"has no model_last\.safetensors, which train\.py wrote at the end of each "
                                       r"epoch: it was moved or deleted; model_best\.safetensors is there "
                                       r"\(--which best\)"):
        weights_file(run, "last")


def test_a_path_the_system_will_not_look_at_is_an_error_line_not_a_traceback(tmp_path, capsys):
    """Python 3.11's Path.exists() raises for a name too long, as for a path in a folder the user may not enter."""
    sys.path.insert(0, str(ROOT))
    import train
    from vqa.cli import run_tool
    from vqa.answer_weights import main as answer_weights_main

    long = tmp_path / ("a" * 300)
    said = f"error: cannot get at '{long}' (File name too long); check the path, and the permissions of the file " \
           f"and of the folders on it\n"
    with pytest.raises(SystemExit) as end:
        run_tool(lambda: answer_weights_main(["--train_csv", str(long), "--out", str(tmp_path / "w.json")]))
    assert end.value.code == 2 and capsys.readouterr().err == said
    assert train.cli(["--config", str(long)]) == 2 and capsys.readouterr().err == said


def test_the_best_weights_are_written_after_the_checkpoint_and_a_resume_copies_those_a_stop_left_out(tmp_path,
                                                                                                     monkeypatch):
    """Written before the checkpoint, a kill between the two left model_best holding an epoch the resume trained
    again; written after it, a kill leaves the epoch in model_last, which the resume copies to model_best."""
    sys.path.insert(0, str(ROOT))
    import lora
    import train

    config = tiny_config(tmp_path, epochs=2)
    run = tmp_path / "run"
    save = lora.save_safetensors

    def stopped_at_the_best(tensors, path, metadata=None):
        if Path(path).name == "model_best.safetensors":
            assert torch.load(run / "checkpoint.pt", weights_only=True)["best_epoch"] == 1  # the checkpoint came first
            raise KeyboardInterrupt
        return save(tensors, path, metadata)

    monkeypatch.setattr(lora, "save_safetensors", stopped_at_the_best)
    assert train.cli(["--config", str(config)]) == 128 + signal.SIGINT
    assert not (run / "model_best.safetensors").exists() and (run / "model_last.safetensors").is_file()
    monkeypatch.setattr(lora, "save_safetensors", save)
    assert train.cli(["--resume", str(run), "--epochs", "1"]) == 0  # finished: nothing to train, the copy made
    for kind in ("model", "adapter"):
        assert (run / f"{kind}_best.safetensors").read_bytes() == (run / f"{kind}_last.safetensors").read_bytes()
        assert safe_open(str(run / f"{kind}_best.safetensors"), "pt").metadata()["epoch"] == "1"
