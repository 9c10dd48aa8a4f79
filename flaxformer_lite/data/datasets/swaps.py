"""Adversarial paraphrase negatives in the spirit of PAWS (Zhang et al. 2019): a sentence with two
of its words exchanged, so its bag of words is exactly the same but its meaning is not.

    "Abraham came to mourn for Sarah" -> "Sarah came to mourn for Abraham"        (swap_names)
    "the king of Israel went to the city." -> "the city of Israel went to the king."  (swap_nouns)

Deterministic rules, no tagger: a *name* is a capitalised word never written in lower case anywhere
in the corpus (so "And" opening a line of poetry, "Son", "God" are not names; "Moses", "Jericho",
"Ramoth-gilead" are); a *noun* is a lower-case word right after a determiner ("the", "his", ...) and
at the end of its phrase (followed by punctuation or a word like "of", "and", "to"). The first two
distinct names of a text are exchanged, else the first two distinct nouns, but never two that are
only listed together ("Moses and Aaron", "the sheep and the oxen": exchanging those keeps the
meaning): some word between them must be neither a conjunction, nor a determiner, nor a candidate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
DETERMINERS = frozenset("the a an his her their my your our its this that these those".split())
# The determiners that leave a noun's number open: "the fathers" and "the delight" both read well
# ("a fathers" would give the swap away).
NOUN_DETERMINERS = frozenset("the his her their my your our its".split())
# Words that end the phrase before them: after "the X", they make X its head noun.
PHRASE_ENDS = frozenset(
    "of and or but nor to in into on upon unto with from for by at that which who whom whose when where "
    "as against before after among over under until".split()
)
# Words that only join a list: a swap across nothing else keeps the meaning ("Moses and Aaron",
# "from Betah and from Berothai").
LISTING = frozenset("and or nor both either neither also even".split()) | DETERMINERS | PHRASE_ENDS
NOT_NOUNS = frozenset("same other one first last whole rest most more".split())

Word = tuple[int, int, str]  # (start, end, text) in the sentence


def lowercase_words(texts: Iterable[str]) -> frozenset[str]:
    """The words that some text writes starting with a lower-case letter (so are not names)."""
    return frozenset(w for t in texts for w in WORD.findall(t) if w[0].islower())


def swap(text: str, lowercase: frozenset[str]) -> tuple[str, str] | None:
    """(`text` with two names or else two nouns exchanged, "swap_names" | "swap_nouns"), or None
    when it has no such pair. `lowercase`: `lowercase_words` of the corpus."""
    words = [(m.start(), m.end(), m.group()) for m in WORD.finditer(text)]
    for kind, candidates in (("swap_names", _names(words, lowercase)), ("swap_nouns", _nouns(words, text))):
        pair = _first_pair(words, candidates)
        if pair is not None:
            (s1, e1, w1), (s2, e2, w2) = words[pair[0]], words[pair[1]]
            return text[:s1] + w2 + text[e1:s2] + w1 + text[e2:], kind
    return None


def _names(words: list[Word], lowercase: frozenset[str]) -> list[int]:
    """Indices of the capitalised words never seen in lower case (not all capitals: "LORD"; not
    possessives: "Aaron's sons" -> "Yahweh sons" would give the swap away)."""
    return [
        i for i, (_, _, w) in enumerate(words)
        if w[0].isupper() and not w.isupper() and "'" not in w and w.lower() not in lowercase
    ]  # fmt: skip


def _nouns(words: list[Word], text: str) -> list[int]:
    """Indices of lower-case words right after a NOUN_DETERMINERS word that end their phrase."""
    out = []
    for i in range(1, len(words)):
        start, end, w = words[i]
        before, after = words[i - 1], words[i + 1] if i + 1 < len(words) else None
        if not w.isalpha() or not w.islower() or len(w) < 3 or w in DETERMINERS | PHRASE_ENDS | NOT_NOUNS:
            continue
        if before[2].lower() not in NOUN_DETERMINERS or text[before[1] : start].strip():
            continue
        if after is None or text[end : after[0]].strip() or after[2].lower() in PHRASE_ENDS:
            out.append(i)  # ends the text, or punctuation or a phrase-ending word follows
    return out


def _first_pair(words: list[Word], candidates: list[int]) -> tuple[int, int] | None:
    """The first two candidates with different words and, between them, a word that is not
    LISTING and not a candidate (so not a list of them)."""
    chosen = set(candidates)
    for x, i in enumerate(candidates):
        for j in candidates[x + 1 :]:
            if words[i][2].lower() == words[j][2].lower():
                continue
            if any(k not in chosen and words[k][2].lower() not in LISTING for k in range(i + 1, j)):
                return i, j
    return None
