"""What ``train.py --resume`` may change, and the checks that hold a resumed run to the run it continues: its
settings, files, answer classes, training images and number of processes, and each process's random state.
"""
from __future__ import annotations

import dataclasses
import random
import shlex
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig, command_line_value
from .data import CSVData
from .errors import VQAError, preview
from .run_data import generates_synthetic
from .run_files import train_command
from .text import AnswerVocab

__all__ = ["RESUME_MAY_CHANGE", "rng_state", "set_rng_state", "check_resumable", "check_started_here",
           "check_inputs_found", "check_answers_known", "check_same_images", "saved_rngs", "check_same_processes"]


def rng_state() -> dict:
    _, key, pos, has_gauss, gauss = np.random.get_state()  # ("MT19937", key, position, cached normal)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": key.tolist(),
             "numpy_position": [pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    pos, has_gauss, gauss = state.get("numpy_position", (624, 0, 0.0))  # older runs kept the key alone
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# What --resume may change: where things are, how long to train, how to run. The rest is held by the
# checkpoint (the model's shapes, the optimizer's learning rates and weight decay, the schedule) or fixes
# the batch order the saved position points into (batch size, seed).
RESUME_MAY_CHANGE = {
    "train_csv", "val_csv", "answer_weights", "synthetic", "synthetic_train_images", "synthetic_val_images",
    "skip_bad_rows", "allow_outside_paths", "checkpoint_path", "grad_checkpointing", "output_dir", "epochs",
    "early_stopping_patience", "grad_clip", "type_loss_weight", "device", "precision", "checkpoint_every",
    "log_every", "num_workers", "progress",
}


def check_resumable(cfg: RunConfig, saved: RunConfig, source: Path) -> None:
    """Refuses a resume whose overrides change a setting the run cannot take up halfway."""
    for section, values in saved.to_dict().items():
        for key, value in values.items():
            given = getattr(getattr(cfg, section), key)
            if key not in RESUME_MAY_CHANGE and given != value:
                raise VQAError(f"--resume cannot change '{key}' ({value!r} in {source}, {given!r} here): the run's "
                               f"checkpoint or batch order holds it; to change it, start a new run in another "
                               f"--output_dir")
    before, now = saved.model.checkpoint_path, cfg.model.checkpoint_path
    # A pretrained run may take a local copy of the hub's weights (offline, say); a random run has its own
    # base weights in backbone.safetensors, and a run from a file must keep to that file.
    if (before is None) != (now is None) and not (before is None and saved.model.pretrained):
        started = "from that file" if before else "from random weights, kept in backbone.safetensors"
        raise VQAError(f"--resume may move the run's checkpoint_path, not {'drop' if before else 'add'} it ({before!r} "
                       f"in {source}, {now!r} here): the run's base weights came {started}; to train from other "
                       f"weights, start a new run in another --output_dir")


def check_started_here(cfg: RunConfig, saved: RunConfig, source: Path) -> None:
    """Refuses to resume a run from before config.yaml kept its paths absolute where its relative paths would mean
    other files (a synthetic set generated here, say). Its relative output_dir tells: where it leads to the run
    from here, this is the folder the run started in; where the run's path ends in it but it does not lead
    here, the run started elsewhere; where it tells nothing (it is absolute), the files must all be here."""
    relative = saved.relative_paths()
    started = relative.pop("output_dir", None)
    given = cfg.relative_paths()
    kept = {k: v for k, v in relative.items() if given.get(k) == v}  # not given again
    run = Path(cfg.train.output_dir).resolve()
    if not kept or started is not None and Path(started).resolve() == run:
        return
    parts = Path(started).parts if started is not None else ()
    if parts and ".." not in parts and run.parts[-len(parts):] == parts:  # the run's folder less its output_dir
        where = (f"'{Path(*run.parts[:-len(parts)])}' (where the run started if it was not copied or moved since, "
                 f"output_dir '{started}'), not here")
    elif all(Path(v).exists() for v in kept.values()):
        return  # an absolute output_dir, or a run copied or moved since: its files are taken to be these
    else:
        where = "the folder the run started in, and not all of them are here"
    raise VQAError(f"{source} is from before a run's config.yaml kept its paths absolute: its relative path(s) "
                   f"{', '.join(f'{k} {v!r}' for k, v in kept.items())} mean files in {where}; resume from there, "
                   f"or give each as an absolute path (--{next(iter(kept))} /FULL/PATH)")


def check_inputs_found(cfg: RunConfig, source: Path) -> None:
    """Names every file the resumed run reads that is missing, at once, and asks where it is now: a file that
    moved is to be given anew, not made again (the synthetic set excepted, which is made where it is missing)."""
    inputs = {"checkpoint_path": cfg.model.checkpoint_path, "answer_weights": cfg.data.answer_weights,
              **({} if generates_synthetic(cfg) else {"train_csv": cfg.data.train_csv, "val_csv": cfg.data.val_csv})}
    missing = {key: path for key, path in inputs.items() if path is not None and not Path(path).exists()}
    if missing:
        raise VQAError(f"the run reads {', '.join(f'{k} {v!r}' for k, v in missing.items())}, which "
                       f"do{'es' if len(missing) == 1 else ''} not exist (set in {source}, or here); if moved, give "
                       f"where they are now: {' '.join(f'--{k} NEW_PATH' for k in missing)}")


def check_answers_known(rows, answers: AnswerVocab, run: Path, min_count: int = 1) -> None:
    """A resumed run keeps its answer classes: training answers given ``min_count`` times (the run's
    ``min_answer_count``) that are not among them would be left out where the run trained on them."""
    classes = AnswerVocab.build((a for r in rows for a in r.all_answers), min_count)  # as a new run would have them
    unknown = sorted(set(classes.itos) - set(answers.itos))
    if unknown:
        given = f" given min_answer_count ({min_count}) times" if min_count > 1 else ""
        raise VQAError(f"{len(unknown)} training answer(s){given} are not among the run's {len(answers)} answer classes "
                       f"({run / 'answers.json'}), e.g. {preview(unknown)}; a resumed run keeps its classes: "
                       f"train on these answers in a new run (another --output_dir)")


def check_same_images(images: int, recorded: int | None, train_data: CSVData, run: Path, processes: int,
                      cfg: RunConfig, saved: RunConfig) -> None:
    """A resumed run trains on the images it started on (``recorded`` in its checkpoint; ``None``: a run from
    before the record, not checked), which may have moved or been renamed: the cosine schedule's length and
    the saved position in the epoch's shuffled batches both count them. Under torchrun every process reads
    the whole CSV, so the count is the data set's, whatever the number of processes. The advice carries the
    data settings this resume changed (``cfg`` against the run's ``saved`` config) into its commands."""
    if recorded is None or images == recorded:
        return
    skipped = f" (after {len(train_data.skipped)} skipped bad row(s))" if train_data.skipped else ""
    if cfg.data.min_answer_count > 1:
        skipped += f" with a question whose answer is given min_answer_count ({cfg.data.min_answer_count}) times"
    encoder, n = run / "encoder.safetensors", 1
    while encoder.exists():  # perhaps the start of a new run already: export refuses to write over it
        n += 1
        encoder = run / f"encoder-{n}.safetensors"
    export = ["python", "-m", "vqa.export", "--run", str(run), "--out", str(encoder)]
    if cfg.model.checkpoint_path and cfg.model.checkpoint_path != saved.model.checkpoint_path:
        export += ["--checkpoint_path", cfg.model.checkpoint_path]  # where the starting weights are now
    changed = []
    for f in dataclasses.fields(cfg.data):
        value = getattr(cfg.data, f.name)
        if f.name != "train_csv" and value != getattr(saved.data, f.name):  # "none": a file the resume dropped
            changed += [f"--{f.name}", command_line_value(value)]
    new_run = train_command("--config", str(run / "config.yaml"), "--output_dir", "NEW_RUN", "--train_csv",
                            str(train_data.path), *changed, "--checkpoint_path", str(encoder), processes=processes)
    export = shlex.join(export)
    raise VQAError(f"train_csv '{train_data.path}' holds {images} training image(s){skipped}, but the run trained on "
                   f"{recorded} ({run / 'checkpoint.pt'}): resume continues training on the same data, which may "
                   f"have moved or been renamed (point --train_csv at it), since the learning-rate schedule and the "
                   f"saved position in the epoch's shuffled batches count its images. To train on other data, start "
                   f"a new run, e.g. from this one's encoder: {export}, then {new_run}")


def saved_rngs(state: dict) -> list[dict]:
    """The random state of each process that wrote the checkpoint ``state``, in rank order."""
    return state["rng_per_process"] if "rng_per_process" in state else [state["rng"]]  # "rng": older runs


def check_same_processes(state: dict, run: Path, processes: int) -> None:
    """A resumed run keeps its number of processes: each continues its own random stream, and the saved position
    counts that process's share of the epoch's batches."""
    written = len(saved_rngs(state))
    if written != processes:
        command = train_command("--resume", str(run), processes=written)
        raise VQAError(f"{run / 'checkpoint.pt'} was written by {written} training process(es), this resume runs "
                       f"{processes}; resume with the same number, {command}, so every process continues its own "
                       f"random stream")
