"""Run configuration: one dataclass per component, a YAML file, and ``--key value`` overrides on top.

A YAML file has the sections ``data``, ``model`` and ``train``. Every key is unique across sections, so
``--vision_lora_r 4`` and ``--model.vision_lora_r 4`` both work; a yes/no key alone (``--use_type_loss``)
means true. An unknown key, a value of the wrong type, out of range or not finite, and a key given twice in one YAML
mapping are ``VQAError``s naming the key (an unknown key, a wrong type or a non-finite number also names
where the value came from: the file or the command line; an unknown key's error also lists the valid keys,
of its section where it has one, and the closest of them). A path may start with ``~`` (the home folder).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import io
import keyword
import math
import os
import reprlib
import textwrap
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import VQAError, unreadable

__all__ = ["DataConfig", "ModelConfig", "TrainConfig", "RunConfig", "load_config", "parse_overrides", "key_help",
           "command_line_value"]


@dataclass
class DataConfig:
    train_csv: str = "data/synth/train.csv"  # rows: image, question, answer (or answers: a|b|c)[, question_type]
    val_csv: str = "data/synth/val.csv"  # evaluated after every epoch
    answer_weights: str | None = None  # JSON from `python -m vqa.answer_weights`; none: an unweighted loss
    synthetic: bool = False  # generate the synthetic shapes data set as DIR/{train,val}.csv if both are missing
    synthetic_train_images: int = 2000  # images (5 questions each) generated for training
    synthetic_val_images: int = 300  # images generated for validation
    skip_bad_rows: bool = False  # skip and count bad rows/images instead of stopping
    allow_outside_paths: bool = False  # let CSV image paths leave the CSV's folder (absolute or ../)
    max_question_length: int = 32  # tokens, [CLS] included; longer questions are cut
    min_answer_count: int = 1  # an answer given fewer times in train_csv is no class (its questions left out)

    def __post_init__(self) -> None:
        _positive(self, "synthetic_train_images", "synthetic_val_images", "max_question_length", "min_answer_count")
        _expand_home(self, *_PATH_KEYS["data"])


@dataclass
class ModelConfig:
    vision_model: str = "vit_small_patch14_dinov2"  # any timm ViT; the DINOv2 family is the target
    vision_kwargs: dict[str, typing.Any] = field(default_factory=dict)  # more timm.create_model arguments
    img_size: int = 224  # input side in pixels; a multiple of the patch size (14)
    pretrained: bool = False  # download timm's pretrained weights (needs internet)
    checkpoint_path: str | None = None  # local .safetensors/.pth backbone weights instead of a download
    use_vision_lora: bool = True  # LoRA in every block of the image encoder (on vision_lora_targets)
    vision_lora_r: int = 8  # LoRA rank
    vision_lora_alpha: float = 16.0  # LoRA scaling numerator: scaling = alpha / r
    vision_lora_dropout: float = 0.1  # dropout on the adapters' input
    vision_lora_targets: str = "qkv"  # each block's layers with adapters, of qkv, proj, fc1, fc2: e.g. qkv,proj,fc1,fc2
    unfreeze_encoder_layers: int = 0  # also train the last N backbone blocks and the final norm (0: only LoRA)
    grad_checkpointing: bool = False  # recompute backbone activations in backward to save memory
    hidden_dim: int = 256  # width of question encoder and fusion decoder
    num_heads: int = 4  # heads of the question encoder and of the question-to-image attention
    question_layers: int = 1  # transformer layers over the question (0: a bag of words)
    dropout: float = 0.1  # dropout in the question encoder's layers and the answer head (the fusion has none)

    def __post_init__(self) -> None:
        _positive(self, "img_size", "vision_lora_r", "hidden_dim", "num_heads")
        _expand_home(self, *_PATH_KEYS["model"])
        for name, value in self.vision_kwargs.items():
            if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
                spacing = (f" (YAML reads a colon with no space after it as part of a name: write "
                           f"{name.replace(':', ': ', 1)!r})") if isinstance(name, str) and ":" in name else ""
                raise VQAError(f"config key 'vision_kwargs' holds {name!r}, which is no argument name{spacing}; give "
                               f"timm.create_model's keyword arguments, e.g. {{drop_path_rate: 0.1}}")
            if name in _OWN_KEYS:
                raise VQAError(f"config key 'vision_kwargs' may not set '{name}': {_OWN_KEYS[name]}")
            if _holds_itself(value):  # x: &a [*a], which no argument is, and which a walk over it never leaves
                raise VQAError(f"config key 'vision_kwargs': '{name}' holds itself (a YAML alias inside its own "
                               f"anchor); give timm's argument as a value")
            if not _finite(value):  # nan passes timm's range checks (drop_path_rate: nan drops nothing)
                raise VQAError(f"config key 'vision_kwargs': '{name}' must hold finite numbers, got "
                               f"{_BRIEF.repr(value)}")
        if self.question_layers < 0:
            raise VQAError(f"config key 'question_layers' must be >= 0, got {self.question_layers}")
        if not self.vision_lora_alpha > 0 or not math.isfinite(self.vision_lora_alpha):
            raise VQAError(f"config key 'vision_lora_alpha' must be > 0, got {self.vision_lora_alpha}")
        for key in ("vision_lora_dropout", "dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise VQAError(f"config key '{key}' must be in [0, 1), got {getattr(self, key)}")
        given = self.vision_lora_targets.strip()
        if given.startswith("[") and given.endswith("]"):  # a YAML list on the command line: "[qkv, proj]"
            given = given[1:-1]
        targets = [t.strip() for t in given.split(",")]
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or len(set(targets)) < len(targets):
            wrong = f"'{unknown[0]}' is none of them" if unknown else "a layer is named twice"
            if not given.strip():
                wrong = "it names none (to train without adapters, set use_vision_lora false)"
            raise VQAError(f"config key 'vision_lora_targets' names block layers, of {', '.join(LORA_TARGETS)}, with "
                           f"commas between (e.g. qkv,proj,fc1,fc2); {wrong} in {self.vision_lora_targets!r}")
        self.vision_lora_targets = ",".join(t for t in LORA_TARGETS if t in targets)  # one spelling of each choice
        if self.unfreeze_encoder_layers < 0:
            raise VQAError(f"config key 'unfreeze_encoder_layers' must be >= 0, got {self.unfreeze_encoder_layers}")
        if self.hidden_dim % self.num_heads:
            raise VQAError(f"config key 'hidden_dim' ({self.hidden_dim}) must be divisible by 'num_heads' ({self.num_heads})")


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo"  # run folder: config, vocabularies, checkpoints, adapter, metrics
    epochs: int = 10  # passes over the training images
    early_stopping_patience: int = 0  # stop once val accuracy has not risen for N epochs; 0 = train every epoch
    batch_size: int = 32  # images per batch; each brings all its questions
    grad_accum_steps: int = 1  # batches whose gradients are summed into one optimizer step (as one batch of all)
    lr: float = 1e-3  # peak learning rate of the decoder and heads
    lr_encoder: float = 1e-3  # peak learning rate of LoRA adapters and unfrozen backbone blocks
    weight_decay: float = 0.01  # AdamW weight decay on matrices (not on biases, norms, embeddings' positions)
    warmup_ratio: float = 0.05  # share of the steps with linear warm-up, then cosine decay to 0
    grad_clip: float = 1.0  # clip the global gradient norm; 0 disables
    use_type_loss: bool = False  # add the question-type cross-entropy to the answer loss
    type_loss_weight: float = 0.5  # weight of the question-type loss
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:1, ...
    precision: str = "auto"  # auto: bf16 on GPUs from Ampere on, fp16 (loss-scaled) before, CPU fp32; bf16, fp16, fp32
    seed: int = 0  # seeds model init, data order, dropout
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch; 0 = epoch ends only
    log_every: int = 50  # log the mean training loss and learning rates every N steps to steps.jsonl; 0 = no log
    num_workers: int = 0  # DataLoader worker processes
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        _positive(self, "epochs", "batch_size", "grad_accum_steps")
        _expand_home(self, *_PATH_KEYS["train"])
        for key in ("lr", "lr_encoder"):
            if not getattr(self, key) > 0:
                raise VQAError(f"config key '{key}' must be > 0, got {getattr(self, key)}")
        if not 0 <= self.warmup_ratio < 1:
            raise VQAError(f"config key 'warmup_ratio' must be in [0, 1), got {self.warmup_ratio}")
        for key in ("early_stopping_patience", "weight_decay", "grad_clip", "type_loss_weight", "checkpoint_every",
                    "log_every", "num_workers"):
            if getattr(self, key) < 0:
                raise VQAError(f"config key '{key}' must be >= 0, got {getattr(self, key)}")
        if self.precision not in PRECISIONS:
            raise VQAError(f"config key 'precision' must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0 <= self.seed < 2**31:  # numpy takes seeds below 2**32, and each process adds to the seed
            raise VQAError(f"config key 'seed' must be in [0, 2**31), got {self.seed}")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def relative_paths(self) -> dict[str, str]:
        """The file and folder paths (``output_dir`` too) given relative to the working folder, by key."""
        paths = {k: getattr(getattr(self, section), k) for section, keys in _PATH_KEYS.items() for k in keys}
        return {k: v for k, v in paths.items() if v is not None and not Path(v).is_absolute()}

    def _with_paths(self, path: typing.Callable[[str, str, str | None], str | None]) -> "RunConfig":
        """A copy with each file and folder path (``_PATH_KEYS``) replaced by ``path(section, key, value)``."""
        return RunConfig(**{name: dataclasses.replace(getattr(self, name),
                                                      **{k: path(name, k, getattr(getattr(self, name), k)) for k in keys})
                            for name, keys in _PATH_KEYS.items()})

    def with_absolute_paths(self) -> "RunConfig":
        """A copy whose file and folder paths are absolute, as a run's config.yaml keeps them: a relative one
        would mean other files to a resume or a prediction started from another working folder."""
        relative = self.relative_paths()
        return self._with_paths(lambda _, key, value: str(Path(value).absolute()) if key in relative else value)

    def with_paths_spelt_as(self, saved: "RunConfig") -> "RunConfig":
        """A copy whose paths that lead where ``saved``'s absolute ones do are spelt as there (``../data/train.csv``
        and the absolute path name one file): the same file named another way is no new setting, so a resume that
        changes nothing leaves config.yaml as it was. ``saved``'s relative paths (a run from before config.yaml
        kept them absolute) are not kept."""
        def spelt(section: str, key: str, given: str | None) -> str | None:
            before = getattr(getattr(saved, section), key)
            same = given is not None and before is not None and Path(before).is_absolute() and (
                Path(given).resolve() == Path(before).resolve())
            return before if same else given

        return self._with_paths(spelt)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "RunConfig":
        if not isinstance(raw, dict):
            raise VQAError(f"{source} must be a mapping with sections data, model, train; got {type(raw).__name__}")
        sections = {}
        for name in _SECTIONS:
            values = raw.get(name)
            values = {} if values is None else values  # "model:" with nothing under it; "model: []" is no mapping
            if not isinstance(values, dict):
                raise VQAError(f"{source}: section '{name}' must be a mapping of keys to values")
            sections[name] = _build(name, values, f"{source}: {name}")
        unknown = sorted(set(raw) - set(_SECTIONS), key=str)  # YAML keys may be numbers or null too
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), _SECTIONS, n=1)
            hint = (f"; put '{unknown[0]}' under '{_KEY_SECTION[unknown[0]]}:'" if unknown[0] in _KEY_SECTION
                    else f" (did you mean '{close[0]}:'?)" if close else "")
            raise VQAError(f"{source}: unknown section '{unknown[0]}' (sections: data, model, train){hint}")
        return cls(**sections)


# The names vision_lora_targets takes (vit.LORA_TARGETS; not imported, which would bring timm into every tool).
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
# The model's autocast dtypes (train.precision); vqa.evaluate.autocast_dtype says what each means on a device.
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# Text keys holding names separated by commas, which a YAML file may also give as a list.
_NAME_LISTS = {"vision_lora_targets"}
# timm.create_model arguments the run sets itself, which vision_kwargs may not set.
_OWN_KEYS = {
    "img_size": "it is a config key of its own (--img_size)",
    "pretrained": "it is a config key of its own (--pretrained)",
    "checkpoint_path": "it is a config key of its own (--checkpoint_path)",
    "num_classes": "the image encoder has no classifier head (num_classes=0); the answer head is the run's own",
}
_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
_PATH_KEYS = {"data": ("train_csv", "val_csv", "answer_weights"), "model": ("checkpoint_path",), "train": ("output_dir",)}
_KEY_SECTION = {f.name: s for s, c in _SECTIONS.items() for f in dataclasses.fields(c)}
_KEY_TYPE = {name: hint for c in _SECTIONS.values() for name, hint in typing.get_type_hints(c).items()}
assert len(_KEY_SECTION) == sum(len(dataclasses.fields(c)) for c in _SECTIONS.values()), "config keys must be unique"


def key_help() -> dict[str, list[tuple[str, str, str]]]:
    """Every config key by section, as ``train.py --help`` lists it: ``(name, what it takes, help)``, the help being
    the comment on the key's field in this file (left out where the source cannot be read) and its default as the
    command line writes it."""
    listing = {}
    for section, cls in _SECTIONS.items():
        comments, defaults = _field_comments(cls), cls()
        listing[section] = []
        for f in dataclasses.fields(cls):
            default = f"(default: {command_line_value(getattr(defaults, f.name))})"
            text = f"{comments[f.name]} {default}" if f.name in comments else default
            listing[section].append((f.name, _metavar(f.name), text))
    return listing


def _field_comments(cls) -> dict[str, str]:
    """The comment closing each field's line in the source of the dataclass ``cls`` (``{}`` without the source)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no .py file beside the bytecode
        return {}
    fields = {f.name for f in dataclasses.fields(cls)}
    opening: dict[int, str] = {}  # line -> the name that opens it, in the class body
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        line, column = token.start
        if token.type == tokenize.NAME and column == 4:
            opening.setdefault(line, token.string)
        elif token.type == tokenize.COMMENT and opening.get(line) in fields:
            comments[opening[line]] = token.string.lstrip("#").strip()
    return comments


def _metavar(key: str) -> str:
    """What ``--key`` takes, in a word."""
    if any(key in keys for keys in _PATH_KEYS.values()):
        return "PATH"
    kind = _KEY_TYPE[key]
    if type(None) in typing.get_args(kind):  # str | None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is dict:
        return "MAPPING"
    return {bool: "{true,false}", int: "INT", float: "FLOAT"}.get(kind, "TEXT")


def command_line_value(value) -> str:
    """A config value as the command line gives it: ``none``, ``true``, ``{drop_path_rate: 0.1}``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True, width=2**31).strip()
    return str(value)


def _unknown_key(key: str, section: str | None, flag: bool) -> str:
    """What an error about the unknown ``key`` adds: the closest valid key, where one is close, and the valid
    keys of ``section`` (of every section where none is known: a ``--key`` alone). ``flag``: spelled ``--key``."""
    sections = [section] if section in _SECTIONS else list(_SECTIONS)
    names = {s: [f.name for f in dataclasses.fields(_SECTIONS[s])] for s in sections}
    # The closest key of any section (a misspelt key may be another section's), the section typed on a tie.
    scores = {name: difflib.SequenceMatcher(None, key, name).ratio() for name in _KEY_SECTION}
    best = max(_KEY_SECTION, key=lambda name: (scores[name], _KEY_SECTION[name] == section))
    close = [best] if scores[best] >= 0.6 else []  # difflib.get_close_matches's cutoff
    hint = ""
    if close:
        home = _KEY_SECTION[close[0]]
        if flag:
            hint = f" (did you mean '--{f'{home}.' if section else ''}{close[0]}'?)"
        else:
            hint = f" (did you mean '{close[0]}'{f' under {home}:' if home != section else ''}?)"
    if section in _SECTIONS:
        return f"{hint}; section '{section}' has the keys: {', '.join(names[section])}"
    return f"{hint}; the keys are, in " + "; in ".join(f"{s}: {', '.join(names[s])}" for s in sections)


_BRIEF = reprlib.Repr()  # a value's first items and levels, however many it holds
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict = 2, 4, 4


def _parts(value) -> list:
    """The values inside a YAML list or mapping (none inside any other value)."""
    return list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else []


def _holds_itself(value, inside: set | None = None, done: set | None = None) -> bool:
    """Whether a YAML value (nested lists and mappings) holds a list or mapping inside itself, as an alias within its
    own anchor makes it. Each is looked at once, however many aliases repeat it: nested aliases that repeat a list
    ten times at each of nine levels (a "billion laughs") would otherwise take for ever."""
    inside, done = set() if inside is None else inside, set() if done is None else done
    if id(value) in inside:
        return True
    if id(value) in done or not isinstance(value, (dict, list)):
        return False
    inside.add(id(value))
    found = any(_holds_itself(v, inside, done) for v in _parts(value))
    inside.discard(id(value))
    done.add(id(value))
    return found


def _finite(value, done: set | None = None) -> bool:
    """Whether every float in ``value`` (a YAML value: nested lists and mappings too, none inside itself) is finite;
    each list or mapping is looked at once, as in ``_holds_itself``."""
    if isinstance(value, float):
        return math.isfinite(value)
    done = set() if done is None else done
    if id(value) in done or not isinstance(value, (dict, list)):
        return True
    done.add(id(value))
    return all(_finite(v, done) for v in _parts(value))


def _positive(cfg, *keys: str) -> None:
    for key in keys:
        if getattr(cfg, key) <= 0:
            raise VQAError(f"config key '{key}' must be > 0, got {getattr(cfg, key)}")


def expand_home(path: str) -> str:
    """``path`` with a leading ``~`` or ``~user`` expanded as a shell expands it, which no shell does inside a
    YAML file or after ``--flag=``. A ``~`` that names no home folder is a ValueError: left as it is, it
    would be a folder named ``~`` in the working folder."""
    try:
        expanded = os.path.expanduser(path)
    except ValueError as e:  # a NUL or a lone surrogate where the user's name would be
        raise ValueError(f"'{path}' starts with '~' and no user's name ({e})") from None
    if expanded.startswith("~"):
        user = path[1:].replace(os.sep, "/").split("/")[0]
        whose = f"there is no user '{user}'" if user else "there is no home folder (HOME is not set)"
        raise ValueError(f"'{path}' starts with '~{user}', but {whose}; write the path in full (./{path} for a "
                         f"folder named so)")
    return expanded


def _expand_home(cfg, *keys: str) -> None:
    """``~`` and ``~user`` at the start of a path, which no shell expands inside a YAML file."""
    for key in keys:
        if getattr(cfg, key) == "":  # Path("") is the working folder: a run would be written, or read, there
            raise VQAError(f"config key '{key}' is empty; give a path")
        if getattr(cfg, key) is not None:
            try:
                setattr(cfg, key, expand_home(getattr(cfg, key)))
            except ValueError as e:
                raise VQAError(f"config key '{key}': {e}") from None


def _coerce(key: str, value, annotation, where: str):
    """Checks ``value`` against a field's annotation; ints widen to floats, strings to numbers, and to a mapping
    where one is asked for, read as YAML (the command line's "{drop_path_rate: 0.1}")."""
    args = typing.get_args(annotation)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        annotation = next(a for a in args if a is not type(None))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
    elif annotation in (int, float):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        converted = None
        if number and (annotation is float or isinstance(value, int)):  # an int widens, a float never narrows
            try:
                converted = annotation(value)
            except OverflowError:  # an int too large for a float
                converted = math.inf
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                converted = annotation(value)
        if converted is not None:
            if isinstance(converted, float) and not math.isfinite(converted):  # nan slips through every range
                # check; inf trains to nan. An int is finite however long (math.isfinite overflows on a long one).
                raise VQAError(f"{where}: key '{key}' must be a finite number, got {value!r}")
            if isinstance(converted, int) and converted.bit_length() > 63:  # no count or size: torch's ints overflow
                raise VQAError(f"{where}: key '{key}' must be below 2**63, got a number of {len(str(value))} digits")
            return converted
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if key in _NAME_LISTS and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return ",".join(value)  # a YAML list of names, [qkv, proj], as the command line writes them
    elif typing.get_origin(annotation) is dict:
        if isinstance(value, str) and value.lower() in ("none", "null", ""):
            return {}
        if isinstance(value, str):  # from the command line: a YAML mapping, "{drop_path_rate: 0.1}"
            try:
                value = yaml.load(value, Loader=_UniqueKeyLoader)
            except _DuplicateKey as e:
                raise VQAError(f"{where}: key '{key}' names '{e.key}' twice, {value!r}; give it once") from None
            except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: a date such as 2024-13-01
                shown = value if len(value) <= 80 else value[:77] + "..."
                raise VQAError(f"{where}: key '{key}' must be a YAML mapping such as \"{{drop_path_rate: 0.1}}\", "
                               f"got {shown!r}") from None
        if value is None:  # "vision_kwargs:" with nothing after it, or "none"
            return {}
        if isinstance(value, dict):
            return value
    name = getattr(annotation, "__name__", str(annotation))
    raise VQAError(f"{where}: key '{key}' must be {name}, got {value!r} ({type(value).__name__})")


def _build(section: str, values: dict, where: str):
    section_cls = _SECTIONS[section]
    hints = typing.get_type_hints(section_cls)
    known = {f.name for f in dataclasses.fields(section_cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            if key in _KEY_SECTION:
                raise VQAError(f"{where}: unknown key '{key}'; it belongs in section '{_KEY_SECTION[key]}'")
            raise VQAError(f"{where}: unknown key '{key}'{_unknown_key(str(key), section, flag=False)}")
        kwargs[key] = _coerce(key, value, hints[key], where)
    return section_cls(**kwargs)


def parse_overrides(args: list[str]) -> dict[str, dict]:
    """``["--lr", "3e-4", "--use_type_loss"]`` to ``{"train": {"lr": "3e-4", "use_type_loss": "true"}}``
    (strings: ``load_config`` checks them against the keys' types).

    A yes/no key without a value (the next word is another flag, or none) means ``true``; any other key
    without one is an error.
    """
    overrides: dict[str, dict] = {}
    i = 0
    while i < len(args):
        word = args[i]
        if not word.startswith("--") or len(word) == 2:
            raise VQAError(f"unexpected argument '{word}'; overrides look like --key value")
        key, has_value, value = word[2:].partition("=")
        section, _, name = key.rpartition(".")
        name = name.replace("-", "_")
        if name not in _KEY_SECTION:
            raise VQAError(f"unknown config key '--{key}'{_unknown_key(name, section, flag=True)}")
        if section and _KEY_SECTION[name] != section:
            raise VQAError(f"'{name}' is a key of section '{_KEY_SECTION[name]}', not '{section}': "
                           f"--{_KEY_SECTION[name]}.{name} or --{name}")
        if not has_value:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            elif _KEY_TYPE[name] is bool:
                value = "true"
            else:
                raise VQAError(f"--{key} needs a value: --{key} VALUE")
        overrides.setdefault(_KEY_SECTION[name], {})[name] = value
        i += 1
    return overrides


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int) -> None:
        super().__init__(key, line)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: plain YAML keeps the last, so a second
    ``model:`` section would silently drop every key of the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *anchor" merges a mapping in (the base class does it), and may repeat
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:  # a mapping or list as a key ("? {a: 1}")
                    raise yaml.constructor.ConstructorError(None, None, f"a {type(key).__name__} cannot be a key",
                                                            key_node.start_mark) from None
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_TEXT_KEYS = {name for name, hint in _KEY_TYPE.items() if str in (hint, *typing.get_args(hint))}
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


class _ConfigLoader(_UniqueKeyLoader):
    """A config file's loader: a text key's value is the text as written where YAML would read a number, whose text
    may differ (``output_dir: 010`` is 8 to YAML, 1.10 is 1.1, 12:30 is 750, 0x10 is 16)."""

    def construct_document(self, node):
        sections = node.value if isinstance(node, yaml.MappingNode) else []
        for _, section in sections:
            for key, value in section.value if isinstance(section, yaml.MappingNode) else []:
                if (isinstance(key, yaml.ScalarNode) and key.value in _TEXT_KEYS and isinstance(value, yaml.ScalarNode)
                        and value.tag in _NUMBER_TAGS):
                    value.tag = "tag:yaml.org,2002:str"
        return super().construct_document(node)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Reads a YAML config (or the defaults when ``path`` is None) and applies command-line overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise VQAError(f"config file '{path}' is a folder; give the YAML file itself (e.g. configs/demo.yaml)")
        if not path.is_file():
            raise VQAError(f"config file '{path}' does not exist")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_ConfigLoader) or {}
        except OSError as e:
            raise unreadable("config file", path, e) from None
        except _DuplicateKey as e:
            raise VQAError(f"config file '{path}', line {e.line}: key '{e.key}' appears a second time in its "
                           f"mapping, which would silently replace the first; merge the two into one") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise VQAError(f"config file '{path}' is not valid YAML: {e}") from None
        except RecursionError:
            raise VQAError(f"config file '{path}' is nested too deeply to read; a config holds sections of keys "
                           f"and values") from None
        except ValueError as e:  # YAML's constructors: an int past Python's digit limit, a date such as 2024-13-01
            raise VQAError(f"config file '{path}' has a value YAML cannot read ({e}); fix it, or quote it to make it "
                           f"a string") from None
        if not isinstance(raw, dict):
            raise VQAError(f"config file '{path}' must hold a mapping with sections data, model, train")
    source = str(path) if path is not None else "config"
    merged = dict(raw)
    for section, values in parse_overrides(overrides or []).items():
        values = {k: _coerce(k, v, _KEY_TYPE[k], "command line") for k, v in values.items()}  # named as given there
        base = {} if merged.get(section) is None else merged[section]
        merged[section] = {**base, **values} if isinstance(base, dict) else base  # a non-mapping fails in from_dict
    return RunConfig.from_dict(merged, source)
