import csv
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vqa.synth import (
    BACKGROUND,
    COLORS,
    CSV_HEADER,
    GRID,
    QUADRANTS,
    SYNTH_TYPES,
    SHAPES,
    SceneObject,
    generate,
    main,
    make_questions,
    make_scene,
    quadrant,
    render_scene,
)

ROOT = Path(__file__).resolve().parents[1]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def by_image(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    groups: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(row["image"], []).append(row)
    return groups


def read_scene(path: Path) -> dict[str, tuple[str, str]]:
    """``{color: (shape, quadrant)}`` recovered from the PNG's pixels alone.

    Shapes are told apart by how much of their bounding box they fill: a square all of it, a circle
    about pi/4, a triangle about half (at 112 px the measured ranges are 1.0, 0.76-0.80, 0.50-0.53).
    """
    pixels = np.asarray(Image.open(path).convert("RGB"))
    cell = pixels.shape[0] // GRID
    masks = {color: (pixels == rgb).all(-1) for color, rgb in COLORS.items()}
    background = (pixels == BACKGROUND).all(-1)
    assert (background | np.logical_or.reduce(list(masks.values()))).all(), "a pixel outside the palette"
    scene = {}
    for color, mask in masks.items():
        ys, xs = np.nonzero(mask)
        if len(ys) == 0:
            continue
        cells = set(zip((ys // cell).tolist(), (xs // cell).tolist()))
        assert len(cells) == 1, f"{color} pixels spread over cells {cells} in {path.name}"
        ((row, col),) = cells
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
        scene[color] = (shape, quadrant(row, col))
    return scene


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    kwargs = dict(train_images=12, val_images=4, image_size=64)
    a = generate(tmp_path / "a", seed=3, **kwargs)
    b = generate(tmp_path / "b", seed=3, **kwargs)
    c = generate(tmp_path / "c", seed=4, **kwargs)
    for csv_a, csv_b, csv_c in zip(a, b, c):
        assert csv_a.read_bytes() == csv_b.read_bytes()
        assert csv_a.read_bytes() != csv_c.read_bytes()
    images_a = sorted((tmp_path / "a" / "images").iterdir())
    assert len(images_a) == 16
    for image in images_a:
        assert image.read_bytes() == (tmp_path / "b" / "images" / image.name).read_bytes()
    assert any(image.read_bytes() != (tmp_path / "c" / "images" / image.name).read_bytes() for image in images_a)


def test_split_sizes_do_not_change_other_images(tmp_path):
    small = generate(tmp_path / "small", train_images=6, val_images=3, image_size=32)
    large = generate(tmp_path / "large", train_images=6, val_images=8, image_size=32)
    assert small[0].read_bytes() == large[0].read_bytes()
    # Per-image streams: growing a split keeps its first images and questions.
    assert read_rows(large[1])[: 3 * len(SYNTH_TYPES)] == read_rows(small[1])
    # The splits draw from different streams.
    train, val = read_rows(small[0]), read_rows(small[1])
    assert [r["question"] for r in train[:15]] != [r["question"] for r in val[:15]]


def test_csv_layout(tmp_path):
    train_csv, val_csv = generate(tmp_path, train_images=7, val_images=3, image_size=32)
    assert (train_csv, val_csv) == (tmp_path / "train.csv", tmp_path / "val.csv")
    for path, split, n in ((train_csv, "train", 7), (val_csv, "val", 3)):
        assert path.read_text(encoding="utf-8").splitlines()[0] == ",".join(CSV_HEADER)
        rows = read_rows(path)
        assert len(rows) == n * len(SYNTH_TYPES)
        groups = by_image(rows)
        assert list(groups) == [f"images/{split}_{i:05d}.png" for i in range(n)]
        for image, group in groups.items():
            assert [r["question_type"] for r in group] == list(SYNTH_TYPES)
            assert (tmp_path / image).is_file()
    assert not list(tmp_path.glob("**/*.tmp")), "temporary files left behind"


def test_every_answer_matches_the_rendered_pixels(tmp_path):
    train_csv, _ = generate(tmp_path, train_images=20, val_images=0, seed=1, image_size=112)
    for image, group in by_image(read_rows(train_csv)).items():
        scene = read_scene(tmp_path / image)
        assert 3 <= len(scene) <= 5
        shapes = Counter(shape for shape, _ in scene.values())
        color_q, shape_q, location_q, count_q, yes_no_q = group

        asked = color_q["question"].removeprefix("What color is the ").removesuffix("?")
        assert shapes[asked] == 1, f"{image}: asked the color of a {asked}, which is not unique"
        assert scene[color_q["answer"]][0] == asked

        color = shape_q["question"].removeprefix("What shape is the ").removesuffix(" object?")
        assert scene[color][0] == shape_q["answer"]

        color = location_q["question"].removeprefix("Where is the ").removesuffix(" object?")
        assert scene[color][1] == location_q["answer"]

        shape = count_q["question"].removeprefix("How many ").removesuffix("s are there?")
        assert shape in SHAPES
        assert count_q["answer"] == str(shapes[shape])

        color, shape = yes_no_q["question"].removesuffix("?").split()[-2:]
        present = color in scene and scene[color][0] == shape
        assert yes_no_q["answer"] == ("yes" if present else "no")


@pytest.mark.parametrize("image_size", [32, 112])
def test_make_scene_invariants(image_size):
    cell = image_size // GRID
    sizes = Counter()
    for i in range(300):
        objects = make_scene(random.Random(i), image_size)
        sizes[len(objects)] += 1
        assert len({(o.row, o.col) for o in objects}) == len(objects)
        assert len({o.color for o in objects}) == len(objects)
        assert 1 in Counter(o.shape for o in objects).values()
        for o in objects:
            x0, y0, x1, y1 = o.box
            assert o.col * cell <= x0 <= x1 < (o.col + 1) * cell
            assert o.row * cell <= y0 <= y1 < (o.row + 1) * cell
            # 0.55-0.8 of the cell, give or take the pixel grid.
            assert 0.55 * cell - 1 <= x1 - x0 + 1 <= 0.8 * cell + 1
    assert set(sizes) == {3, 4, 5}


def test_render_draws_each_object_in_its_colour_inside_its_box():
    for i in range(20):
        objects = make_scene(random.Random(i), 64)
        pixels = np.asarray(render_scene(objects, 64))
        assert pixels.shape == (64, 64, 3)
        for o in objects:
            x0, y0, x1, y1 = o.box
            assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == COLORS[o.color]
            ys, xs = np.nonzero((pixels == COLORS[o.color]).all(-1))
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == o.box
        covered = sum((pixels == COLORS[o.color]).all(-1).sum() for o in objects)
        assert covered + (pixels == BACKGROUND).all(-1).sum() == 64 * 64


def test_questions_follow_from_the_scene():
    rng = random.Random(0)
    for _ in range(300):
        objects = make_scene(rng, 32)
        questions = make_questions(objects, rng)
        assert [t for _, _, t in questions] == list(SYNTH_TYPES)
        by_color = {o.color: o for o in objects}
        shapes = Counter(o.shape for o in objects)
        (cq, ca, _), (sq, sa, _), (lq, la, _), (nq, na, _), (yq, ya, _) = questions
        asked = cq.removeprefix("What color is the ").removesuffix("?")
        assert shapes[asked] == 1 and by_color[ca].shape == asked
        assert by_color[sq.removeprefix("What shape is the ").removesuffix(" object?")].shape == sa
        obj = by_color[lq.removeprefix("Where is the ").removesuffix(" object?")]
        assert la == quadrant(obj.row, obj.col) and la in QUADRANTS
        assert na == str(shapes[nq.removeprefix("How many ").removesuffix("s are there?")])
        color, shape = yq.removesuffix("?").split()[-2:]
        assert ya == ("yes" if color in by_color and by_color[color].shape == shape else "no")


def test_make_questions_rejects_a_scene_without_a_unique_shape():
    objects = [SceneObject(c, "circle", 0, i, (0, 0, 1, 1)) for i, c in enumerate(["red", "blue"])]
    with pytest.raises(ValueError, match="exactly once"):
        make_questions(objects, random.Random(0))


def test_quadrant():
    assert [quadrant(r, c) for r, c in [(0, 0), (1, 2), (2, 1), (3, 3)]] == list(QUADRANTS)


def test_yes_no_is_balanced_and_no_covers_both_kinds_of_absence(tmp_path):
    train_csv, _ = generate(tmp_path, train_images=200, val_images=0, image_size=32)
    yes_no = [r for r in read_rows(train_csv) if r["question_type"] == "yes/no"]
    assert len(yes_no) == 200
    share = sum(r["answer"] == "yes" for r in yes_no) / len(yes_no)
    assert 0.4 <= share <= 0.6
    # A "no" may name a colour that is in the scene with another shape, or one that is absent.
    kinds = set()
    for image, group in by_image(read_rows(train_csv)).items():
        color, _ = group[4]["question"].removesuffix("?").split()[-2:]
        if group[4]["answer"] == "no":
            kinds.add(color in read_scene(tmp_path / image))
    assert kinds == {True, False}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(train_images=-1), "train_images must be >= 0"),
        (dict(val_images=-5), "val_images must be >= 0"),
        (dict(image_size=30), "multiple of 4"),
        (dict(image_size=28), ">= 32"),
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tmp_path, **kwargs)
    assert not (tmp_path / "train.csv").exists()


def test_cli_bad_arguments_exit_2_without_a_traceback(tmp_path):
    # One real subprocess: `python -m vqa.synth` imports torch, which takes seconds, so the other CLI
    # cases below call main() in-process.
    result = subprocess.run(
        [sys.executable, "-m", "vqa.synth", "--out", str(tmp_path), "--image-size", "30"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and "multiple of 4" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_path_the_console_cannot_encode_prints_escaped_after_the_work(tmp_path):
    """Every tool's entry point (``run_tool``) lets stdout escape what its encoding lacks, as stderr does."""
    out = tmp_path / "données"
    result = subprocess.run(
        [sys.executable, "-m", "vqa.synth", "--out", str(out), "--train-images", "2", "--val-images", "1"],
        cwd=ROOT, capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "ascii"},
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode("ascii").endswith(f"to {str(out).encode('ascii', 'backslashreplace').decode()}\n")
    assert (out / "val.csv").is_file()


@pytest.mark.parametrize(
    "args", [["--train-images", "-1"], ["--val_images", "-2"], ["--image_size", "20"], [], ["--seed", "x"]]
)
def test_main_bad_arguments_exit_2(tmp_path, capsys, args):
    if args:
        args = ["--out", str(tmp_path), *args]
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own usage errors exit rather than return
        code = e.code
    assert code == 2
    captured = capsys.readouterr()
    assert "error:" in captured.err and captured.out == ""


def test_main_writes_the_data_set(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--train_images", "3", "--val-images", "2", "--image_size", "32", "--seed", "7"]
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert "5 images" in summary and "25 questions" in summary and str(out) in summary
    expected = generate(tmp_path / "api", train_images=3, val_images=2, seed=7, image_size=32)
    assert (out / "train.csv").read_bytes() == expected[0].read_bytes()
    assert (out / "val.csv").read_bytes() == expected[1].read_bytes()


def test_main_replaces_a_data_set_only_with_overwrite(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--train_images", "2", "--val-images", "1", "--image_size", "32"]
    assert main(args) == 0
    before = (tmp_path / "train.csv").read_bytes()
    assert main([*args, "--seed", "1"]) == 2
    assert "holds a data set already (train.csv, val.csv); add --overwrite" in capsys.readouterr().err
    assert (tmp_path / "train.csv").read_bytes() == before
    assert main([*args, "--seed", "1", "--overwrite"]) == 0
    assert (tmp_path / "train.csv").read_bytes() != before


@pytest.mark.parametrize("during", ["images", "csv"])
def test_a_generation_cut_short_leaves_no_csv_to_train_on(tmp_path, monkeypatch, during):
    import vqa.synth

    def interrupted(real, is_val):
        def call(path, *args):
            if is_val(path):
                raise KeyboardInterrupt  # Ctrl-C while the validation images or CSV are written
            return real(path, *args)
        return call

    if during == "images":
        monkeypatch.setattr(vqa.synth, "_replace_atomically",
                            interrupted(vqa.synth._replace_atomically, lambda p: p.name.startswith("val_")))
    else:  # the train CSV is written by then, under a temporary name
        monkeypatch.setattr(vqa.synth, "_write_csv", interrupted(vqa.synth._write_csv, lambda p: ".val.csv." in p.name))
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, train_images=3, val_images=2)
    assert (tmp_path / "images" / "train_00002.png").is_file()
    assert not (tmp_path / "train.csv").exists() and not (tmp_path / "val.csv").exists()  # the demo generates again
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_yes_no_question_uses_an_before_a_vowel():
    objects = [SceneObject("orange", "circle", 0, 0, (0, 0, 1, 1)), SceneObject("red", "square", 0, 1, (0, 0, 1, 1))]
    asked = {make_questions(objects, random.Random(i))[4][0] for i in range(40)}
    assert "Is there an orange circle?" in asked and not any(q.startswith("Is there a orange") for q in asked)


def test_an_image_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    generate(tmp_path, train_images=1, val_images=0, image_size=32)
    image = tmp_path / "images" / "train_00000.png"
    before = image.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")  # a full disk or a Ctrl-C part way through the file
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        generate(tmp_path, train_images=1, val_images=0, image_size=32, seed=1)
    assert image.read_bytes() == before
    assert not list(tmp_path.glob("**/*.tmp"))


def test_main_reports_an_unwritable_out_with_exit_2(tmp_path, capsys):
    out = tmp_path / "a_file"
    out.write_text("")
    assert main(["--out", str(out), "--train_images", "1", "--val_images", "0", "--image_size", "32"]) == 2
    assert f"error: cannot write to {out}" in capsys.readouterr().err


def test_render_refuses_an_unknown_shape():
    """A shape it cannot draw would leave an object out of the picture that its questions still ask about."""
    objects = [SceneObject("red", "hexagon", 0, 0, (2, 2, 6, 6))]
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        render_scene(objects, 32)


@pytest.mark.parametrize("seed", ["0", True, 1.0])
def test_generate_refuses_a_seed_that_is_not_an_int(tmp_path, seed):
    with pytest.raises(TypeError, match="seed must be an int"):
        generate(tmp_path, train_images=1, val_images=0, image_size=32, seed=seed)
    assert not (tmp_path / "train.csv").exists()


def test_count_questions_also_ask_about_shapes_the_scene_lacks():
    """'How many triangles are there?' with none has the answer 0, which the data set must teach too."""
    rng = random.Random(0)
    answers = Counter(make_questions(make_scene(rng, 32), rng)[3][1] for _ in range(200))
    assert answers["0"] >= 10 and set(answers) <= {"0", "1", "2", "3", "4", "5"}


def test_shape_and_location_questions_draw_their_objects_independently():
    rng = random.Random(0)
    pairs = []
    for _ in range(200):
        _, (shape_q, _, _), (location_q, _, _), _, _ = make_questions(make_scene(rng, 32), rng)
        pairs.append(shape_q.removeprefix("What shape is the ") == location_q.removeprefix("Where is the "))
    assert 0.1 < sum(pairs) / len(pairs) < 0.5  # the same object about 1 time in 4 (3 to 5 objects)


@pytest.mark.parametrize("present", ["train.csv", "val.csv"])
def test_main_refuses_a_folder_holding_either_csv_without_overwrite(tmp_path, capsys, present):
    (tmp_path / present).write_text("mine")
    assert main(["--out", str(tmp_path), "--train_images", "1", "--val_images", "1", "--image_size", "32"]) == 2
    assert f"holds a data set already ({present}); add --overwrite" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == [present] and (tmp_path / present).read_text() == "mine"


def test_a_path_flag_may_start_at_the_home_folder_and_a_missing_user_is_refused(tmp_path, monkeypatch, capsys):
    """No shell expands the ~ of --out=~/x: the tools do (vqa.cli.user_path, every tool's path flags), and refuse a
    ~user for no user rather than make a folder named so."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["--out=~/synth", "--train_images", "1", "--val_images", "1", "--image_size", "32"]) == 0
    assert (tmp_path / "home" / "synth" / "val.csv").is_file()
    with pytest.raises(SystemExit) as e:
        main(["--out=~no_such_user_here/synth", "--train_images", "1", "--val_images", "1"])
    assert e.value.code == 2
    assert ("argument --out: '~no_such_user_here/synth' starts with '~no_such_user_here', but there is no user "
            "'no_such_user_here'; write the path in full (./~no_such_user_here/synth for a folder named so)"
            in capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_overwrite_replaces_only_a_synthetic_set_and_takes_its_extra_images_with_it(tmp_path, capsys):
    """--overwrite, which the refusal suggests, replaced a user's own train.csv with the shapes; it now refuses
    any CSV this tool did not write. Replacing a larger synthetic set leaves none of its images behind."""
    args = ["--out", str(tmp_path), "--val-images", "1", "--image_size", "32", "--overwrite"]
    assert main([*args, "--train_images", "4"]) == 0
    assert main([*args, "--train_images", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["train_00000.png", "train_00001.png",
                                                                       "val_00000.png"]
    mine = tmp_path / "mine"
    (mine / "pics").mkdir(parents=True)
    (mine / "train.csv").write_text("image,question,answer\npics/cat.jpg,What is it?,cat\n")
    (mine / "pics" / "cat.jpg").write_bytes(b"mine")
    assert main(["--out", str(mine), "--overwrite"]) == 2
    assert "train.csv is not a CSV this tool wrote" in capsys.readouterr().err
    assert (mine / "train.csv").read_text() == "image,question,answer\npics/cat.jpg,What is it?,cat\n"
    assert not (mine / "images").exists()


def test_an_image_size_past_the_minimum_that_the_grid_does_not_divide_is_refused(tmp_path):
    """The image is a GRID x GRID grid of equal cells: a size above the minimum that does not divide into them
    (34) is refused like one below it, before anything is written, not rendered with cells of unequal size."""
    size = 8 * GRID + GRID // 2
    assert size % GRID
    for call in (lambda: generate(tmp_path, train_images=1, val_images=1, image_size=size),
                 lambda: make_scene(random.Random(0), size), lambda: render_scene([], size)):
        with pytest.raises(ValueError, match=f"multiple of {GRID}"):
            call()
    assert not list(tmp_path.iterdir())


def test_overwrite_refuses_a_user_s_csv_in_this_tool_s_layout_and_keeps_its_images(tmp_path, capsys):
    """A user's own data set written in this project's CSV layout (the same header) is still no synthetic set:
    --overwrite refuses it, rather than replacing its CSV and deleting the images it names as left over."""
    (tmp_path / "images").mkdir()
    photo = tmp_path / "images" / "cat.jpg"
    photo.write_bytes(b"mine")
    text = ",".join(CSV_HEADER) + "\nimages/cat.jpg,What is it?,cat,shape\n"
    (tmp_path / "train.csv").write_text(text)
    assert main(["--out", str(tmp_path), "--train_images", "1", "--val_images", "1", "--image_size", "32",
                 "--overwrite"]) == 2
    assert "train.csv is not a CSV this tool wrote" in capsys.readouterr().err
    assert (tmp_path / "train.csv").read_text() == text and photo.read_bytes() == b"mine"


def test_overwrite_takes_a_synthetic_csv_that_a_blank_line_ends(tmp_path):
    """An editor's trailing blank line leaves the set the tool's own: --overwrite still replaces it."""
    args = ["--out", str(tmp_path), "--train_images", "2", "--val-images", "1", "--image_size", "32"]
    assert main(args) == 0
    with open(tmp_path / "train.csv", "a") as f:
        f.write("\n")
    assert main([*args, "--seed", "1", "--overwrite"]) == 0
