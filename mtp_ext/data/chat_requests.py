"""Chat requests built from the project's texts, for answers by the backbone itself
(:mod:`mtp_ext.data.chat_answers`) on which drafter heads then train.

``chat_requests(split, num, seed)`` returns ``num`` requests, deterministically for a seed, built
only from the texts of ``split`` (:mod:`mtp_ext.data.texts`: the Bibles, the en-es verse pairs and
Austen's novels are split by book / novel, the standard library by module), so validation
requests are held out from training. Each request is a dict::

    {"id": "<kind>-<n>", "kind": kind, "source": "<text>",
     "messages": [{"role": "user", "content": ...}],
     "follow_up": "<second user turn>"}            # multi-turn requests only

``n`` counts the requests of that kind (0, 1, ...); ``source`` names the text the request was
cut from (``"web"``, ``"austen"``, ``"en-es"``, ``"rv1909"`` or ``"python"``).

Kinds, in a balanced mix: 1/7 each (``num // 7`` of every kind, and one more for the first
``num % 7`` kinds of :data:`KINDS`), in an order shuffled by the seed:

- ``question``: a passage of 300-1200 characters (whole sentences) from the WEB Bible or Austen,
  and a question about it (who is mentioned, what happens, why, what a speaker wants, a phrase
  quoted from it explained, ...).
- ``instruction``: a task on a passage or on a line drawn from the texts (rewrite it in modern
  English, a story / poem / letter / dialogue / diary entry inspired by it, list the people and
  things in it, advice for the situation it describes, continue it, ...).
- ``summary``: summarize a passage (one sentence, three bullet points, for a child, a headline,
  ...).
- ``code-explain``: a top-level function, a method or a small class (5-40 lines, cut with
  :mod:`ast`) of a standard-library file, with "what does this do", "explain it line by line",
  "find a bug", "write a docstring" (the docstring removed), "write tests", ...
- ``code-write``: "write a Python function ``name(args)`` that <the first sentence of its
  docstring, turned into the third person>", from documented standard-library functions and
  methods; about one in six asks for another language (JavaScript, Go, Rust, C++, Java).
- ``translation``: an English verse (en-es English side) into Spanish, a Spanish verse (rv1909,
  or the en-es Spanish side) into English, or an Austen sentence into Spanish or French.
- ``multi-turn``: a first request of one of the six kinds above and a ``follow_up`` (make it
  shorter, give an example, explain the second point, translate your answer into Spanish, ...).

Every kind has at least 8 phrasings (:data:`PHRASINGS`), chosen by ``random.Random(seed)``. Text
is clean: no control characters but ``"\\n"`` (code keeps its indentation, tabs expanded), prose
whitespace collapsed (paragraphs of a passage separated by one blank line). Prompts are mostly
under 400 tokens (passages at most 1200 characters, code at most 1400).

Requests never equal or contain a prompt of the benchmark ``bench/prompts/chat.json`` or one of
its sentences (the benchmark stays held out); the check is skipped when that file is absent (an
installed package without the repository).
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
import textwrap
from pathlib import Path

from .python_code import python_files, python_split
from .texts import SPLITS, load_text

__all__ = ["KINDS", "PHRASINGS", "chat_requests", "clean_prose", "split_sentences"]

KINDS = ("question", "instruction", "summary", "code-explain", "code-write", "translation",
         "multi-turn")

PASSAGE_CHARS = (300, 1200)  # a passage's length range, in characters
CODE_LINES = (5, 40)
CODE_CHARS = 1400
_BENCH_FILE = Path(__file__).resolve().parents[2] / "bench" / "prompts" / "chat.json"

# --------------------------------------------------------------------------------------------
# Phrasings
# --------------------------------------------------------------------------------------------

# How a passage and a question are put together ({p}: passage, {q}: question, {src}: where the
# passage comes from).
QUESTION_WRAPPERS = (
    "{p}\n\n{q}",
    "Read this passage:\n\n{p}\n\n{q}",
    "Passage:\n{p}\n\nQuestion: {q}",
    "{q}\n\n{p}",
    "Here is an excerpt from {src}.\n\n{p}\n\n{q}",
    "I'm reading {src} and came across this:\n\n{p}\n\n{q}",
    "Answer the question about the text below.\n\nText: {p}\n\nQuestion: {q} Answer briefly.",
    "{p}\n\nQuestion: {q} Please answer in a few sentences.",
    "Text:\n{p}\n\nBased only on the text above: {q}",
)

# Questions; {name}: a name from the passage, {phrase}: a few words quoted from it.
QUESTIONS = (
    "Who is mentioned in this passage?",
    "What happens in this passage?",
    "Why do the people in this passage act the way they do?",
    "What does the speaker in this passage want?",
    "Explain what the phrase \"{phrase}\" means in this passage.",
    "Who is {name}, and what do we learn about {name} here?",
    "What is the mood or tone of this passage? Give reasons.",
    "What is the main point of this passage?",
    "Where does this scene take place, and who is present?",
    "Does anything surprising happen in this passage? Explain.",
    "List the people mentioned in the passage and say what each one does.",
    "What can we learn about {name} from this passage?",
    "Why does the passage mention \"{phrase}\"?",
    "What question would you ask the author about this passage, and why?",
)

# Tasks on a passage ({p}) or on one line of the texts ({line}); {name}: a name in the passage.
INSTRUCTIONS = (
    "Rewrite this passage in plain modern English:\n\n{p}",
    "Write a short story inspired by the following passage.\n\n{p}",
    "Write a poem of about eight lines inspired by this passage:\n\n{p}",
    "Write a letter from {name} to a friend describing the events of this passage.\n\n{p}",
    "Turn this passage into a dialogue between two people.\n\n{p}",
    "List all the people, places and things mentioned in this passage.\n\n{p}",
    "Imagine you are in the situation described below. What advice would you give, and why?\n\n{p}",
    "Continue this story for one more paragraph.\n\n{p}",
    "Write a diary entry by {name} about the day described in this passage.\n\n{p}",
    "Give this passage a title and explain your choice.\n\n{p}",
    "Write three discussion questions about this passage for a reading group.\n\n{p}",
    "{p}\n\nWrite a short news report about the events above.",
    "Write a short poem inspired by this line: \"{line}\"",
    "Write a short story that begins with the sentence: \"{line}\"",
    "Write a motivational message for a friend based on this sentence: \"{line}\"",
    "Explain in simple words what this sentence means, then give an everyday example: \"{line}\"",
)

SUMMARIES = (
    "Summarize this passage in one sentence:\n\n{p}",
    "Give me three bullet points summarizing the following text.\n\n{p}",
    "Explain what happens in this passage to a ten-year-old child.\n\n{p}",
    "{p}\n\nTL;DR?",
    "Write a short summary (at most 50 words) of the passage below.\n\n{p}",
    "Summarize the main events of this text in two or three sentences:\n\n{p}",
    "Can you give me the gist of this?\n\n{p}",
    "Summarize the following passage, then say in one sentence what its main theme is.\n\n{p}",
    "Write a headline and a one-paragraph summary for this text:\n\n{p}",
    "{p}\n\nSummarize the passage above for someone who has no time to read it.",
)

# {code}: the source, {name}: its name, {module}: the standard-library module it comes from.
CODE_EXPLAINS = (
    "What does this Python function do?\n\n```python\n{code}\n```",
    "Explain this code line by line:\n\n```python\n{code}\n```",
    "Is there a bug in this code? If so, how would you fix it?\n\n```python\n{code}\n```",
    "Write a docstring for the following code.\n\n```python\n{code}\n```",
    "Write unit tests for this code using pytest.\n\n```python\n{code}\n```",
    "Can you explain what `{name}` does and when I would use it?\n\n```python\n{code}\n```",
    "How could this code be simplified or made more readable?\n\n```python\n{code}\n```",
    "What is the time complexity of this code? Explain.\n\n```python\n{code}\n```",
    "Add type hints to this code and explain your choices.\n\n```python\n{code}\n```",
    "```python\n{code}\n```\n\nI found this in the Python standard library ({module}). "
    "What is it for?",
)
_DOCSTRING_TASK = 3  # the index above whose code loses its docstring

# {sig}: "name(args)" (Python) or the name in the target language's style; {desc}: what it does,
# third person ("returns the ...").
CODE_WRITES = (
    "Write a Python function `{sig}` that {desc}.",
    "Can you write a function called {name} in Python that {desc}?",
    "I need a Python function named `{sig}` which {desc}. Please include a docstring.",
    "Implement `{sig}` in Python: it {desc}. Add a short example of how to call it.",
    "Write Python code for a function {name} that {desc}. Explain how it works afterwards.",
    "Please write a small Python function `{sig}` that {desc}, and include two tests.",
    "How would I write a function that {desc}? Call it `{name}`.",
    "Create a Python helper `{sig}` that {desc}. Keep it short.",
    "Show me how to write a function `{sig}` that {desc}, using only the standard library.",
)
CODE_WRITES_OTHER = (
    "Write a {lang} function `{name}` that {desc}.",
    "How would you implement `{name}` in {lang}? It {desc}.",
    "In {lang}, write a function {name} that {desc}, with a short comment for each step.",
)
OTHER_LANGUAGES = ("JavaScript", "Go", "Rust", "C++", "Java")

# {text}: the text, {src} / {dst}: languages.
TRANSLATIONS = (
    "Translate into {dst}: \"{text}\"",
    "Please translate the following {src} sentence into {dst}.\n\n{text}",
    "How would you say this in {dst}?\n\n{text}",
    "{text}\n\nTranslate the text above into {dst}.",
    "Translate from {src} to {dst}:\n{text}",
    "Can you give me a {dst} translation of this? \"{text}\"",
    "I need this in {dst}, please: {text}",
    "Render the following {src} text in natural, modern {dst}:\n\n{text}",
    "What does this mean in {dst}? \"{text}\"",
    "Translate the following into {dst}, then explain any word that was hard to translate."
    "\n\n{text}",
)

FOLLOW_UPS = (
    "Can you make that shorter?",
    "Give me an example.",
    "Explain the second point in more detail.",
    "Translate your answer into Spanish.",
    "Turn that into a bulleted list.",
    "Thanks! Can you explain it more simply, as if I were twelve?",
    "What is the most important part of your answer?",
    "Can you rewrite your answer in a more formal tone?",
    "Summarize your answer in one sentence.",
    "Are you sure? Please double-check your answer.",
    "Why? Please explain your reasoning.",
)
FOLLOW_UPS_BY_KIND = {
    "question": ("Who else is mentioned, and how are they related?",
                 "Can you quote the sentence that supports your answer?",
                 "What happens next, do you think?"),
    "instruction": ("Make it twice as long.", "Now make it funny.",
                    "Can you give it a title?"),
    "summary": ("Now make it even shorter: ten words at most.",
                "What did your summary leave out?", "Give the summary a title."),
    "code-explain": ("Can you add type hints and a docstring?", "Now write a test for it.",
                     "How would you write the same thing in JavaScript?"),
    "code-write": ("Can you add error handling?", "Now write two tests for it.",
                   "What is its time complexity?"),
    "translation": ("Now translate it into French.", "Which words were the hardest to translate?",
                    "Translate your translation back, word for word."),
}

PHRASINGS = {
    "question": QUESTIONS,
    "instruction": INSTRUCTIONS,
    "summary": SUMMARIES,
    "code-explain": CODE_EXPLAINS,
    "code-write": CODE_WRITES,
    "translation": TRANSLATIONS,
    "multi-turn": FOLLOW_UPS,
}

_SOURCE_NAMES = {
    "web": ("the Bible", "the World English Bible", "an old religious text"),
    "austen": ("a novel by Jane Austen", "a Jane Austen novel", "an old English novel"),
}

_VERBS = set("""
accept acquire add adjust allocate append apply ask assert assign attach attempt build calculate
call cancel change check clean clear close collect combine compare compile compute concatenate
configure connect construct convert copy count create decode decompress decorate define delete
detect determine disable dispatch do dump emit enable encode ensure escape evaluate execute expand
extend extract fetch fill filter find finish fix flush format generate get give guess handle
ignore import increment initialize insert install interpret invoke iterate join keep list load
locate look make match merge move normalize notify open pack parse perform pop prepare print
process produce put quote raise read receive reduce register reload remove rename render replace
reset resolve restore retrieve return reverse run save scan search select send serialize set show
shut skip sort split start stop strip substitute take tell terminate test translate truncate try
unpack unquote unwrap update validate verify wait wrap write yield""".split())

_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "messrs", "col", "capt", "gen", "rev", "esq",
                  "no", "vol", "ch", "viz", "vs", "sr", "jr", "e.g", "i.e", "etc"}
_NAME_STOP = {"I", "The", "And", "But", "He", "She", "It", "They", "We", "You", "His", "Her",
              "O", "Oh", "Then", "Now", "When", "For", "If", "In", "Of", "To", "This", "That",
              "There", "What", "Yes", "No", "My", "Your", "Our", "Their", "A", "An", "As", "At",
              "By", "On", "So", "Not", "All", "Behold", "Let", "Do", "Is", "Be", "With", "Sir",
              "Madam", "Miss", "Lady", "Mr", "Mrs", "Dr", "Well", "Why", "How", "Who", "Thus",
              "Therefore", "Yet", "Or", "Nor", "From", "After", "Before", "While", "Indeed"}
_TITLES = ("Mr.", "Mrs.", "Miss", "Lady", "Sir", "Colonel", "Captain", "King", "Queen", "Dr.")


# --------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# Unicode's format characters (category Cf): soft hyphen, zero-width spaces and joiners,
# direction marks, byte-order mark, ...
_FORMAT = re.compile(
    "[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f"
    "\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001"
    "\U000e0020-\U000e007f]"
)


def _drop_control(text: str, keep_newlines: bool = False) -> str:
    """Control characters (Cc) become spaces (but ``"\\n"`` with ``keep_newlines``); format
    characters (Cf) go."""
    text = _FORMAT.sub("", text)
    if keep_newlines:
        return "\n".join(_CONTROL.sub(" ", line) for line in text.split("\n"))
    return _CONTROL.sub(" ", text)


def clean_prose(text: str) -> str:
    """``text`` on one line: control and format characters dropped, whitespace runs collapsed to
    one space, ends stripped."""
    return " ".join(_drop_control(text).split())


def _clean_code(text: str) -> str:
    """Source code: tabs expanded, line ends normalized, control characters but ``"\\n"`` dropped,
    trailing spaces stripped, blank lines at both ends removed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    lines = [line.rstrip() for line in _drop_control(text, keep_newlines=True).split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def _fix_caps(text: str) -> str:
    """A paragraph or verse opening with words in capitals ("THIS little work", "PABLO y Timoteo",
    "Y ACONTECIÓ en") gets them in sentence case (up to three such words, then a lower-case one)."""
    words = text.split(" ")
    letters = [re.sub(r"\W", "", w) for w in words[:4]]
    n = 0
    while n < len(letters) and letters[n].isupper():
        n += 1
    if n == 0 or n >= min(4, len(words)) or not any(len(x) > 1 for x in letters[:n]):
        return text

    def first_up(w: str) -> str:
        w = w.lower()
        i = next((k for k, ch in enumerate(w) if ch.isalpha()), None)
        return w if i is None else w[:i] + w[i].upper() + w[i + 1:]

    return " ".join([first_up(words[0])] + [w.lower() for w in words[1:n]] + words[n:])


_SENT_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of one paragraph of prose: cut after ``.``, ``!`` or ``?`` (and closing quotes or
    brackets) followed by whitespace and a capital letter, an opening quote or ``¿¡(``; not after
    abbreviations (Mr., Mrs., St., ...)."""
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        nxt = text[m.end(): m.end() + 1]
        if not nxt or not (nxt.isupper() or nxt in "\"'\u201c\u2018(\u00bf\u00a1"):
            continue
        if m.group().startswith("."):
            word = re.search(r"([\w.]+)$", text[max(start, m.start() - 12): m.start()])
            if word and (word.group(1).lower() in _ABBREVIATIONS or len(word.group(1)) == 1):
                continue
        piece = text[start: m.end()].strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def _names(passage: str) -> list[str]:
    """Names in a passage: capitalized words not opening a sentence (with a title before them when
    there is one), most frequent first."""
    counts: dict[str, int] = {}
    for m in re.finditer(r"\b[A-Z][a-z]{2,}\b", passage):
        word = m.group()
        before = passage[: m.start()].rstrip()
        if word in _NAME_STOP or not before or before[-1] in ".!?:\"'\u201c\u2018(\n":
            continue
        for title in _TITLES:
            if before.endswith(title):
                word = f"{title} {word}"
                break
        counts[word] = counts.get(word, 0) + 1
    return sorted(counts, key=lambda w: -counts[w])


def _phrase(rng: random.Random, passage: str) -> str | None:
    """3-6 consecutive words of the passage, without punctuation at the ends."""
    words = passage.split()
    if len(words) < 8:
        return None
    for _ in range(10):
        n = rng.randint(3, 6)
        i = rng.randrange(len(words) - n)
        phrase = " ".join(words[i: i + n]).strip(".,;:!?\"'()\u201c\u201d\u2018\u2019\u2014")
        if len(phrase.split()) >= 3 and '"' not in phrase:
            return phrase
    return None


def _third_person(desc: str) -> str | None:
    """``"Return the value."`` -> ``"returns the value"``; None unless the description opens with
    a known verb (imperative or already in the third person)."""
    desc = desc.strip().rstrip(".").strip()
    m = re.match(r"([A-Za-z]+)(.*)$", desc, re.S)
    if not m:
        return None
    verb, rest = m.group(1).lower(), m.group(2)
    if re.match(r"\s+(of|is|are|was|for)\b", rest):  # "List of ...", "Return value is ..."
        return None
    if verb in _VERBS:
        if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
            verb += "es"
        elif verb.endswith("y") and verb[-2:-1] not in "aeiou":
            verb = verb[:-1] + "ies"
        else:
            verb += "s"
    elif not (verb.endswith("s") and verb[:-1] in _VERBS or verb.endswith("es") and verb[:-2] in _VERBS
              or verb.endswith("ies") and verb[:-3] + "y" in _VERBS):
        return None
    return verb + rest


def _camel(name: str) -> str:
    parts = [p for p in name.split("_") if p]
    return parts[0] + "".join(p.capitalize() for p in parts[1:]) if parts else name


# --------------------------------------------------------------------------------------------
# The benchmark's prompts (held out)
# --------------------------------------------------------------------------------------------

_BENCH_CACHE: list[tuple[str, ...]] = []


def _bench_pieces() -> tuple[str, ...]:
    """Lower-cased, whitespace-collapsed benchmark prompts, and their lines and sentences of 25
    characters or more (also what follows a label such as ``"English: "``); empty when the
    benchmark file is absent."""
    if not _BENCH_CACHE:
        pieces: set[str] = set()
        if _BENCH_FILE.is_file():
            with open(_BENCH_FILE, encoding="utf-8") as f:
                entries = json.load(f)
            texts = []
            for entry in entries:
                texts += [m["content"] for m in entry.get("messages", []) if m.get("role") == "user"]
                if entry.get("text"):
                    texts.append(entry["text"])
            for text in texts:
                for para in text.split("\n"):
                    found = [para] + split_sentences(para)
                    found += [x.split(": ", 1)[1] for x in found if ": " in x]  # "English: ..."
                    for piece in found:
                        piece = clean_prose(piece).lower().strip(" \"'")
                        if len(piece) >= 25:
                            pieces.add(piece)
                whole = clean_prose(text).lower()
                if whole:
                    pieces.add(whole)
        _BENCH_CACHE.append(tuple(sorted(pieces)))
    return _BENCH_CACHE[0]


def _touches_bench(request: dict) -> bool:
    """Whether a request's user turns equal or contain a benchmark prompt or sentence."""
    pieces = _bench_pieces()
    if not pieces:
        return False
    turns = [m["content"] for m in request["messages"] if m["role"] == "user"]
    if request.get("follow_up"):
        turns.append(request["follow_up"])
    text = clean_prose(" ".join(turns)).lower()
    return any(p in text for p in pieces)


# --------------------------------------------------------------------------------------------
# Sources: passages, lines, verses and code of one split
# --------------------------------------------------------------------------------------------


class _Sources:
    """The texts of one split, loaded on first use (items cleaned only when picked), and pickers
    of passages, sentences, verses and code; ``used`` keeps passages, verses and code from
    repeating while unused ones are easy to find."""

    def __init__(self, split: str):
        self.split = split
        self._cache: dict = {}
        self.used: set = set()

    def _get(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _unused(self, rng: random.Random, tag: str, count: int, item, tries: int = 100):
        """``item(i)`` (None: unusable) for a random ``i < count``, preferring unused ones."""
        if count:
            for attempt in range(tries):
                i = rng.randrange(count)
                if (tag, i) in self.used and attempt < tries * 3 // 4:
                    continue
                got = item(i)
                if got is not None:
                    self.used.add((tag, i))
                    return got
        raise ValueError(f"the {self.split!r} split of the texts holds too few usable items for "
                         f"these requests ({tag})")

    # -- prose --

    def web_sentences(self, c: int) -> list[tuple[str, bool]]:
        """Chapter ``c`` of the WEB as ``(sentence, whether it starts outside quotation marks)``."""
        def build():
            out, depth = [], 0
            for sent in split_sentences(clean_prose(self._get("web", lambda: load_text(
                    "web", self.split))[c])):
                out.append((sent, depth == 0))
                depth = max(0, depth + sent.count("\u201c") - sent.count("\u201d"))
            return out
        return self._get(("web", c), build)

    def austen_paragraphs(self) -> list[str | None]:
        """Austen's paragraphs, cleaned; None marks a heading or a title (a passage stops there)."""
        def build():
            out: list[str | None] = []
            for p in load_text("austen", self.split):
                p = re.sub(r"(?<!\w)_(\w[^_]*?)_(?!\w)", r"\1", clean_prose(p))  # _so_ -> so
                heading = (not re.search(r"[a-z]", p) or p.isupper() or re.match(r"(CHAPTER|Chapter|VOLUME)\b", p)
                           or len(p.split()) < 3 and not p.endswith(('"', "."))
                           or p.startswith("by") and len(p) < 40)
                out.append(None if heading else _fix_caps(p))
            return out
        return self._get("austen", build)

    def _web_passage(self, rng, c: int, target: int, lo: int, hi: int) -> str | None:
        sents = self.web_sentences(c)
        starts = [i for i, (_, outside) in enumerate(sents) if outside]
        if not starts:
            return None
        i = rng.choice(starts)
        acc: list[str] = []
        closed = 0  # how many of acc end outside quotation marks
        for k in range(i, len(sents)):
            sent = sents[k][0]
            if len(" ".join(acc + [sent])) > hi:
                break
            acc.append(sent)
            if k + 1 == len(sents) or sents[k + 1][1]:
                closed = len(acc)
            if len(" ".join(acc)) >= target and closed == len(acc):
                break
        if closed and len(" ".join(acc[:closed])) >= lo:
            acc = acc[:closed]  # do not stop inside a quotation
        return " ".join(acc)

    def _austen_passage(self, i: int, target: int, hi: int) -> str | None:
        paras = self.austen_paragraphs()
        if paras[i] is None:
            return None
        parts: list[str] = []
        for p in paras[i:]:
            if p is None:
                break
            size = len("\n\n".join(parts + [p]))
            if size > hi:  # take the sentences of this paragraph that fit
                fit: list[str] = []
                for sent in split_sentences(p):
                    if len("\n\n".join(parts + [" ".join(fit + [sent])])) > hi:
                        break
                    fit.append(sent)
                if fit:
                    parts.append(" ".join(fit))
                break
            parts.append(p)
            if size >= target:
                break
        return "\n\n".join(parts)

    def passage(self, rng: random.Random, texts=("web", "austen"), lo: int = PASSAGE_CHARS[0],
                hi: int = PASSAGE_CHARS[1]) -> tuple[str, str]:
        """``(text name, passage)``: whole sentences, ``lo`` to ``hi`` characters (Austen's
        paragraphs separated by blank lines; the WEB's never starting inside a quotation)."""
        for attempt in range(300):
            name = rng.choice(texts)
            target = rng.randint(lo, hi)
            if name == "web":
                c = rng.randrange(len(self._get("web", lambda: load_text("web", self.split))))
                text = self._web_passage(rng, c, target, lo, hi)
            else:
                i = rng.randrange(len(self.austen_paragraphs()))
                text = self._austen_passage(i, target, hi)
            if text is None or not lo <= len(text) <= hi:
                continue
            key = (name, text[:80])
            if key in self.used and attempt < 200:
                continue
            self.used.add(key)
            return name, text
        raise ValueError(f"no passage of {lo}-{hi} characters found in the {self.split!r} texts")

    def line(self, rng: random.Random) -> tuple[str, str]:
        """``(text name, sentence)``: one sentence of 40-250 characters from the WEB or Austen,
        outside quotation marks."""
        for _ in range(300):
            name = rng.choice(("web", "austen"))
            if name == "web":
                c = rng.randrange(len(self._get("web", lambda: load_text("web", self.split))))
                sents = [s for s, outside in self.web_sentences(c) if outside]
            else:
                p = rng.choice(self.austen_paragraphs())
                sents = split_sentences(p) if p else []
            if not sents:
                continue
            s = rng.choice(sents)
            if (40 <= len(s) <= 250 and not any(q in s for q in '"\u201c\u201d')
                    and s[0].isupper() and ("line", s) not in self.used):
                self.used.add(("line", s))
                return name, s
        raise ValueError(f"no sentence of 40-250 characters found in the {self.split!r} texts")

    # -- translation --

    def _pair(self, i: int) -> tuple[str, str] | None:
        pairs = self._get("en-es", lambda: load_text("en-es", self.split))
        en, _, es = pairs[i].partition("\t")
        en, es = clean_prose(en), _fix_caps(clean_prose(es))
        return (en, es) if 30 <= len(en) <= 500 and 30 <= len(es) <= 500 else None

    def english_verse(self, rng: random.Random) -> str:
        count = len(self._get("en-es", lambda: load_text("en-es", self.split)))
        return self._unused(rng, "en-es", count, self._pair)[0]

    def spanish_verse(self, rng: random.Random) -> tuple[str, str]:
        """``(text name, verse)`` from the RV1909 or the Spanish side of en-es."""
        if rng.random() < 0.5:
            verses = self._get("rv1909", lambda: load_text("rv1909", self.split, unit="verse"))

            def verse(i):
                v = _fix_caps(clean_prose(verses[i]))
                return v if 30 <= len(v) <= 500 else None

            return "rv1909", self._unused(rng, "rv1909", len(verses), verse)
        count = len(self._get("en-es", lambda: load_text("en-es", self.split)))
        return "en-es", self._unused(rng, "en-es", count, self._pair)[1]

    def austen_sentence(self, rng: random.Random) -> str:
        paras = self.austen_paragraphs()

        def sentence(i):
            if paras[i] is None:
                return None
            sents = [s for s in split_sentences(paras[i]) if 40 <= len(s) <= 400]
            return sents[i % len(sents)] if sents else None

        return self._unused(rng, "austen-s", len(paras), sentence, tries=300)

    # -- code --

    def code_files(self) -> list[tuple[str, Path]]:
        """``[(path under the standard library, path)]`` of the split's files: the items of
        ``load_text("python", split)``, read one by one when picked."""
        def build():
            root = Path(sysconfig.get_paths()["stdlib"])
            out = []
            for module, path in python_files():
                if python_split(module) == self.split:
                    try:
                        label = path.relative_to(root).as_posix()
                    except ValueError:
                        label = path.name
                    out.append((label, path))
            return out
        return self._get("python", build)

    def code_units(self, f: int) -> list[dict]:
        """Functions, methods and classes of 5-40 lines in file ``f``: name, module (the file's
        path under the standard library), code (the source, dedented), code_no_doc (without its
        docstring, or None), doc (the docstring's first sentence or None), args (the signature's
        arguments, ``self`` / ``cls`` dropped; None for a class)."""
        def build():
            module, path = self.code_files()[f]
            try:
                src = path.read_text(encoding="utf-8")
                tree = ast.parse(src)
            except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
                return []
            lines = src.split("\n")
            units = []

            def add(node, owner: str | None):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                end = node.end_lineno or node.lineno
                if not CODE_LINES[0] <= end - first + 1 <= CODE_LINES[1]:
                    return
                code = _clean_code(textwrap.dedent("\n".join(lines[first - 1: end])))
                if len(code) > CODE_CHARS or not code.isascii():
                    return
                no_doc = None
                body0 = node.body[0] if node.body else None
                if (isinstance(body0, ast.Expr) and isinstance(body0.value, ast.Constant)
                        and isinstance(body0.value.value, str) and len(node.body) > 1):
                    keep = [ln for i, ln in enumerate(lines[first - 1: end], first)
                            if not body0.lineno <= i <= body0.end_lineno]
                    no_doc = _clean_code(textwrap.dedent("\n".join(keep)))
                doc = ast.get_docstring(node)
                summary = None
                if doc:
                    para = clean_prose(doc.strip().split("\n\n")[0])
                    sents = split_sentences(para)
                    summary = sents[0] if sents else None
                args = None
                if not isinstance(node, ast.ClassDef):
                    names = [a.arg for a in node.args.posonlyargs + node.args.args
                             + node.args.kwonlyargs]
                    if owner and names and names[0] in ("self", "cls"):
                        names = names[1:]
                    args = names
                units.append(dict(name=node.name, owner=owner, module=module, code=code,
                                  code_no_doc=no_doc, doc=summary, args=args,
                                  key=("python", f, node.lineno)))

            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    add(node, None)
                elif isinstance(node, ast.ClassDef):
                    add(node, None)
                    for item in node.body:
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            add(item, node.name)
            return units
        return self._get(("code", f), build)

    def code_unit(self, rng: random.Random, want=lambda u: True) -> dict:
        files = self.code_files()
        if not files:
            raise ValueError(f"no Python files in the {self.split!r} split")
        for attempt in range(400):
            units = [u for u in self.code_units(rng.randrange(len(files))) if want(u)]
            if not units:
                continue
            unit = rng.choice(units)
            if unit["key"] in self.used and attempt < 300:
                continue
            self.used.add(unit["key"])
            return unit
        raise ValueError(f"no suitable Python code found in the {self.split!r} split")


# --------------------------------------------------------------------------------------------
# Builders, one per kind: (source text, first user turn)
# --------------------------------------------------------------------------------------------


def _question(src: _Sources, rng: random.Random) -> tuple[str, str]:
    name, p = src.passage(rng)
    names, phrase = _names(p), _phrase(rng, p)
    quoted = any(q in p for q in '"\u201c')
    options = [q for q in QUESTIONS if ("{name}" not in q or names)
               and ("{phrase}" not in q or phrase) and ("speaker" not in q or quoted)]
    q = rng.choice(options).format(name=names[0] if names else "", phrase=phrase or "")
    wrapper = rng.choice(QUESTION_WRAPPERS)
    return name, wrapper.format(p=p, q=q, src=rng.choice(_SOURCE_NAMES[name]))


def _instruction(src: _Sources, rng: random.Random) -> tuple[str, str]:
    template = rng.choice(INSTRUCTIONS)
    if "{line}" in template:
        name, line = src.line(rng)
        return name, template.format(line=line)
    for _ in range(20):
        name, p = src.passage(rng, lo=PASSAGE_CHARS[0], hi=900)
        names = _names(p)
        if "{name}" not in template or names:
            return name, template.format(p=p, name=names[0] if names else "")
        template = rng.choice([t for t in INSTRUCTIONS if "{line}" not in t])
    return name, INSTRUCTIONS[0].format(p=p)


def _summary(src: _Sources, rng: random.Random) -> tuple[str, str]:
    name, p = src.passage(rng, lo=400)
    return name, rng.choice(SUMMARIES).format(p=p)


def _code_explain(src: _Sources, rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(len(CODE_EXPLAINS))
    unit = src.code_unit(rng, (lambda u: u["code_no_doc"] is not None) if i == _DOCSTRING_TASK
                         else (lambda u: True))
    code = unit["code_no_doc"] if i == _DOCSTRING_TASK else unit["code"]
    return "python", CODE_EXPLAINS[i].format(code=code, name=unit["name"], module=unit["module"])


def _documented(unit: dict) -> bool:
    return (unit["args"] is not None and unit["doc"] is not None
            and not (unit["name"].startswith("__") and unit["name"].endswith("__"))
            and 15 <= len(unit["doc"]) <= 200 and ">>>" not in unit["doc"]
            and unit["doc"].endswith(".") and not unit["doc"].endswith(("e.g.", "i.e.", ":."))
            and "e.g:" not in unit["doc"]
            and _third_person(unit["doc"]) is not None)


def _code_write(src: _Sources, rng: random.Random) -> tuple[str, str]:
    unit = src.code_unit(rng, _documented)
    desc = _third_person(unit["doc"])
    desc = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", desc).replace("``", "`")
    name = unit["name"].lstrip("_") or unit["name"]
    if rng.random() < 1 / 6:
        lang = rng.choice(OTHER_LANGUAGES)
        styled = name if lang in ("Rust", "C++") else _camel(name)
        return "python", rng.choice(CODE_WRITES_OTHER).format(lang=lang, name=styled, desc=desc)
    sig = f"{name}({', '.join(unit['args'])})"
    if len(sig) > 60:
        sig = name
    return "python", rng.choice(CODE_WRITES).format(sig=sig, name=name, desc=desc)


def _translation(src: _Sources, rng: random.Random) -> tuple[str, str]:
    r = rng.random()
    if r < 0.35:
        name, text, lang, dst = "en-es", src.english_verse(rng), "English", "Spanish"
    elif r < 0.7:
        name, text = src.spanish_verse(rng)
        lang, dst = "Spanish", "English"
    else:
        name, text, lang = "austen", src.austen_sentence(rng), "English"
        dst = "Spanish" if rng.random() < 0.6 else "French"
    return name, rng.choice(TRANSLATIONS).format(text=text, src=lang, dst=dst)


_BUILDERS = {
    "question": _question,
    "instruction": _instruction,
    "summary": _summary,
    "code-explain": _code_explain,
    "code-write": _code_write,
    "translation": _translation,
}


def _follow_up(rng: random.Random, base: str) -> str:
    if rng.random() < 0.5:
        return rng.choice(FOLLOW_UPS_BY_KIND[base])
    return rng.choice(FOLLOW_UPS)


def chat_requests(split: str, num: int, seed: int = 0) -> list[dict]:
    """``num`` chat requests built from the texts of ``split`` (see the module docstring).

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"``; only that split's texts are used.
        num: how many requests (>= 1); ``num // 7`` or ``num // 7 + 1`` of each kind.
        seed: the seed of every choice; the same ``(split, num, seed)`` gives the same list.
    Returns:
        A list of dicts ``{"id", "kind", "source", "messages": [{"role": "user", "content"}]}``,
        multi-turn ones with ``"follow_up"`` too.
    Raises:
        ValueError: an unknown split or a ``num`` that is not a positive int; FileNotFoundError:
            the texts are not prepared (``mtp-ext assets prepare``).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    rng = random.Random(seed)
    src = _Sources(split)
    kinds = [KINDS[i % len(KINDS)] for i in range(num)]
    rng.shuffle(kinds)
    counts = dict.fromkeys(KINDS, 0)
    out = []
    for kind in kinds:
        for _ in range(100):
            base = rng.choice(list(_BUILDERS)) if kind == "multi-turn" else kind
            source, content = _BUILDERS[base](src, rng)
            request = {"id": f"{kind}-{counts[kind]}", "kind": kind, "source": source,
                       "messages": [{"role": "user", "content": content}]}
            if kind == "multi-turn":
                request["follow_up"] = _follow_up(rng, base)
            if not _touches_bench(request):
                break
        else:  # pragma: no cover - would need a benchmark built from the texts themselves
            raise ValueError(f"could not build a {kind} request that avoids the benchmark prompts")
        counts[kind] += 1
        out.append(request)
    return out
