"""Question tokenizer, answer normalisation and vocabulary, question-type inference."""
from __future__ import annotations

import functools
import json
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable

__all__ = [
    "QUESTION_TYPES",
    "normalize_answer",
    "infer_question_type",
    "tokenize",
    "Tokenizer",
    "AnswerVocab",
]

# "other" last: it is the fallback of infer_question_type.
QUESTION_TYPES = ("count", "color", "location", "yes/no", "shape", "other")

# Tens from twenty on, and the units that may follow one: "twenty-one" and "ninety nine" are 21 and 99 (punctuation
# has become a space by then), not "20 1".
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_UNITS = {w: i for i, w in enumerate("one two three four five six seven eight nine".split(), start=1)}
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen".split()
    )
} | {w: str(n) for w, n in _TENS.items()}
_ARTICLES = {"a", "an", "the"}
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_AUX_VERBS = {"is", "are", "was", "were", "does", "do", "did", "can", "could", "has", "have", "will", "would", "should"}
# The stems of their negations, which tokenize splits from "'t": "isn't" is isn ' t, "won't" won ' t.
_NEGATED_AUX_VERBS = {"isn", "aren", "wasn", "weren", "doesn", "don", "didn", "can", "couldn", "hasn", "haven", "won",
                      "wouldn", "shouldn"}
_WORD = re.compile(r"\w+|[^\w\s]")
# Typographic quotes and dashes as their ASCII marks in questions: a phone's smart punctuation types "What’s" where
# the training CSV has "What's", and the curly mark would be an unknown word, whose embedding never trained.
_ASCII_MARKS = str.maketrans({**dict.fromkeys("\u2018\u2019\u201a\u201b\u2032", "'"),
                              **dict.fromkeys("\u201c\u201d\u201e\u201f", '"'),
                              **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212", "-")})


# A number's marks are no punctuation: "1,000" is 1000 (a comma before each group of three digits), "3.5" keeps its
# point and "-5" its sign (not the dash of "covid-19" or "5-6"), where they became "1 000", "3 5" and "5".
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# A point before a digit and after none of a word's letters: ".5" is a half, not 5; "-.5" keeps its sign too.
_NUMBER_MARK = re.compile(r"(?<![^\W\d])\.(?=\d)|(?<![\w.])-(?=\.?\d)")


def _punctuation_to_spaces(text: str) -> str:
    """ASCII punctuation and symbols (``string.punctuation``) and every Unicode punctuation mark (categories P*:
    the curly apostrophe of "don’t", the dash of "top–left") become spaces, so that spellings agree; a number's
    thousands commas go, and its decimal point and minus sign stay."""
    text = _THOUSANDS_COMMA.sub("", text)
    out, start = [], 0
    for mark in _NUMBER_MARK.finditer(text):
        out += [_marks_to_spaces(text[start:mark.start()]), mark.group()]
        start = mark.end()
    return "".join(out + [_marks_to_spaces(text[start:])])


def _marks_to_spaces(text: str) -> str:
    text = text.translate(_PUNCT)
    if text.isascii():
        return text
    return "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)


def normalize_answer(answer: str) -> str:
    """NFKC, lower case, punctuation to spaces, articles before a word dropped, number words to digits,
    whitespace collapsed.

    ``"Three."`` and ``" the  3 "`` both become ``"3"``; ``"Top-Left"`` becomes ``"top left"``; number words up
    to ninety-nine become their number (``"Twenty-One"`` and ``"twenty one"`` become ``"21"``); ``"1,000"``
    becomes ``"1000"``, while ``"3.5"`` and ``"-5"`` stay; the letter of ``"A"`` and ``"vitamin A"`` stays.
    """
    return _normalized(str(answer))


# A VQA v2 split holds millions of answers and a few hundred thousand distinct ones, and a run looks each up several
# times (reading, the classes, the dataset, the resume check): each is worked out once (about 5 us) and then recalled.
@functools.lru_cache(maxsize=1 << 20)
def _normalized(answer: str) -> str:
    # As questions are read: a full-width "３" is 3, a typographic minus "−5" is -5.
    text = unicodedata.normalize("NFKC", answer).translate(_ASCII_MARKS).lower()
    words = _punctuation_to_spaces(text).split()
    # "a red car" is "red car", but a last word stays even where it is spelt as an article: the answer "A" of a
    # multiple choice, "vitamin A".
    words = [w for i, w in enumerate(words) if w not in _ARTICLES or i == len(words) - 1]
    out = []
    for i, w in enumerate(words):
        if i and words[i - 1] in _TENS and w in _UNITS:
            out[-1] = str(_TENS[words[i - 1]] + _UNITS[w])  # the unit of a compound: "twenty one"
        else:
            out.append(_NUMBER_WORDS.get(w, w))
    return " ".join(out)


def tokenize(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks, the text NFKC-normalised first (an accent typed as its own
    combining mark, full-width "？") and typographic quotes and dashes read as ASCII's: one question, one spelling."""
    return _WORD.findall(unicodedata.normalize("NFKC", str(text)).translate(_ASCII_MARKS).lower())


def infer_question_type(question: str) -> str:
    """Guesses one of ``QUESTION_TYPES`` from the wording, for rows without a ``question_type``."""
    words = tokenize(question)
    text = " ".join(words)
    first = words[0] if words else ""
    asks = first in _AUX_VERBS or (first in _NEGATED_AUX_VERBS and words[1:3] == ["'", "t"])  # "Is it?", "Isn't it?"
    # "Is it red or blue?" is answered by a colour (the rules below say which type); "or not", "or more" no choice.
    choice = any(w == "or" and words[i + 1:i + 2] not in (["not"], ["more"], ["less"], ["fewer"])
                 for i, w in enumerate(words))
    if asks and not choice:
        return "yes/no"
    if text.startswith("how many") or "number of" in text:
        return "count"
    if "color" in words or "colour" in words:
        return "color"
    if "shape" in words:
        return "shape"
    if words[:1] == ["where"] or any(w in words for w in ("left", "right", "top", "bottom")):
        return "location"
    return "other"


class Tokenizer:
    """Word-level question tokenizer; id 0 is padding, 1 unknown, 2 the ``[CLS]`` token put first."""

    PAD, UNK, CLS = 0, 1, 2
    SPECIALS = ("[PAD]", "[UNK]", "[CLS]")

    def __init__(self, words: Iterable[str], max_length: int = 32) -> None:
        self.itos = list(self.SPECIALS) + [w for w in words if w not in self.SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.max_length = max_length

    @classmethod
    def build(cls, questions: Iterable[str], min_count: int = 1, max_length: int = 32) -> "Tokenizer":
        counts = Counter(w for q in questions for w in tokenize(q))
        return cls(sorted(w for w, c in counts.items() if c >= min_count), max_length)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, question: str) -> list[int]:
        """``[CLS]`` then word ids, cut to ``max_length``."""
        ids = [self.CLS] + [self.stoi.get(w, self.UNK) for w in tokenize(question)]
        return ids[: self.max_length]

    def to_json(self) -> str:
        return json.dumps({"words": self.itos[len(self.SPECIALS):], "max_length": self.max_length}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        data = _loads(text)
        length = data.get("max_length") if isinstance(data, dict) else None
        if not (isinstance(data, dict) and _strings(data.get("words")) and isinstance(length, int)
                and not isinstance(length, bool) and length > 0):
            raise ValueError('a tokenizer file holds {"words": [strings], "max_length": int > 0}')
        tokenizer = cls(data["words"], data["max_length"])
        # A run's file from before tokenize read NFKC and typographic marks as ASCII's holds them as words ("’",
        # "？"): each reads on as the word tokenize now makes of it, so the run's questions encode as they trained.
        for word, i in list(tokenizer.stoi.items()):
            now = tokenize(word)
            if len(now) == 1 and now[0] not in tokenizer.stoi:
                tokenizer.stoi[now[0]] = i
        return tokenizer


class AnswerVocab:
    """Normalised training answers, most frequent first; an answer outside it has no id (always wrong)."""

    def __init__(self, answers: Iterable[str]) -> None:
        self.itos = list(answers)
        self.stoi = {}
        for i, a in enumerate(self.itos):
            self.stoi.setdefault(a, i)

    @classmethod
    def build(cls, answers: Iterable[str], min_count: int = 1) -> "AnswerVocab":
        """The answers given at least ``min_count`` times, once normalised."""
        counts = Counter(normalize_answer(a) for a in answers)
        return cls(a for a, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count)

    def __len__(self) -> int:
        return len(self.itos)

    def id(self, answer: str) -> int:
        """The id of the normalised answer, or -1 if training never saw it."""
        return self.stoi.get(normalize_answer(answer), -1)

    def to_json(self) -> str:
        return json.dumps({"answers": self.itos}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "AnswerVocab":
        data = _loads(text)
        if not (isinstance(data, dict) and _strings(data.get("answers"))):
            raise ValueError('an answer vocabulary file holds {"answers": [strings]}')
        # A run's file from before normalize_answer's number words past twenty and Unicode punctuation holds
        # "thirty" and "don’t": read as today's "30" and "don t", which its CSV rows and answer weights now give.
        # Its "1 000" and "3 5" stay: they cannot be told from answers of two numbers.
        return cls(normalize_answer(a) or a for a in data["answers"])


def _loads(text: str):
    """``json.loads``, its RecursionError on JSON nested thousands deep a ValueError as its other errors are."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply to read") from None


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
