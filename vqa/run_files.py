"""The run folder: what training writes and what resume, evaluation and prediction read back.

    config.yaml            resolved config
    tokenizer.json         question vocabulary
    answers.json           answer vocabulary
    backbone.safetensors   base weights, only when the backbone was randomly initialised
    checkpoint.pt          resume state: trainable weights, optimizer, scheduler, RNG, position
    model_{best,last}.safetensors    trainable weights (adapters, unfrozen blocks, decoder)
    adapter_{best,last}.safetensors  the LoRA adapters alone (lora.save_adapter)
    metrics.jsonl          one line per epoch

Every file is written atomically, and what changes during training lives in one file per reader
(``checkpoint.pt`` for resume, ``model_*.safetensors`` for prediction; the config, vocabularies and
backbone are written once, before the first checkpoint), so a run killed at any moment leaves a
consistent previous state. Nothing read back can run code: safetensors, JSON, YAML (safe
loader), and ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lora import atomic_path, atomic_write
from vit import PretrainedWeightsUnavailable, torch_load_failure

from .config import RunConfig, load_config
from .errors import VQAError, unreadable
from .model import DeterministicVQA
from .text import AnswerVocab, Tokenizer

__all__ = [
    "build_model",
    "load_weights",
    "copy_weights",
    "save_checkpoint",
    "restore_best",
    "load_checkpoint",
    "write_text",
    "read_history",
    "load_run",
    "load_vocabularies",
    "trained_files",
    "remove_run",
    "weights_file",
    "random_backbone",
    "missing_backbone",
    "never_checkpointed",
    "train_command",
    "file_sha256",
    "check_base_file",
    "weights_sha256",
    "check_base_weights",
]

# The --checkpoint_path of prediction, evaluation and export (load_run's checkpoint_path).
CHECKPOINT_HELP = ("a local copy of the weights the run started from, in place of its own source: a pretrained run's "
                   "(offline, say), or its checkpoint_path file, moved; checked against the SHA-256 the run recorded")

# What a run has trained, resume state first: a new run will not start over these unless told to.
TRAINED_FILES = ("checkpoint.pt", "metrics.jsonl", "model_best.safetensors", "model_last.safetensors",
                 "adapter_best.safetensors", "adapter_last.safetensors")
# Every file a run writes, the trained ones first: a removal cut short leaves nothing trained or a folder refused.
# The step log is not trained work: a run killed before its first checkpoint may have logged steps.
RUN_FILES = TRAINED_FILES + ("steps.jsonl", "config.yaml", "tokenizer.json", "answers.json", "backbone.safetensors")


def build_model(cfg: RunConfig, vocab_size: int, num_answers: int, checkpoint_path: str | None = None,
                offline: str | None = None) -> DeterministicVQA:
    """The run's model, its backbone from ``checkpoint_path`` where given (else from the config's source).
    ``offline``: what to advise when the hub's pretrained weights cannot be had (default: the config's
    ``checkpoint_path``, as for train.py)."""
    m = cfg.model
    try:
        return DeterministicVQA(
            vision_model=m.vision_model,
            img_size=m.img_size,
            pretrained=m.pretrained and checkpoint_path is None,
            checkpoint_path=checkpoint_path or m.checkpoint_path,
            use_vision_lora=m.use_vision_lora,
            vision_lora_r=m.vision_lora_r,
            vision_lora_alpha=m.vision_lora_alpha,
            vision_lora_dropout=m.vision_lora_dropout,
            vision_lora_targets=tuple(m.vision_lora_targets.split(",")),
            vocab_size=vocab_size,
            num_answers=num_answers,
            max_question_length=cfg.data.max_question_length,
            hidden_dim=m.hidden_dim,
            num_heads=m.num_heads,
            question_layers=m.question_layers,
            dropout=m.dropout,
            backbone_kwargs=m.vision_kwargs,
        )
    except PretrainedWeightsUnavailable as e:
        if offline is None:
            raise VQAError(str(e)) from None
        raise VQAError(f"{e.problem}; {offline}") from None
    except (ValueError, FileNotFoundError, IsADirectoryError) as e:  # backbone name, img_size, checkpoint problems
        raise VQAError(f"{e}{exported_shape(checkpoint_path or m.checkpoint_path, m.vision_kwargs)}") from None


def vision_kwargs_record(vision_kwargs: dict) -> str:
    """``vision_kwargs`` as an export's metadata records them: JSON, a value JSON has no form for as its text."""
    return json.dumps(vision_kwargs, default=str)


def exported_shape(path: str | None, vision_kwargs: dict) -> str:
    """What to add to a checkpoint's load error where ``path`` is an export whose run built its encoder with other
    ``vision_kwargs`` (recorded in the file's metadata; none recorded: none given): the likely cause."""
    if path is None or not str(path).endswith(".safetensors"):
        return ""
    try:
        metadata = load_weights(None, Path(path))
        exported = json.loads(metadata.get("vision_kwargs", "{}"))
    except (VQAError, OSError, ValueError):  # unreadable, or a record that is no JSON: nothing to add
        return ""
    if "architecture" not in metadata or exported == json.loads(vision_kwargs_record(vision_kwargs)):
        return ""  # not written by python -m vqa.export, or built as this run builds it
    return (f"; the file is an export of a run whose image encoder was built with vision_kwargs {exported}, this "
            f"run's are {vision_kwargs}: give the same (--vision_kwargs \"{exported}\")")


def random_backbone(cfg: RunConfig) -> bool:
    """Whether the run's backbone started from random weights, which it then keeps in backbone.safetensors."""
    return not cfg.model.pretrained and cfg.model.checkpoint_path is None


def missing_backbone(path: Path) -> str:
    return (f"'{path}' is missing: the run's backbone was randomly initialised (no pretrained weights, no "
            f"checkpoint_path) and this file holds those weights; without it the model would be another random "
            f"network. Put the file back, or train a new run")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB pieces: a fingerprint of the base weights a run started from."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while piece := f.read(1 << 20):
                digest.update(piece)
    except OSError as e:
        raise unreadable("checkpoint_path", path, e, "check the path and its permissions") from None
    return digest.hexdigest()


def check_base_file(path: str | Path, expected: str | None, recorded_in: Path, digest: str | None = None,
                    option: str = "resume with --checkpoint_path PATH") -> None:
    """Refuses a ``checkpoint_path`` whose bytes are not those the run trained on (``expected``, the SHA-256
    recorded in ``recorded_in``; ``None``: a run from before the record, not checked). A moved copy passes.
    ``digest``: the file's SHA-256 where the caller has it already; ``option``: how the user gives another file."""
    if expected is not None and (digest or file_sha256(path)) != expected:
        raise VQAError(f"checkpoint_path '{path}' is not the file this run started from: its SHA-256 differs from "
                       f"the one recorded in {recorded_in} (another file, or the same one replaced or written over "
                       f"since; the same weights in another format count as another file), and the run's adapters "
                       f"would sit on other base weights; point checkpoint_path at a copy of the original file "
                       f"({option}), or train a new run")


def train_command(*args: str, processes: int = 1) -> str:
    """The shell command that runs train.py with ``args`` in ``processes`` processes (torchrun for more than one),
    from the working folder: ``train.py`` where it is there, else its whole path (where this checkout has one)."""
    launcher = ["torchrun", "--nproc_per_node", str(processes)] if processes > 1 else ["python"]
    script = Path(__file__).resolve().parents[1] / "train.py"
    here = script.parent == Path.cwd().resolve() or not script.is_file()
    return shlex.join([*launcher, "train.py" if here else str(script), *args])


def never_checkpointed(run: Path, processes: int = 1, overwrite: bool = False) -> str:
    """The error for a run folder without a checkpoint: the run stopped before its first. ``overwrite``: the
    folder holds trained files (the first epoch's weights, written just before the checkpoint)."""
    command = train_command("--config", str(run / "config.yaml"), "--output_dir", str(run),
                            *(["--overwrite"] if overwrite else []), processes=processes)
    return (f"run folder '{run}' has no checkpoint: the run stopped before its first (written at the end of each "
            f"epoch, or every checkpoint_every steps), so there is nothing to resume; start it again with {command}"
            f"{' (which replaces the weights it wrote)' if overwrite else ''}")


def write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


# What each of a run's line-per-record logs is, by the integer key that orders its records: the file, what
# train.py writes there, and what one line holds.
_LOGS = {"epoch": ("metrics file", "each epoch's metrics", "an epoch's metrics"),
         "step": ("step log", "the training loss every log_every steps", "a step's loss")}


def read_history(path: Path, key: str = "epoch") -> list[dict]:
    """The records ``metrics.jsonl`` (``key`` "epoch") or ``steps.jsonl`` ("step") holds, one dict per line (none where
    the file is missing); a line that is not one, edited or damaged, is an error naming it, before any training time
    is spent. The step log is appended to: a last line a kill cut short (no newline, no whole record) is left out."""
    name, written, record_of = _LOGS[key]
    if not path.exists():
        return []
    if not path.is_file():  # a folder: read here, rather than found when the first epoch's metrics cannot replace it
        raise VQAError(f"'{path}' is not a file, and train.py writes {written} there; move it out of the "
                       f"run folder to resume")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise unreadable(name, path, e) from None
    except UnicodeDecodeError:
        raise VQAError(f"'{path}' is not UTF-8 text, as train.py writes it; delete it to resume without the earlier "
                       f"{'epochs' if key == 'epoch' else 'steps'}' records") from None
    lines = text.splitlines()
    history = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not isinstance(record, dict) or type(record.get(key)) is not int:
            if key == "step" and record is None and number == len(lines) and not text.endswith("\n"):
                break  # an append cut short
            raise VQAError(f"{path}, line {number}: {line[:60]!r} is not {record_of} as train.py writes them "
                           f"(a JSON object with an integer \"{key}\"); mend or delete that line")
        history.append(record)
    return history


@torch.no_grad()
def copy_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: Path) -> None:
    """Copies named parameters into ``model``; a name or shape that does not fit is an error naming it. A model with
    a ``trainable_state_dict`` (the VQA model) must get every weight it trains and none it does not: a run's own
    file always fits the model its config.yaml builds, so a difference means the config was edited since."""
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    for key, value in tensors.items():
        if key not in params:
            raise VQAError(f"'{source}' has weights for '{key}', which the model does not have; wrong run config?")
        if value.shape != params[key].shape:
            raise VQAError(f"'{source}': '{key}' has shape {tuple(value.shape)}, the model expects {tuple(params[key].shape)}")
    trains = set(model.trainable_state_dict()) if hasattr(model, "trainable_state_dict") else set(tensors)
    if differ := sorted(trains ^ set(tensors)):
        key = differ[0]
        what = "holds no weights for" if key in trains else "holds trained weights for"
        does = "trains" if key in trains else "keeps frozen"
        raise VQAError(f"'{source}' {what} '{key}', which the model built from the run's config.yaml {does}: the "
                       f"config's model settings differ from the ones the run trained with (was config.yaml edited?); "
                       f"put them back")
    for key, value in tensors.items():
        params[key].copy_(value)


def load_weights(model: nn.Module | None, path: Path) -> dict[str, str]:
    """Copies a weights file into ``model`` (``None``: reads nothing but the metadata); returns the file's metadata."""
    if not path.is_file():
        raise VQAError(f"weights file '{path}' does not exist")
    if not os.access(path, os.R_OK):  # safe_open says "No such file or directory" for a file it may not read
        raise VQAError(f"cannot read weights file '{path}' (permission denied); check its permissions")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if model is not None:
                copy_weights(model, {key: f.get_tensor(key) for key in f.keys()}, path)
            return f.metadata() or {}
    except SafetensorError as e:
        raise VQAError(f"'{path}' is not a readable safetensors file ({e})") from None


def restore_best(run: Path, epoch: int) -> bool:
    """Copies ``model_last`` (and ``adapter_last``) over ``model_best`` (``adapter_best``) where the last holds
    ``epoch``, the run's best, and the best does not: a run stopped after the checkpoint that made the epoch its
    best and before the copy. Returns whether it copied."""
    def epoch_of(kind: str, tag: str) -> str | None:
        path = run / f"{kind}_{tag}.safetensors"
        return load_weights(None, path).get("epoch") if path.is_file() else None

    kinds = [kind for kind in ("model", "adapter") if epoch_of(kind, "last") == str(epoch)]
    if "model" not in kinds or all(epoch_of(kind, "best") == str(epoch) for kind in kinds):
        return False
    for kind in kinds:
        with atomic_path(run / f"{kind}_best.safetensors") as tmp:
            shutil.copyfile(run / f"{kind}_last.safetensors", tmp)
    return True


def save_checkpoint(state: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise VQAError(f"no checkpoint at '{path}'; is this a run folder written by train.py?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # refuses pickled code
    except Exception as e:
        raise VQAError(f"cannot load checkpoint '{path}' safely ({torch_load_failure(e)}): the file is damaged, "
                       f"or is not a checkpoint train.py wrote (objects other than tensors are refused: loading "
                       f"them could run code)") from None


def trained_files(run_dir: Path) -> list[str]:
    """The names of the trained files in ``run_dir`` (none: no run to lose there)."""
    return [name for name in TRAINED_FILES if (run_dir / name).is_file()]


def remove_run(run_dir: Path, keep: Iterable[str | Path | None] = ()) -> None:
    """Deletes the files a run writes in ``run_dir``, and nothing else the folder holds: nothing of an earlier
    run may sit beside a new one, whose resume or prediction would load its checkpoint or backbone.
    ``keep``: the new run's own inputs (a ``checkpoint_path`` may be an earlier run's backbone file)."""
    inputs = {Path(p).resolve() for p in keep if p}
    for name in RUN_FILES:
        if (run_dir / name).resolve() not in inputs:
            (run_dir / name).unlink(missing_ok=True)


def weights_file(run_dir: Path, which: str = "best") -> Path:
    """The run's ``model_{which}.safetensors``, or ``model_last`` where there is no best yet."""
    for name in (f"model_{which}.safetensors", "model_last.safetensors"):
        if (run_dir / name).is_file():
            return run_dir / name
    if not (run_dir / "checkpoint.pt").is_file():
        raise VQAError(never_checkpointed(run_dir, overwrite=bool(trained_files(run_dir)))
                       + " (under torchrun, if that is how it was started)")
    if (run_dir / "metrics.jsonl").is_file():  # an epoch ended, and its model file is gone from the folder
        # Only model_last can be missing beside a model_best: a best asked for falls back to the last above.
        best = (run_dir / "model_best.safetensors").is_file()
        there = "; model_best.safetensors is there (--which best)" if best else ""
        raise VQAError(f"run folder '{run_dir}' has no model_{which}.safetensors, which train.py wrote at the end of "
                       f"each epoch: it was moved or deleted{there}")
    raise VQAError(f"run folder '{run_dir}' has no trained weights yet: model_{which}.safetensors is written at "
                   f"the end of each epoch; continue the run with {train_command('--resume', str(run_dir))}")


def weights_sha256(backbone: nn.Module) -> str:
    """The SHA-256 of a backbone's base weights as loaded (adapters left out): each tensor's name, dtype, shape
    and bytes, in name order. A fingerprint of what a run started from, whatever brought it: the hub, whose
    weights under a model's name may change, or a local copy in any format."""
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
            continue
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_base_weights(digest: str, expected: str | None, recorded_in: Path, option: str) -> None:
    """Refuses base weights other than those the run started from: ``digest`` (``weights_sha256`` of the backbone
    as built now) against ``expected``, recorded in ``recorded_in`` (``None``: a run from before the record, or
    from random weights, not checked); ``option``: how the user gives a local copy."""
    if expected is not None and digest != expected:
        raise VQAError(f"the base weights loaded now are not those this run started from: their SHA-256 differs "
                       f"from the one recorded in {recorded_in} (the hub's weights for this model may have changed "
                       f"since, another timm version may load or resample them differently, or a local copy holds "
                       f"other weights), and the run's adapters would sit on other base weights; give a local copy "
                       f"of the weights the run started from ({option}), or train a new run")


def load_vocabularies(run: Path) -> tuple[Tokenizer, AnswerVocab]:
    """The run's question and answer vocabularies (tokenizer.json, answers.json)."""
    vocabularies = []
    for kind, name in ((Tokenizer, "tokenizer.json"), (AnswerVocab, "answers.json")):
        try:
            vocabularies.append(kind.from_json((run / name).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:  # ValueError: bad JSON, or JSON of the wrong shape
            raise VQAError(f"run folder '{run}' has a missing or damaged {name} ({e}); it is written once, when "
                           f"the run starts: take it from a copy of the run, or train a new one") from None
    tokenizer, answers = vocabularies
    return tokenizer, answers


def load_run(run_dir: str | Path, device: torch.device | str = "cpu", which: str = "best",
             checkpoint_path: str | Path | None = None, tool: str | None = None):
    """Rebuilds a trained model from a run folder for inference; returns ``(model, tokenizer, answers, cfg)``.

    ``checkpoint_path``: a local copy of the weights the run started from, in place of its own source (the
    hub for a pretrained run, offline say, or its checkpoint_path file, moved); where the run recorded the
    file's SHA-256, or that of the weights it loaded, the copy must match them. ``tool``: the command the user
    ran (``python -m vqa.predict``), whose ``--checkpoint_path`` the errors then name."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise VQAError(f"'{run}' is not a run folder: it has no config.yaml (train one with train.py)")
    cfg = load_config(run / "config.yaml")
    tokenizer, answers = load_vocabularies(run)
    weights = weights_file(run, which)  # first: a run killed before its backbone file has none to load either
    name, option = "checkpoint_path", "checkpoint_path=PATH"  # load_run's own argument
    if tool:
        name, option = "--checkpoint_path", f"{tool} --checkpoint_path PATH"
    backbone = run / "backbone.safetensors"
    if random_backbone(cfg):
        if checkpoint_path is not None:
            raise VQAError(f"{name} '{checkpoint_path}' was given, but run '{run}' started from random weights, "
                           f"which its own {backbone} holds (pretrained: false and no checkpoint_path in its "
                           f"config.yaml): any other file would be other weights; drop {name}")
        if not backbone.is_file():
            raise VQAError(missing_backbone(backbone))
        source, base = backbone, None  # the run's own base weights, no file to check
    else:
        base = checkpoint_path if checkpoint_path is not None else cfg.model.checkpoint_path
        if checkpoint_path is not None and not Path(checkpoint_path).is_file():
            raise VQAError(f"{name} '{checkpoint_path}' is not a file; give the path of a local copy of the weights "
                           f"run '{run}' started from")
        if base is not None and not Path(base).is_file():
            state = "is a folder, not the weights file" if Path(base).is_dir() else "does not exist"
            raise VQAError(f"'{base}', the checkpoint_path that run '{run}' started from (in its config.yaml), "
                           f"{state}; if the file moved, give where it is now: {option}")
        source = base  # None: the hub's pretrained weights
    offline = (f"run '{run}' started from them (pretrained: true in its config.yaml); on a machine without "
               f"network, give a local copy of them, a .safetensors or .pth of this model: {option}, or fill the "
               f"Hugging Face cache (HF_HOME) where there is network")
    record = load_weights(None, weights)  # the metadata: the base weights' fingerprints the run recorded
    if base is not None:  # before the model is built
        check_base_file(base, record.get("base_sha256"), weights, option=option)
    model = build_model(cfg, len(tokenizer), len(answers), str(source) if source else None, offline=offline)
    if record.get("base_weights_sha256") is not None:  # none for random weights or older runs: nothing to hash
        # Before the trained weights go in: unfrozen blocks were base weights once.
        check_base_weights(weights_sha256(model.backbone), record["base_weights_sha256"], weights, option)
    try:  # what the run trained, as it trained it: the weights file must hold exactly that (copy_weights)
        model.freeze_pretrained(unfreeze_encoder_layers=cfg.model.unfreeze_encoder_layers)
    except ValueError as e:  # more blocks than the backbone has: train.py would have refused it
        raise VQAError(f"{run / 'config.yaml'}: unfreeze_encoder_layers {cfg.model.unfreeze_encoder_layers} ({e}); "
                       f"was config.yaml edited? put its model settings back") from None
    load_weights(model, weights)
    return model.to(device).eval(), tokenizer, answers, cfg
