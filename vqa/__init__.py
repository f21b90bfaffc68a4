"""Visual question answering on a LoRA-adapted DINOv2: model, data, training pieces, evaluation."""
from .errors import VQAError
from .text import QUESTION_TYPES, AnswerVocab, Tokenizer, infer_question_type, normalize_answer

_MODEL_NAMES = ("DeterministicVQA", "VQAOutput")


def __getattr__(name: str):
    """The model's names, imported on first use: the model brings timm, whose import takes seconds (6 of a data
    tool's 10 on this project's CPU), and the tools that only read or write data never use it."""
    if name in _MODEL_NAMES:
        from . import model
        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DeterministicVQA",
    "VQAOutput",
    "VQAError",
    "QUESTION_TYPES",
    "AnswerVocab",
    "Tokenizer",
    "infer_question_type",
    "normalize_answer",
]
