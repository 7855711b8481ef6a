"""The answer normalisation of the official VQA evaluation (GT-Vision-Lab/VQA, vqaEval.py).

Reimplemented, not copied: the rules and word lists are the official ones so that accuracies
computed here match the published VQAv2 / OK-VQA numbers, including the official script's quirks
(noted where they matter).
"""
from __future__ import annotations

import re

# Number words the official script turns into digits ("none" counts as a number there).
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})

# Contracted forms the official table restores. A form with one apostrophe is restored from
# the word without it ("dont" -> "don't"); a form with several is restored from each spelling
# that lacks exactly one of them ("couldnt've", "couldn'tve" -> "couldn't've"), never from the
# bare word ("couldntve" stays), exactly as the official table lists them.
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've
shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll
someone's something'd something'd've something'll that's there'd there'd've there're there's
they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're
what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've
""".split()


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for form in _CONTRACTED:
        cuts = [i for i, ch in enumerate(form) if ch == "'"]
        if len(cuts) == 1:
            table[form.replace("'", "")] = form
        else:
            for i in cuts:
                table[form[:i] + form[i + 1:]] = form
    # A slip in the official table, kept because it changes scores: "somebody'd" is rewritten
    # to "somebodyd". (Its capitalised keys such as "Im" never match lowercased text and its
    # identity entries such as "let's" change nothing, so neither is listed.)
    table["somebody'd"] = "somebodyd"
    return table


_CONTRACTIONS = _contraction_table()

# Apostrophes and colons are not in the official list ("girl's", "2:50" survive); periods are
# handled separately so that decimals survive.
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a typo'd lookbehind that
# never fires, so in effect every period not followed by a digit goes ("3.5" stays, "5." -> "5").
# (It also passes re.UNICODE as the count, capping removals at 32 per answer; no real answer
# has that many periods.)
_PERIOD = re.compile(r"\.(?!\d)")


def _process_punctuation(text: str) -> str:
    """Drop a punctuation mark where it touches a space (or anywhere once the answer has a digit
    comma, so "1,000" -> "1000"); otherwise turn it into a space ("red,white" -> "red white")."""
    glue = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in _PUNCT:
        drop = glue or (p + " ") in text or (" " + p) in text
        out = out.replace(p, "" if drop else " ")
    return _PERIOD.sub("", out)


def _process_digit_article(text: str) -> str:
    """Lowercase, number words -> digits, drop articles, restore contractions."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_strip(answer: str) -> str:
    """The only cleaning the official script applies to every answer: tabs and newlines become
    spaces, ends are stripped."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def vqa_normalize(answer: str) -> str:
    """Official VQA answer normalisation: punctuation, then digits/articles/contractions.

    >>> vqa_normalize("Two dogs.")
    '2 dogs'
    """
    return _process_digit_article(_process_punctuation(vqa_strip(answer)))
