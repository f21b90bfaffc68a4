import dataclasses
import faulthandler
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from vqa.config import DataConfig, ModelConfig, RunConfig, TrainConfig, key_help, load_config, parse_overrides
from vqa.errors import VQAError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.yaml", "dinov2_base_vqa.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.model.vision_lora_r == 8 and cfg.model.vision_lora_alpha == 16.0


def test_full_recipe_matches_the_published_settings():
    m = load_config(ROOT / "configs" / "dinov2_base_vqa.yaml").model
    assert (m.vision_model, m.pretrained, m.img_size, m.vision_lora_dropout) == ("vit_base_patch14_dinov2", True, 224, 0.1)


def test_overrides_apply_on_top_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"vision_lora_r": 8}, "train": {"lr": 0.1}}))
    cfg = load_config(path, ["--vision_lora_r", "4", "--lr=3e-4", "--use_type_loss", "--model.img_size", "98",
                             "--answer_weights", "w.json", "--checkpoint_path", "none"])
    assert cfg.model.vision_lora_r == 4 and isinstance(cfg.model.vision_lora_r, int)
    assert cfg.train.lr == 3e-4
    assert cfg.train.use_type_loss is True
    assert cfg.model.img_size == 98
    assert cfg.data.answer_weights == "w.json"
    assert cfg.model.checkpoint_path is None


def test_hyphenated_keys_are_accepted():
    cfg = load_config(None, ["--vision-lora-r", "4", "--model.img-size", "98"])
    assert cfg.model.vision_lora_r == 4 and cfg.model.img_size == 98


def test_an_override_keeps_the_files_other_keys_in_that_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"img_size": 98, "hidden_dim": 64}, "train": {"epochs": 3}}))
    cfg = load_config(path, ["--img_size", "56", "--lr", "0.01"])
    assert (cfg.model.img_size, cfg.model.hidden_dim, cfg.train.epochs, cfg.train.lr) == (56, 64, 3, 0.01)


def test_an_empty_value_clears_an_optional_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"answer_weights": "w.json"}}))
    assert load_config(path, ["--answer_weights="]).data.answer_weights is None


def test_flag_followed_by_a_flag_means_true():
    assert parse_overrides(["--pretrained", "--skip_bad_rows"]) == {
        "model": {"pretrained": "true"}, "data": {"skip_bad_rows": "true"}
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["--not_a_key", "1"], "unknown config key '--not_a_key'"),
        (["--train.vision_lora_r", "4"], "'vision_lora_r' is a key of section 'model', not 'train': --model.vision_lora_r or --vision_lora_r"),
        (["--lr"], "--lr needs a value: --lr VALUE"),
        (["--lr", "--epochs", "3"], "--lr needs a value"),
        (["--vision_lora_r", "four"], "'vision_lora_r' must be int"),
        (["--vision_lora_r", "0"], "'vision_lora_r' must be > 0"),
        (["--vision_lora_alpha", "-1"], "'vision_lora_alpha' must be > 0"),
        (["--vision_lora_dropout", "1.0"], r"'vision_lora_dropout' must be in \[0, 1\)"),
        (["--use_type_loss", "maybe"], "'use_type_loss' must be bool"),
        (["--epochs", "2.5"], "'epochs' must be int"),
        (["stray"], "unexpected argument 'stray'"),
        (["--lr", "inf"], "command line: key 'lr' must be a finite number, got 'inf'"),
        (["--hidden_dim", "30", "--num_heads", "4"], r"'hidden_dim' \(30\) must be divisible by 'num_heads' \(4\)"),
        (["--warmup_ratio", "1"], r"'warmup_ratio' must be in \[0, 1\), got 1\.0"),
        (["--grad_clip", "nan"], "key 'grad_clip' must be a finite number"),  # nan passes every range check
        (["--type_loss_weight", "-inf"], "key 'type_loss_weight' must be a finite number"),
        (["--seed", "-1"], r"'seed' must be in \[0, 2\*\*31\), got -1"),
        (["--seed", "5000000000"], r"'seed' must be in \[0, 2\*\*31\)"),
        (["--seed", "3000000000"], r"'seed' must be in \[0, 2\*\*31\)"),  # fits 2**32, not each process's offset
        (["--dropout", "1.0"], r"'dropout' must be in \[0, 1\)"),
        (["--dropout", "-0.1"], r"'dropout' must be in \[0, 1\)"),
        (["--unfreeze_encoder_layers", "-1"], "'unfreeze_encoder_layers' must be >= 0"),
        (["--lr", "0"], "'lr' must be > 0"),
        (["--lr_encoder", "0"], "'lr_encoder' must be > 0"),
        (["--checkpoint_every", "-1"], "'checkpoint_every' must be >= 0"),
        (["--early_stopping_patience", "-1"], "'early_stopping_patience' must be >= 0"),
        (["--precision", "fp8"], "'precision' must be one of auto, bf16, fp16, fp32, got 'fp8'"),
        (["--num_workers", "-1"], "'num_workers' must be >= 0"),
        (["--question_layers", "-1"], "'question_layers' must be >= 0"),
        (["--epochs", "0"], "'epochs' must be > 0"),
        (["--batch_size", "0"], "'batch_size' must be > 0"),
        (["--max_question_length", "0"], "'max_question_length' must be > 0"),
        (["--synthetic_train_images", "0"], "'synthetic_train_images' must be > 0"),
        (["--warmup_ratio", "-0.1"], r"'warmup_ratio' must be in \[0, 1\)"),
        (["--weight_decay", "-0.01"], "'weight_decay' must be >= 0"),
        (["--grad_clip", "-1"], "'grad_clip' must be >= 0"),
        (["--type_loss_weight", "-0.5"], "'type_loss_weight' must be >= 0"),
        (["--vision_lora_alpha", "0"], "'vision_lora_alpha' must be > 0"),  # scaling 0: the adapters do nothing
    ],
)
def test_bad_overrides_name_the_key(args, message):
    with pytest.raises(VQAError, match=message):
        load_config(None, args)


def test_a_bad_override_is_blamed_on_the_command_line_not_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.1}}))
    with pytest.raises(VQAError, match=r"^command line: key 'lr' must be float, got 'abc'"):
        load_config(path, ["--lr", "abc"])
    assert load_config(path, ["--progress"]).train.progress is True  # a yes/no key alone means true
    with pytest.raises(VQAError, match="is a folder; give the YAML file itself"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"model": {"vision_lora_rank": 8}}, "unknown key 'vision_lora_rank'"),
        ({"model": {"lr": 0.1}}, "unknown key 'lr'; it belongs in section 'train'"),
        ({"lr": 0.1}, "unknown section 'lr'.*put 'lr' under 'train:'"),
        ({"modle": {"img_size": 98}}, r"unknown section 'modle' \(sections: data, model, train\) \(did you mean 'model:'\?\)$"),
        ({"evaluation": {}}, r"unknown section 'evaluation' \(sections: data, model, train\)$"),
        ({"train": [1, 2]}, "section 'train' must be a mapping"),
        ({"model": []}, "section 'model' must be a mapping"),  # before: read as an empty section, the defaults
        ({"data": 0}, "section 'data' must be a mapping"),
        ({"train": ""}, "section 'train' must be a mapping"),
        ({"train": {"epochs": True}}, "'epochs' must be int"),
        ({"train": {"epochs": 2.5}}, r"'epochs' must be int, got 2\.5 \(float\)"),  # YAML's float: never narrowed
    ],
)
def test_bad_files_name_the_key(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(VQAError, match=message):
        load_config(path)


def test_a_key_given_twice_in_a_file_is_an_error_not_a_silent_replacement(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  img_size: 28\ntrain:\n  epochs: 2\nmodel:\n  hidden_dim: 32\n")
    with pytest.raises(VQAError, match=r"c\.yaml', line 5: key 'model' appears a second time"):  # plain YAML keeps the last
        load_config(path)
    path.write_text("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    with pytest.raises(VQAError, match=r"line 4: key 'lr' appears a second time"):
        load_config(path)
    path.write_text("model:\n  img_size: 28\ntrain:\n  epochs: 2\n")  # the same keys in other sections are fine
    assert load_config(path).model.img_size == 28


def test_yaml_merge_keys_work_as_in_plain_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  <<: {img_size: 98, hidden_dim: 64}\n  hidden_dim: 32\n  <<: {vision_lora_r: 4}\n")
    cfg = load_config(path)
    assert (cfg.model.img_size, cfg.model.hidden_dim, cfg.model.vision_lora_r) == (98, 32, 4)


def test_a_mapping_as_a_key_is_an_error_not_a_traceback(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  ? {a: 1}\n  : 2\n")
    with pytest.raises(VQAError, match=r"is not valid YAML: a dict cannot be a key\s+in \"<unicode string>\", line 2"):
        load_config(path)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(VQAError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(VQAError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["--lr", "0.002"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


values = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8),
                   st.lists(st.integers(), max_size=2))
keys = st.sampled_from(["lr", "epochs", "vision_lora_r", "vision_lora_dropout", "use_type_loss", "img_size",
                        "train_csv", "answer_weights", "bogus", "device"])


@given(st.dictionaries(st.sampled_from(["data", "model", "train", "other"]), st.dictionaries(keys, values, max_size=3),
                       max_size=3))
@example({"data": {"train_csv": "~\x00"}})
@example({"data": {"answer_weights": "~\ud800"}})
def test_any_config_mapping_gives_a_config_or_our_error(raw):
    try:
        cfg = RunConfig.from_dict(raw)
    except VQAError:
        return
    assert isinstance(cfg, RunConfig)


@given(st.lists(st.sampled_from(["--lr", "--epochs", "--bogus", "1", "x", "--use_type_loss", "true", "-1", "--"]),
                max_size=6))
def test_any_override_list_gives_a_config_or_our_error(args):
    try:
        load_config(None, args)
    except VQAError:
        pass


SECTION_KEYS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


@pytest.mark.parametrize("where", ["file", "--key", "--section.key"])
@pytest.mark.parametrize("key, closest, home", [("vision_lora_rank", "vision_lora_r", "model"), ("zzz_qqq", None, None),
                                               ("batchsize", "batch_size", "train"),
                                               ("checkpoint_everx", "checkpoint_every", "train")])
def test_an_unknown_key_lists_the_valid_keys_and_the_closest_one(tmp_path, where, key, closest, home):
    """Every valid key of the section (demo.yaml sets only some of them), and a suggestion where one is close,
    in the form the user wrote, in its own section where it belongs to another."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {key: 8}} if where == "file" else {}))
    flag = {"file": [], "--key": [f"--{key}", "8"], "--section.key": [f"--model.{key}", "8"]}[where]
    with pytest.raises(VQAError) as error:
        load_config(path, flag)
    message = str(error.value)
    assert ("did you mean" in message) == (closest is not None)
    if closest:
        suggested = {"file": f"'{closest}'" + (f" under {home}:" if home != "model" else ""),
                     "--key": f"'--{closest}'", "--section.key": f"'--{home}.{closest}'"}[where]
        assert f"(did you mean {suggested}?)" in message
    sections = ["data", "model", "train"] if where == "--key" else ["model"]  # a --key alone may be any section's
    for name, section in SECTION_KEYS.items():
        keys = ", ".join(f.name for f in dataclasses.fields(section))
        assert (keys in message) == (name in sections), name
    assert "demo.yaml" not in message


def test_an_empty_section_or_file_gives_the_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\nmodel:\n  img_size: 98\ntrain:\n  # epochs: 3\n")
    cfg = load_config(path)
    assert (cfg.data, cfg.model.img_size, cfg.train) == (DataConfig(), 98, TrainConfig())
    path.write_text("# nothing set yet\n")
    assert load_config(path, ["--epochs", "3"]) == RunConfig(train=TrainConfig(epochs=3))


@pytest.mark.parametrize("text", ["- model\n- train\n", "just words\n", "42\n"])
def test_a_file_holding_no_mapping_is_an_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(VQAError, match="must hold a mapping with sections data, model, train"):
        load_config(path)


@pytest.mark.parametrize("word, value", [("yes", True), ("YES", True), ("1", True), ("True", True),
                                         ("no", False), ("No", False), ("0", False), ("FALSE", False)])
def test_yes_no_words_set_a_yes_no_key(word, value):
    assert load_config(None, ["--skip_bad_rows", word]).data.skip_bad_rows is value
    assert load_config(None, [f"--progress={word}"]).train.progress is value


@pytest.mark.parametrize("text", ["2024", "0001", "010", "1.10", "12:30", "0x10", "1e3", ".5", "-0"])
def test_a_number_for_a_text_key_is_that_text_as_written(tmp_path, text):
    """YAML reads 010 as 8, 1.10 as 1.1 and 12:30 as 750: a run called 010 would train into runs/8."""
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  train_csv: {text}\ntrain:\n  output_dir: runs/{text}\n  device: {text}\n"
                    f"  lr: {'0x10' if text == '0x10' else 0.001}\n")
    cfg = load_config(path)
    assert (cfg.data.train_csv, cfg.train.device) == (text, text)
    assert cfg.train.lr == (16 if text == "0x10" else 0.001)  # a number where the key takes one
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())  # as a run writes its config.yaml, and a resume reads it
    assert load_config(again).data.train_csv == text


def test_a_billion_laughs_of_aliases_in_vision_kwargs_is_read_at_once(tmp_path):
    """Nine levels of aliases, each a list of ten of the one below: about 10**9 numbers, each list looked at once."""
    lines = ["model:", "  vision_kwargs:", "    a0: &a0 [" + ", ".join(["0.1"] * 10) + "]"]
    lines += [f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines + ["    a9: [" + ", ".join(["*a8"] * 9 + [".nan"]) + "]"]) + "\n")
    faulthandler.dump_traceback_later(60, exit=True)  # a walk over every number would not end: fail, not hang
    try:
        with pytest.raises(VQAError, match=r"'a9' must hold finite numbers, got \[\[\[\.\.\.\], \[\.\.\.\], "
                                           r"\[\.\.\.\], \[\.\.\.\], \.\.\.\], "):
            load_config(path)
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_the_last_of_a_repeated_override_wins():
    assert load_config(None, ["--lr", "0.1", "--lr", "0.2"]).train.lr == 0.2
    assert load_config(None, ["--model.img_size", "56", "--img_size=98"]).model.img_size == 98


def test_a_path_may_start_at_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"train_csv": "~/data/train.csv", "val_csv": "data/~/val.csv"}}))
    cfg = load_config(path, ["--output_dir", "~/runs/a", "--checkpoint_path=~/w.safetensors"])
    assert cfg.data.train_csv == str(tmp_path / "home" / "data" / "train.csv")
    assert cfg.data.val_csv == "data/~/val.csv"  # only at the start, as in a shell
    assert cfg.train.output_dir == str(tmp_path / "home" / "runs" / "a")
    assert cfg.model.checkpoint_path == str(tmp_path / "home" / "w.safetensors")
    assert cfg.data.answer_weights is None
    with pytest.raises(VQAError, match="config key 'output_dir': '~no_such_user_here/run' starts with "
                                       "'~no_such_user_here', but there is no user 'no_such_user_here'; write"):
        load_config(path, ["--output_dir", "~no_such_user_here/run"])


def test_with_absolute_paths_anchors_relative_paths_at_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["--train_csv", "d/train.csv", "--val_csv", "/srv/val.csv", "--output_dir", "runs/x",
                             "--answer_weights", "../w.json", "--lr", "0.5"])
    resolved = cfg.with_absolute_paths()
    assert resolved.data.train_csv == str(tmp_path / "d" / "train.csv")
    assert resolved.data.val_csv == "/srv/val.csv"
    assert resolved.data.answer_weights == str(tmp_path / ".." / "w.json")
    assert resolved.train.output_dir == str(tmp_path / "runs" / "x")
    assert resolved.model.checkpoint_path is None and resolved.train.lr == 0.5
    assert cfg.data.train_csv == "d/train.csv"  # a copy: the config itself is as given
    for section in ("data", "model", "train"):  # every other key is the same
        changed = {k for k, v in getattr(cfg, section).__dict__.items() if getattr(getattr(resolved, section), k) != v}
        assert changed <= {"train_csv", "answer_weights", "output_dir"}


def test_unknown_top_level_keys_of_mixed_types_are_a_clear_error(tmp_path):
    # YAML keys need not be strings (1:, ~:); two unknown ones of different types once sorted into a TypeError.
    path = tmp_path / "c.yaml"
    path.write_text("~: x\nfoo: y\n1: z\n")
    with pytest.raises(VQAError, match=r"c.yaml: unknown section '(1|None|foo)' \(sections: data, model, train\)"):
        load_config(path)


@pytest.mark.parametrize("key", ["output_dir", "train_csv", "val_csv"])
def test_an_empty_path_is_an_error_not_the_working_folder(key):
    # Path("") is ".": an empty output_dir trained into the working folder without a word, and an empty CSV
    # path was reported as "CSV file '.' is a folder".
    with pytest.raises(VQAError, match=f"config key '{key}' is empty; give a path"):
        load_config(None, [f"--{key}", ""])


def test_an_empty_path_argument_is_refused_by_the_tools(capsys):
    from vqa.predict import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--run", "", "--image", "x.png", "--question", "What?"])
    assert exit_info.value.code == 2
    assert "argument --run: the path is empty; give a file or folder" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["train:\n  lr: " + "1" * 400, "train:\n  epochs: " + "1" * 400,
                                  "train:\n  epochs: " + "1" * 5000,
                                  "train:\n  output_dir: 2024-13-01", "[" * 5000 + "]" * 5000])
def test_a_value_python_cannot_hold_is_a_clear_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(VQAError, match="c.yaml"):
        load_config(path)


def test_a_long_number_on_the_command_line_is_a_clear_error():
    with pytest.raises(VQAError, match="finite"):
        load_config(None, ["--lr", "1" * 400])
    with pytest.raises(VQAError, match="'epochs' must be below 2\\*\\*63, got a number of 400 digits"):
        load_config(None, ["--epochs", "1" * 400])


def test_a_flag_given_twice_takes_its_last_value_as_argparse_does(tmp_path):
    """An override appended to a command (a shell alias, a script's defaults) replaces the earlier one, whatever
    spelling either uses, as the README says."""
    assert parse_overrides(["--lr", "1e-4", "--train.lr=2e-4"]) == {"train": {"lr": "2e-4"}}
    assert load_config(None, ["--epochs", "1", "--epochs=3"]).train.epochs == 3


def test_a_resume_keeps_the_spelling_of_absolute_saved_paths_only(tmp_path, monkeypatch):
    """with_paths_spelt_as spells a path as the saved config does only where that one is absolute: a relative
    saved path (a run from before config.yaml kept them absolute) gives way to the absolute one resumed with,
    so the config.yaml a resume writes names its files from any folder."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d"
    saved = load_config(None, ["--train_csv", "d/train.csv", "--val_csv", str(data / "val.csv")])
    given = load_config(None, ["--train_csv", "d/train.csv", "--val_csv", "d/../d/val.csv"]).with_absolute_paths()
    spelt = given.with_paths_spelt_as(saved)
    assert Path(spelt.data.train_csv).is_absolute() and Path(spelt.data.train_csv).resolve() == data / "train.csv"
    assert spelt.data.val_csv == saved.data.val_csv  # the same file: spelt as config.yaml has it


def test_a_count_takes_torch_s_largest_int_and_refuses_one_more():
    """Int keys reach torch as int64: 2**63 - 1 is taken, 2**63 (which would overflow there) is refused, naming
    the limit."""
    assert load_config(None, ["--checkpoint_every", str(2**63 - 1)]).train.checkpoint_every == 2**63 - 1
    with pytest.raises(VQAError, match=r"'checkpoint_every' must be below 2\*\*63"):
        load_config(None, ["--checkpoint_every", str(2**63)])


def test_vision_kwargs_come_from_the_file_or_the_command_line_as_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  vision_kwargs:\n    drop_path_rate: 0.1\n    depth: 6\n")
    assert load_config(path).model.vision_kwargs == {"drop_path_rate": 0.1, "depth": 6}
    assert load_config(None).model.vision_kwargs == {}
    # Given again, the mapping replaces the file's whole, as any other value does: what is written is what is built.
    given = load_config(path, ["--vision_kwargs", "{drop_path_rate: 0.2}"])
    assert given.model.vision_kwargs == {"drop_path_rate": 0.2}
    for empty in ("none", "{}", ""):
        assert load_config(path, [f"--vision_kwargs={empty}"]).model.vision_kwargs == {}


@pytest.mark.parametrize("value, message", [
    ("3", "key 'vision_kwargs' must be dict, got 3"),
    ("{depth: [", "key 'vision_kwargs' must be a YAML mapping such as \"{drop_path_rate: 0.1}\""),
    ("{depth: 1, depth: 2}", "key 'vision_kwargs' names 'depth' twice, '{depth: 1, depth: 2}'; give it once"),
    ("{d: 2024-13-01}", "key 'vision_kwargs' must be a YAML mapping"),  # YAML's date constructor: a ValueError
    ("[" * 5000, "key 'vision_kwargs' must be a YAML mapping such as \"{drop_path_rate: 0.1}\", got '[[[["),
    ("{drop_path_rate: .nan}", "'vision_kwargs': 'drop_path_rate' must hold finite numbers, got nan"),
    ("{sizes: [1, .inf]}", "'vision_kwargs': 'sizes' must hold finite numbers, got [1, inf]"),
    ("{x: &a [*a]}", "'vision_kwargs': 'x' holds itself (a YAML alias inside its own anchor); give timm's argument"),
    ("{x: &a {y: [1, *a]}}", "'vision_kwargs': 'x' holds itself"),
    ("{x: [[[[[[.nan]]]]]]}", "'x' must hold finite numbers, got [[[...]]]"),
    ("{class: 1}", "'vision_kwargs' holds 'class', which is no argument name"),
    ("{img_size: 98}", "'vision_kwargs' may not set 'img_size': it is a config key of its own (--img_size)"),
    ("{num_classes: 10}", "'vision_kwargs' may not set 'num_classes': the image encoder has no classifier head"),
    ("{2: 3}", "'vision_kwargs' holds 2, which is no argument name"),
    ("{drop-path: 0.1}", "'vision_kwargs' holds 'drop-path', which is no argument name"),
    ("{depth:2, embed_dim: 32}", "holds 'depth:2', which is no argument name (YAML reads a colon with no space after "
                                 "it as part of a name: write 'depth: 2')"),
])
def test_vision_kwargs_that_timm_could_not_take_or_the_run_sets_itself_are_refused(value, message):
    with pytest.raises(VQAError) as e:
        load_config(None, ["--vision_kwargs", value])
    assert message in str(e.value) and len(str(e.value)) < 300  # a long value is cut short


def test_lora_targets_are_read_in_one_spelling_and_unknown_or_repeated_layers_are_refused(tmp_path):
    assert load_config(None, ["--vision_lora_targets", " fc2,qkv ,proj"]).model.vision_lora_targets == "qkv,proj,fc2"
    assert load_config(None, []).model.vision_lora_targets == "qkv"
    listed = tmp_path / "listed.yaml"
    listed.write_text("model:\n  vision_lora_targets: [fc1, qkv]\n")  # a YAML list of the names is taken too
    assert load_config(listed, []).model.vision_lora_targets == "qkv,fc1"
    assert load_config(None, ["--vision_lora_targets", "[proj, qkv]"]).model.vision_lora_targets == "qkv,proj"
    for value, wrong in (("qkv,mlp", "'mlp' is none of them"), ("qkv,,fc1", "'' is none of them"),
                         ("fc1,fc1", "a layer is named twice"),
                         (" ", r"it names none \(to train without adapters, set use_vision_lora false\)")):
        with pytest.raises(VQAError, match="config key 'vision_lora_targets' names block layers, of qkv, proj, fc1, "
                                           f"fc2, with commas between .*; {wrong}"):
            load_config(None, ["--vision_lora_targets", value])


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def test_key_help_lists_every_key_with_its_field_s_comment_and_default():
    listing = key_help()
    assert {s: [name for name, _, _ in keys] for s, keys in listing.items()} == {
        s: [f.name for f in dataclasses.fields(c)] for s, c in SECTIONS.items()}
    described = {name: (metavar, text) for keys in listing.values() for name, metavar, text in keys}
    assert described["vision_lora_r"] == ("INT", "LoRA rank (default: 8)")
    assert described["vision_kwargs"] == ("MAPPING", "more timm.create_model arguments (default: {})")
    assert described["answer_weights"][0] == "PATH" and described["answer_weights"][1].endswith("(default: none)")
    assert described["use_type_loss"] == ("{true,false}", "add the question-type cross-entropy to the answer loss "
                                                           "(default: false)")
    assert described["lr"][0] == "FLOAT" and described["device"][0] == "TEXT"
    # Every field carries its one-line comment (the house style), and the listing finds each one.
    assert all(not text.startswith("(default:") for _, text in described.values())


def test_key_help_defaults_read_back_as_the_defaults():
    given = []
    for keys in key_help().values():
        for name, _, text in keys:
            given += [f"--{name}", text.rsplit("(default: ", 1)[1][:-1]]
    assert load_config(None, given) == RunConfig()


def test_key_help_without_the_source_gives_the_defaults_alone(monkeypatch):
    import inspect

    def no_source(obj):
        raise OSError("could not get source code")

    monkeypatch.setattr(inspect, "getsource", no_source)
    described = {name: text for keys in key_help().values() for name, _, text in keys}
    assert described["vision_lora_r"] == "(default: 8)" and described["train_csv"] == "(default: data/synth/train.csv)"
