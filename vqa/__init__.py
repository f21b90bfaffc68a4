"""Visual question answering on a LoRA-adapted DINOv2: model, data, training pieces, evaluation."""
from .errors import VQAError
from .model import DeterministicVQA, VQAOutput
from .text import QUESTION_TYPES, AnswerVocab, Tokenizer, infer_question_type, normalize_answer

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
