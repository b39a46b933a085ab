"""The 25 verifiable instructions of IFEval (Zhou et al. 2023), one pure check each.

`CHECKS[instruction_id] = (check, args)`: `check(response, **kwargs) -> bool`, `args` the
kwargs it takes ({name: type}; all of them required). The semantics follow the paper's
reference implementation (google-research/instruction_following_eval, also in
lm-evaluation-harness), with these choices:
- keywords, forbidden words and section splitters are matched literally (re.escape), where
  the reference passes them to `re` as patterns (the same for the words of the public set);
- language: `langdetect` (as the reference), seeded (DetectorFactory.seed = 0) so a response
  always gets the same verdict; text it cannot classify counts as followed (as the reference);
- sentences: nltk's Punkt algorithm with the English abbreviations of ABBREVIATIONS instead of
  the reference's trained `punkt` model, which is an nltk data download (nothing is downloaded
  here); words of capital_word_frequency: nltk's word tokenizer on those sentences (offline).
"""

from __future__ import annotations

import collections
import functools
import json
import re

RELATIONS = ("less than", "at least")
CONSTRAINED = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
# Abbreviations whose period does not end a sentence (lowercase, without the final period).
ABBREVIATIONS = (
    "mr mrs ms dr prof sr jr st mt vs etc inc ltd co corp dept est approx fig no vol "
    "e.g i.e a.m p.m u.s u.k u.n ph.d jan feb mar apr jun jul aug sep sept oct nov dec"
).split()


def compare(count: int, relation: str, threshold: int) -> bool:
    """count < threshold ("less than") or count >= threshold ("at least")."""
    return count < threshold if relation == "less than" else count >= threshold


@functools.cache
def _sentence_splitter():
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    params = PunktParameters()
    params.abbrev_types = set(ABBREVIATIONS)
    return PunktSentenceTokenizer(params)


def sentences(text: str) -> list[str]:
    return _sentence_splitter().tokenize(text)


def words(text: str) -> list[str]:
    """Word tokens (nltk's Treebank-style tokenizer per sentence; hyphenated words stay one)."""
    from nltk.tokenize import NLTKWordTokenizer

    tok = NLTKWordTokenizer()
    return [w for s in sentences(text) for w in tok.tokenize(s)]


def count_words(text: str) -> int:
    """Runs of word characters, as the reference's RegexpTokenizer(r"\\w+")."""
    return len(re.findall(r"\w+", text))


@functools.cache
def _detector():
    import langdetect

    langdetect.DetectorFactory.seed = 0
    return langdetect


def language_is(text: str, language: str) -> bool:
    """langdetect's verdict is `language`; text it cannot classify counts as True."""
    ld = _detector()
    try:
        return ld.detect(text) == language
    except ld.LangDetectException:
        return True


# ----------------------------------------------------------------------------- keywords
def keyword_existence(text, *, keywords):
    return all(re.search(re.escape(k), text, re.IGNORECASE) for k in keywords)


def keyword_frequency(text, *, keyword, frequency, relation):
    found = re.findall(re.escape(keyword.strip()), text, re.IGNORECASE)
    return compare(len(found), relation, frequency)


def forbidden_words(text, *, forbidden_words):
    return not any(
        re.search(r"\b" + re.escape(w) + r"\b", text, re.IGNORECASE) for w in forbidden_words
    )


def letter_frequency(text, *, letter, let_frequency, let_relation):
    count = collections.Counter(text.lower())[letter.strip().lower()]
    return compare(count, let_relation, let_frequency)


def response_language(text, *, language):
    return language_is(text, language)


# ----------------------------------------------------------------------------- length
def number_sentences(text, *, num_sentences, relation):
    return compare(len(sentences(text)), relation, num_sentences)


def number_paragraphs(text, *, num_paragraphs):
    """Paragraphs split by the markdown divider ***; an empty one inside fails."""
    parts = re.split(r"\s?\*\*\*\s?", text)
    count = len(parts)
    for i, part in enumerate(parts):
        if not part.strip():
            if 0 < i < len(parts) - 1:
                return False
            count -= 1
    return count == num_paragraphs


def number_words(text, *, num_words, relation):
    return compare(count_words(text), relation, num_words)


def nth_paragraph_first_word(text, *, num_paragraphs, nth_paragraph, first_word):
    """Paragraphs split by a blank line ("\\n\\n"); the nth starts with first_word."""
    parts = text.split("\n\n")
    count = sum(bool(p.strip()) for p in parts)
    if nth_paragraph > count:
        return False
    paragraph = parts[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = re.split(r"[.,?!'\"]", word, maxsplit=1)[0].lower()
    return count == num_paragraphs and first == first_word.lower()


# ----------------------------------------------------------------------------- content
def number_placeholders(text, *, num_placeholders):
    return len(re.findall(r"\[.*?\]", text)) >= num_placeholders


def postscript(text, *, postscript_marker):
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, text.lower(), flags=re.MULTILINE))


# ----------------------------------------------------------------------------- format
def number_bullet_lists(text, *, num_bullets):
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def constrained_response(text):
    text = text.strip()
    return any(option in text for option in CONSTRAINED)


def number_highlighted_sections(text, *, num_highlights):
    single = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


def multiple_sections(text, *, section_spliter, num_sections):
    parts = re.split(r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?", text)
    return len(parts) - 1 >= num_sections


def json_format(text):
    text = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    try:
        json.loads(text.removesuffix("```").strip())
    except ValueError:
        return False
    return True


def title(text):
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", text))


# ----------------------------------------------------------------------------- combination
def two_responses(text):
    """Exactly two different non-empty responses separated by ******."""
    parts = text.split("******")
    kept = []
    for i, part in enumerate(parts):
        if part.strip():
            kept.append(part.strip())
        elif 0 < i < len(parts) - 1:
            return False
    return len(kept) == 2 and kept[0] != kept[1]


def repeat_prompt(text, *, prompt_to_repeat):
    return text.strip().lower().startswith(prompt_to_repeat.strip().lower())


def end_checker(text, *, end_phrase):
    return text.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def quotation(text):
    text = text.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


# ----------------------------------------------------------------------------- case
def capital_word_frequency(text, *, capital_frequency, capital_relation):
    count = sum(w.isupper() for w in words(text))
    return compare(count, capital_relation, capital_frequency)


def english_capital(text):
    return text.isupper() and language_is(text, "en")


def english_lowercase(text):
    return text.islower() and language_is(text, "en")


def no_comma(text):
    return "," not in text


CHECKS = {
    "keywords:existence": (keyword_existence, {"keywords": list}),
    "keywords:frequency": (keyword_frequency, {"keyword": str, "frequency": int, "relation": str}),
    "keywords:forbidden_words": (forbidden_words, {"forbidden_words": list}),
    "keywords:letter_frequency": (
        letter_frequency,
        {"letter": str, "let_frequency": int, "let_relation": str},
    ),
    "language:response_language": (response_language, {"language": str}),
    "length_constraints:number_sentences": (
        number_sentences,
        {"num_sentences": int, "relation": str},
    ),
    "length_constraints:number_paragraphs": (number_paragraphs, {"num_paragraphs": int}),
    "length_constraints:number_words": (number_words, {"num_words": int, "relation": str}),
    "length_constraints:nth_paragraph_first_word": (
        nth_paragraph_first_word,
        {"num_paragraphs": int, "nth_paragraph": int, "first_word": str},
    ),
    "detectable_content:number_placeholders": (number_placeholders, {"num_placeholders": int}),
    "detectable_content:postscript": (postscript, {"postscript_marker": str}),
    "detectable_format:number_bullet_lists": (number_bullet_lists, {"num_bullets": int}),
    "detectable_format:constrained_response": (constrained_response, {}),
    "detectable_format:number_highlighted_sections": (
        number_highlighted_sections,
        {"num_highlights": int},
    ),
    "detectable_format:multiple_sections": (
        multiple_sections,
        {"section_spliter": str, "num_sections": int},
    ),
    "detectable_format:json_format": (json_format, {}),
    "detectable_format:title": (title, {}),
    "combination:two_responses": (two_responses, {}),
    "combination:repeat_prompt": (repeat_prompt, {"prompt_to_repeat": str}),
    "startend:end_checker": (end_checker, {"end_phrase": str}),
    "startend:quotation": (quotation, {}),
    "change_case:capital_word_frequency": (
        capital_word_frequency,
        {"capital_frequency": int, "capital_relation": str},
    ),
    "change_case:english_capital": (english_capital, {}),
    "change_case:english_lowercase": (english_lowercase, {}),
    "punctuation:no_comma": (no_comma, {}),
}
RELATION_ARGS = ("relation", "let_relation", "capital_relation")  # values: one of RELATIONS


def follows(instruction_id: str, response: str, kwargs: dict) -> bool:
    """Strict: the response is not blank and passes the instruction's check."""
    check, _ = CHECKS[instruction_id]
    return bool(response.strip()) and bool(check(response, **kwargs))


def loose_variants(response: str) -> list[str]:
    """The response, without its first line, last line or both, each with and without '*'
    (the paper's loose evaluation)."""
    lines = response.split("\n")
    trimmed = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return trimmed + [t.replace("*", "") for t in trimmed]


def follows_loose(instruction_id: str, response: str, kwargs: dict) -> bool:
    """Loose: any loose variant follows the instruction."""
    return any(follows(instruction_id, v, kwargs) for v in loose_variants(response))
