import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vqa.text import QUESTION_TYPES, AnswerVocab, Tokenizer, infer_question_type, normalize_answer, tokenize


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Three.", "3"),
        ("  the  3 ", "3"),
        ("Top-Left", "top left"),
        ("YES!", "yes"),
        ("a red circle", "red circle"),
        ("An orange", "orange"),
        ("twenty", "20"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@given(st.text())
def test_normalize_answer_is_idempotent_and_never_fails(text):
    once = normalize_answer(text)
    assert isinstance(once, str)
    assert normalize_answer(once) == once
    assert once == once.strip() and "  " not in once


@pytest.mark.parametrize(
    "question, qtype",
    [
        ("How many circles are there?", "count"),
        ("What is the number of cubes?", "count"),
        ("What color is the square?", "color"),
        ("What colour is the car?", "color"),
        ("What shape is the red object?", "shape"),
        ("Where is the blue object?", "location"),
        ("Which object is on the left?", "location"),
        ("Which object is at the top?", "location"),
        ("What is in the bottom row?", "location"),
        ("Is there a green triangle?", "yes/no"),
        ("Is the cat on the left?", "yes/no"),
        ("Does the man wear a hat?", "yes/no"),
        ("Are there two circles?", "yes/no"),
        ("Can you see a cube?", "yes/no"),
        ("Has the cat a hat?", "yes/no"),
        ("Is there a red shape?", "yes/no"),  # asked like "Are there two shapes?": yes or no, not a shape
        ("Is the number of circles 3?", "yes/no"),
        ("Does the square have a color?", "yes/no"),
        ("Why is the sky blue?", "other"),
        ("", "other"),
    ],
)
def test_infer_question_type(question, qtype):
    assert infer_question_type(question) == qtype


@given(st.text())
def test_infer_question_type_always_gives_a_known_type(text):
    assert infer_question_type(text) in QUESTION_TYPES


def test_tokenizer_round_trip_and_unknown_words():
    tok = Tokenizer.build(["What color is the circle?", "How many squares?"], max_length=6)
    ids = tok.encode("What color is the hexagon?")
    assert ids[0] == Tokenizer.CLS
    assert ids[5] == Tokenizer.UNK  # "hexagon" was never seen
    assert len(tok.encode("what what what what what what what what")) == 6  # cut to max_length
    again = Tokenizer.from_json(tok.to_json())
    assert again.itos == tok.itos and again.encode("How many squares?") == tok.encode("How many squares?")


def test_answer_vocab_orders_by_frequency_and_rejects_unseen():
    vocab = AnswerVocab.build(["Two", "yes", "2", "no", "yes", "2."])
    assert vocab.itos == ["2", "yes", "no"]
    assert vocab.id("TWO") == 0 and vocab.id("purple") == -1
    assert AnswerVocab.from_json(vocab.to_json()).itos == vocab.itos


def test_every_word_seen_min_count_times_gets_its_own_id():
    tok = Tokenizer.build(["What color is the circle?", "How many squares?"])
    ids = tok.encode("What color is the circle?")
    assert Tokenizer.UNK not in ids and len(set(ids)) == len(ids)
    assert Tokenizer.build(["a b b"], min_count=2).encode("a b") == [Tokenizer.CLS, Tokenizer.UNK, 3]


def test_answer_vocab_breaks_frequency_ties_alphabetically():
    """Class ids must not depend on the order of the CSV's rows."""
    assert AnswerVocab.build(["yes", "no", "blue", "no", "yes", "blue"]).itos == ["blue", "no", "yes"]
    assert AnswerVocab.build(["no", "yes"]).itos == AnswerVocab.build(["yes", "no"]).itos


@pytest.mark.parametrize("load, text", [
    (Tokenizer.from_json, "[1]"), (Tokenizer.from_json, '{"words": ["a", 2], "max_length": 8}'),
    (Tokenizer.from_json, '{"words": ["a"]}'), (AnswerVocab.from_json, '{"answers": "yes"}'),
    (AnswerVocab.from_json, "[1]"),
])
def test_vocabulary_files_of_the_wrong_shape_are_a_value_error_saying_what_is_expected(load, text):
    with pytest.raises(ValueError, match=r"holds \{"):
        load(text)


@pytest.mark.parametrize(
    "question, qtype",
    [
        ("Was there a dog?", "yes/no"),  # every auxiliary verb opens a yes/no question, not only the common ones
        ("Were the circles on the left?", "yes/no"),
        ("Did the cat move left?", "yes/no"),
        ("Will the square fall?", "yes/no"),
        ("What shape is at the top left?", "shape"),  # the thing asked for decides, not the place named
        ("What color is the shape?", "color"),
        ("What color is the object on the right?", "color"),
        ("How many color pencils are there?", "count"),
        ("Which star is the brightest?", "other"),  # "right" inside a word names no place
        ("What is topmost?", "other"),
    ],
)
def test_infer_question_type_when_the_wording_names_two_types(question, qtype):
    assert infer_question_type(question) == qtype


def test_a_tokenizer_file_keeps_its_max_length():
    """A run's tokenizer.json must encode at prediction time as training did, cut at the configured length."""
    tok = Tokenizer.build(["what is the colour of the big round thing"], max_length=4)
    again = Tokenizer.from_json(tok.to_json())
    assert again.max_length == 4
    assert again.encode("what is the colour of it") == tok.encode("what is the colour of it") == [2, 10, 5, 8]


@pytest.mark.parametrize("n", [21, 35, 47, 68, 99, 30, 90])
def test_number_words_past_twenty_are_the_number_in_every_spelling(n):
    """"twenty-one" is the answer 21, not "20 1": the vocabulary, evaluation and answer weights all see one answer."""
    from vqa.answer_weights import compute_answer_weights

    units = "one two three four five six seven eight nine".split()
    tens = "twenty thirty forty fifty sixty seventy eighty ninety".split()[n // 10 - 2]
    spellings = [tens] if n % 10 == 0 else [f"{tens}-{units[n % 10 - 1]}", f"{tens.title()} {units[n % 10 - 1]}."]
    for spelling in spellings:
        assert normalize_answer(spelling) == str(n)
        assert AnswerVocab.build([str(n)]).id(spelling) == 0  # a prediction of n counts as right
    assert list(compute_answer_weights([str(n)] + spellings)) == [str(n)]


def test_number_words_next_to_others_keep_their_own_value():
    assert normalize_answer("twenty twenty one") == "20 21"
    assert normalize_answer("twenty one one") == "21 1"
    assert normalize_answer("one twenty") == "1 20"
    assert normalize_answer("twenty 1") == "20 1"  # a digit is not a unit word


def test_a_numbers_thousands_commas_and_decimal_point_are_not_punctuation():
    """"1,000" is the answer 1000 and "3.5" keeps its point: both were two numbers ("1 000", "3 5"), so a prediction
    of 1000 counted as wrong against "1,000", and the answer printed for "3.5" was "3 5"."""
    from vqa.answer_weights import compute_answer_weights

    assert normalize_answer("1,000") == normalize_answer("1000") == "1000"
    assert normalize_answer("12,345,678") == "12345678"
    assert normalize_answer("About 3.5.") == "about 3.5"
    assert normalize_answer("1,2") == "1 2" and normalize_answer("1,2345") == "1 2345"  # no thousands there
    assert normalize_answer("left.5") == "left 5" and normalize_answer("5.left") == "5 left"
    answers = AnswerVocab.build(["1000", "3.5"])
    assert [answers.id(a) for a in ("1,000", "3.5", "3,5", "35")] == [0, 1, -1, -1]
    assert list(compute_answer_weights(["1,000", "1000"])) == ["1000"]


@pytest.mark.parametrize("typed, plain", [("\uff13", "3"), ("\uff32\uff25\uff24", "red"), ("cafe\u0301", "caf\u00e9"),
                                          ("\ufb01sh", "fish")])
def test_an_answer_typed_in_another_unicode_form_is_the_same_answer(typed, plain):
    """Answers are NFKC-normalised as questions are: a full-width "３" or an accent typed as its own mark is the
    class of the plain spelling, in the vocabulary and in evaluation."""
    assert normalize_answer(typed) == plain
    assert AnswerVocab.build([plain]).id(typed) == 0


def test_a_numbers_minus_sign_stays_and_a_dash_between_words_or_numbers_is_punctuation():
    """"-5" is minus five, not the answer 5; a typographic minus is the same sign. The dash of "covid-19" or of a
    range "5-6" is still punctuation."""
    assert normalize_answer("-5") == "-5" != normalize_answer("5")
    assert normalize_answer("\u22123.5") == normalize_answer("-3.5") == "-3.5"
    assert normalize_answer("Covid-19") == "covid 19" and normalize_answer("5-6") == "5 6"
    answers = AnswerVocab.build(["5", "-5"])
    assert answers.itos[answers.id("\u22125")] == "-5"


def test_a_last_a_is_a_letter_not_an_article():
    """The answer "A" of a multiple choice, "vitamin A" or "type A" keeps its letter, where it became empty (a
    refused row) or "vitamin" and "type"; an article before a word still goes."""
    assert [normalize_answer(a) for a in ("A", "A.", "Vitamin A", "type A", "a red car", "the 3")] == [
        "a", "a", "vitamin a", "type a", "red car", "3"]
    answers = AnswerVocab.build(["a", "b", "vitamin", "vitamin a"])
    assert [answers.id(a) for a in ("A", "(b)", "Vitamin A", "the vitamin")] == [0, 1, 3, 2]


@given(st.text(alphabet="0123456789.,- twa\u2212"))
def test_normalize_answer_is_idempotent_on_numbers_and_their_marks(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once


@pytest.mark.parametrize("typed, plain", [("don\u2019t", "don't"), ("top\u2013left", "top-left"), ("top\u2014left", "top-left"),
                                          ("\u201cyes\u201d", '"yes"'), ("\u00abno\u00bb", "no"), ("wait\u2026", "wait...")])
def test_unicode_punctuation_is_punctuation(typed, plain):
    """A spreadsheet's curly apostrophe or dash is the same answer as the ASCII one, in the vocabulary, evaluation and
    answer weights."""
    from vqa.answer_weights import compute_answer_weights

    assert normalize_answer(typed) == normalize_answer(plain)
    assert AnswerVocab.build([plain]).id(typed) == 0
    assert len(compute_answer_weights([plain, typed])) == 1


@pytest.mark.parametrize("typed", [
    "What\u2019s the colour of the caf\u00e9\u2019s sign?",  # a phone's smart apostrophes
    "What's the colour of the cafe\u0301's sign?",  # the accent as a combining mark (NFD)
    "What\u2018s the colour of the caf\u00e9\u2032s sign\uff1f",  # other quote marks, a full-width question mark
])
def test_a_question_typed_with_other_unicode_marks_encodes_as_its_ascii_spelling(typed):
    tokenizer = Tokenizer.build(["What's the colour of the caf\u00e9's sign?"])
    assert tokenizer.encode(typed) == tokenizer.encode("What's the colour of the caf\u00e9's sign?")
    assert Tokenizer.UNK not in tokenizer.encode(typed)


def test_typographic_dashes_and_double_quotes_tokenize_as_ascii():
    assert tokenize("the \u201ctop\u2013left\u201d one") == tokenize('the "top-left" one')


def test_a_runs_vocabularies_written_before_the_new_normalisation_still_read_its_questions_and_answers():
    """tokenizer.json and answers.json of a run trained before tokenize read NFKC and normalize_answer read number
    words past twenty and Unicode punctuation: its questions encode as they trained (no unknown words), and its
    training answers keep their classes (a resume refused them, evaluation counted them wrong)."""
    old_tokenizer = '{"words": ["?", "colour", "many", "s", "sign", "what", "\u2019", "\uff1f"], "max_length": 32}'
    tokenizer = Tokenizer.from_json(old_tokenizer)
    assert tokenizer.encode("What\u2019s the colour?") == [2, 8, 9, 6, 1, 4, 3]  # "the" was unknown to it, as before
    assert tokenizer.encode("How many\uff1f") == [2, 1, 5, 3]  # the file's "?" serves: no unknown word
    assert Tokenizer.from_json(tokenizer.to_json()).encode("What's?") == tokenizer.encode("What\u2019s?")
    answers = AnswerVocab.from_json('{"answers": ["red", "thirty", "don\u2019t"]}')
    assert [answers.id(a) for a in ("red", "thirty", "30", "don\u2019t", "don't")] == [0, 1, 1, 2, 2]
    assert answers.itos == ["red", "30", "don t"]


@pytest.mark.parametrize("text", ["[" * 100000 + "]" * 100000, "[1]", '{"words": ["a"], "max_length": true}',
                                  '{"words": ["a"], "max_length": 0}', '{"words": ["a"], "max_length": -3}'])
def test_a_damaged_tokenizer_file_is_a_value_error(text):
    with pytest.raises(ValueError):
        Tokenizer.from_json(text)


def test_a_damaged_answers_file_nested_too_deeply_is_a_value_error():
    with pytest.raises(ValueError, match="nested too deeply"):
        AnswerVocab.from_json("[" * 100000 + "]" * 100000)


def test_number_words_from_zero_to_nineteen_are_their_digits():
    """"zero" to "nineteen" are the answers 0 to 19: "Zero." and "0" (or "Nineteen" and "19") are one class."""
    words = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
             "seventeen eighteen nineteen").split()
    for n, word in enumerate(words):
        assert normalize_answer(f"{word.title()}.") == str(n)
        assert AnswerVocab.build([str(n)]).id(word) == 0


@pytest.mark.parametrize("verb", ["is", "are", "was", "were", "does", "do", "did", "can", "could", "has", "have",
                                  "will", "would", "should"])
def test_every_auxiliary_verb_opening_a_question_makes_it_yes_no(verb):
    """The question names a place ("left"), so without the auxiliary-verb rule it would be a location question."""
    assert infer_question_type(f"{verb.title()} the square turn left?") == "yes/no"


def test_an_answer_listed_twice_in_an_old_answers_file_takes_the_first_more_frequent_class():
    """An answers.json from before "thirty" became "30" may list both: each reads as "30", and its rows and
    predictions use the first class, the more frequent one the run trained most on, not the last."""
    answers = AnswerVocab.from_json('{"answers": ["30", "red", "thirty"]}')
    assert answers.itos == ["30", "red", "30"]
    assert answers.id("thirty") == answers.id("30") == 0


def test_a_tokenizer_file_gives_each_word_the_id_of_its_place_in_the_file():
    """A run's tokenizer.json lists its words in the order of the embedding rows the checkpoint trained: read back,
    each word keeps its place, whatever that order is (not re-sorted, which would give words other rows)."""
    tokenizer = Tokenizer.from_json('{"words": ["what", "circle", "color"], "max_length": 8}')
    first = len(Tokenizer.SPECIALS)
    assert tokenizer.encode("What color circle?") == [Tokenizer.CLS, first, first + 2, first + 1, Tokenizer.UNK]


def test_a_tokenizer_read_from_an_old_file_has_the_length_of_its_words_not_of_their_aliases():
    """``len(tokenizer)`` sizes the model's word embedding when a run loads: an old file's words read under today's
    spelling too (aliases), but the table still has one row per word of the file, as the checkpoint does."""
    words = ["?", "colour", "what", "\u2019"]  # "\u2019" reads as "'" too: an alias, no new row
    tokenizer = Tokenizer.from_json(f'{{"words": {json.dumps(words)}, "max_length": 32}}')
    assert len(tokenizer) == len(Tokenizer.SPECIALS) + len(words)


@pytest.mark.parametrize("question", ["Isn't the circle on the left?", "Aren't there two circles?",
                                      "Wasn't it at the top?", "Doesn't the square have a color?",
                                      "Didn\u2019t the cat move left?", "Won't the square fall?",
                                      "Can't you see the shape?"])
def test_a_question_opened_by_a_negated_auxiliary_verb_is_yes_no(question):
    """"Isn't the circle on the left?" asks yes or no as "Is the circle on the left?" does: not a location, colour
    or "other" question, in the per-type accuracy and the type head's labels."""
    assert infer_question_type(question) == "yes/no"


@pytest.mark.parametrize("question, qtype", [("Is the circle red or blue?", "other"),
                                             ("Is the square on the left or the right?", "location"),
                                             ("Is the colour of the circle red or green?", "color"),
                                             ("Is the circle red?", "yes/no")])
def test_a_choice_between_two_answers_is_not_a_yes_no_question(question, qtype):
    """"Is it red or blue?" opens with a verb but is answered by one of its choices: it is typed by the rules that
    follow (its answers are no yes or no), where "Is it red?" stays yes/no."""
    assert infer_question_type(question) == qtype


@pytest.mark.parametrize("answer, expected", [(".5", ".5"), ("-.5", "-.5"), ("0.5", "0.5"), ("e.g.", "e g"),
                                              ("v.2", "v 2"), ("5.", "5")])
def test_a_leading_decimal_point_stays(answer, expected):
    """".5" is a half, where it became 5; a point after a letter ("v.2") is still punctuation."""
    assert normalize_answer(answer) == expected == normalize_answer(expected)


@pytest.mark.parametrize("question", ["Is the shape a circle or not?", "Is it on the left or not?",
                                      "Does it have 3 or more sides?", "Are there 2 or fewer circles?"])
def test_or_not_and_or_more_ask_yes_or_no(question):
    """"or not" and "or more" offer no choice of answers: the question is still answered yes or no."""
    assert infer_question_type(question) == "yes/no"
