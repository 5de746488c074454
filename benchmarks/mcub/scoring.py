"""Scoring as published, plus the option builders and target extractors tasks refer to by name.

* MCUB / AVQA: prediction = first character of the answer, compared case-sensitively with the raw reference.
* MUSIC-AVQA: prediction and reference both go through the EvalAI answer normalisation, then exact match.
* ModelNet40 (PointLLM "synthetic" scorer): hit iff the class name (lower-cased) is a substring of the answer.
* Log-likelihood: every option is scored; the best one (by sum of log-probabilities, or that sum divided by
  the continuation's character length for the normalised variant) is the prediction.
Accuracy = correct / number of samples x 100 (every question is one line; errors count as wrong).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

from mcomp.benchmarks.mcub.registry import register

# --- EvalAI answer normalisation (MUSIC-AVQA), spec section 5.3 -----------------------------------------

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# Marks handled by the punctuation step, in the published order (the order matters: each test looks at the
# text as it was when the step began, each replacement acts on the running text).
PUNCTUATION_MARKS = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS_REMOVED = 32  # upstream passes re.UNICODE (= 32) as the `count` argument of re.sub

# Apostrophe-less contraction -> its apostrophe form (the VQA evaluation table). The keys with capitals never
# match (the text is lower-cased first); "somebody'd" maps the "wrong" way round, as published.
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def _strip_punctuation(text: str) -> str:
    """Step 3: delete or blank each mark depending on the text at the start of the step; then periods."""
    original = text
    has_digit_comma_digit = _DIGIT_COMMA_DIGIT.search(original) is not None
    for mark in PUNCTUATION_MARKS:
        delete = (mark + " ") in original or (" " + mark) in original or has_digit_comma_digit
        text = text.replace(mark, "" if delete else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", text, count=_MAX_PERIODS_REMOVED)


def evalai_normalize(answer: str) -> str:
    """The EvalAI answer normalisation used by the published MUSIC-AVQA scorer (spec section 5.3)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()  # step 1
    text = text.replace("\n", " ").replace("\t", " ").strip()  # step 2
    text = _strip_punctuation(text)  # step 3
    words = []
    for word in text.split():  # step 4
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


# --- scorers: (model answer or chosen option, reference) -> (prediction, correct) ----------------------


@register("scorer", "first_letter")
def first_letter(value: str, target: str) -> tuple[str, bool]:
    """MCUB / AVQA: the first character, exact and case-sensitive against the raw reference."""
    prediction = value[:1]
    return prediction, prediction == target


@register("scorer", "exact")
def exact(value: str, target: str) -> tuple[str, bool]:
    return value, value == target


@register("scorer", "casefold_exact")
def casefold_exact(value: str, target: str) -> tuple[str, bool]:
    return value, value.strip().casefold() == target.strip().casefold()


@register("scorer", "evalai_exact")
def evalai_exact(value: str, target: str) -> tuple[str, bool]:
    """MUSIC-AVQA: both sides normalised (EvalAI), then exact match."""
    prediction = evalai_normalize(value)
    return prediction, prediction == evalai_normalize(target)


@register("scorer", "label_substring")
def label_substring(value: str, target: str) -> tuple[str, bool]:
    """ModelNet40 'synthetic' scorer (PointLLM): hit iff the class name occurs in the answer (so "table"
    matches "vegetable", as published)."""
    return value, target.lower() in value.lower()


# --- options for log-likelihood scoring -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Option:
    key: str  # what the scorer compares with the reference (a letter, a class name, an answer)
    text: str  # the option's text (for records and continuation templates)

    def continuation(self, template: str) -> str:
        return template.format(key=self.key, letter=self.key, text=self.text)


_LETTERED_LINE = re.compile(r"^\s*([A-Z])[.)]\s+(\S.*?)\s*$", re.MULTILINE)


@register("options", "lettered")
def lettered_options(sample, state, **_) -> list[Option]:
    """Options written in the question as lines "A. text" (or "A) text"), letters in order from A."""
    found = _LETTERED_LINE.findall(sample.question)
    options, expected = [], "A"
    for letter, text in found:
        if letter == expected:
            options.append(Option(letter, text))
            expected = chr(ord(expected) + 1)
        elif options:
            break
    if len(options) < 2:
        raise ValueError(
            f"sample {sample.id!r}: found {len(options)} lettered option line(s) ('A. ...') in the "
            f"question; log-likelihood scoring needs at least 2"
        )
    return options


@register("options", "fixed")
def fixed_options(sample, state, values: Sequence[str] = (), **_) -> list[Option]:
    """The same list for every sample (e.g. the 40 ModelNet40 class names)."""
    if not values:
        raise ValueError("options 'fixed' needs a non-empty 'values' list in the task file")
    return [Option(v, v) for v in values]


@register("options", "answer_vocabulary")
def answer_vocabulary(sample, state, normalize: str | None = "evalai", **_) -> list[Option]:
    """Closed set = the distinct reference answers of the answer key (deduplicated after normalisation)."""
    cache_key = ("answer_vocabulary", normalize)
    if cache_key not in state.memo:
        norm = evalai_normalize if normalize == "evalai" else (lambda s: s)
        seen: dict[str, str] = {}
        for target in state.all_targets():
            seen.setdefault(norm(target), target)
        state.memo[cache_key] = [Option(seen[k], seen[k]) for k in sorted(seen) if k]
    return state.memo[cache_key]


# --- targets: answer-key entry -> reference string --------------------------------------------------------


@register("target", "last_turn")
def last_turn(entry: Mapping[str, Any], **_) -> str:
    """The reference is the last conversation turn's value (MCUB, AVQA, MUSIC-AVQA)."""
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not turns or not isinstance(turns[-1], Mapping):
        raise ValueError(
            f"answer entry {entry.get('_entry_index')} (id {entry.get('id')!r}) has no 'conversations' turns"
        )
    value = turns[-1].get("value")
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(
            f"answer entry {entry.get('_entry_index')} (id {entry.get('id')!r}): "
            f"conversations[-1].value must be the reference answer, got {value!r}"
        )
    return str(value)


@register("target", "label_name")
def label_name(entry: Mapping[str, Any], class_names: Sequence[str] = (), **_) -> str:
    """ModelNet40 annotations: `label_name`, else `class_names[label]`, else the last conversation turn."""
    if isinstance(entry.get("label_name"), str):
        return entry["label_name"]
    if "label" in entry:
        label = entry["label"]
        if not isinstance(label, int) or not 0 <= label < len(class_names):
            raise ValueError(
                f"answer entry {entry.get('_entry_index')} (id {entry.get('id')!r}): label {label!r} "
                f"is not an index into the {len(class_names)} class names"
            )
        return class_names[label]
    return last_turn(entry)


# --- aggregation ----------------------------------------------------------------------------------------


def accuracy(flags: Sequence[bool]) -> tuple[float, float]:
    """Accuracy in percent and its standard error (sample standard deviation / sqrt(n)), in percent."""
    n = len(flags)
    if n == 0:
        return float("nan"), float("nan")
    p = sum(bool(f) for f in flags) / n
    stderr = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
    return 100.0 * p, 100.0 * stderr
