"""Deterministic answers of the test upstream: which SoT stage a conversation is, and the tokens it gets."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from sot.testing.upstream_options import Kind, UpstreamOptions


@dataclass(frozen=True, slots=True)
class Msg:
    """One chat message, reduced to what the answers depend on."""

    role: str
    content: str


_POINT_REF = re.compile(r"\bpoint\s*#?\s*\d+")
# The reply being continued ends with a numbered point that already has text: "3. Use caching".
_NUMBERED_PREFILL = re.compile(r"(?:^|\n)\s*\d+\.[ \t]*\S[^\n]*$")
_TRAILING_NUMBER = re.compile(r"(\d+)\.[ \t]*$")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'-]*")
_QUESTION = re.compile(r"[^.?!\n]*\?")
_TOKEN = re.compile(r"\s*\S+\s*")

_NUMBER_WORDS = (  # noqa: SIM905 (a split string reads better than a 21-line literal)
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()

# Template words of typical SoT prompts and common function words: never a point's topic.
_STOPWORDS = frozenset(
    """
    about above after again also answer answers another because been before being below between both
    briefly brief could does doing done each either else every explain following from give given have
    having here into just know list make many more most much must need only other ought outline over
    please point points provide question questions really same should shall skeleton some such than that
    their them then there these they thing things this those through very want what when where which
    while whom whose with within without would write writing your yours continue continuing expand
    expanding short sentence sentences words numbered number answering organizer responsible content
    full
    """.split()  # noqa: SIM905
)

_SENTENCES = (
    "{T} matters because it shapes the rest of the answer.",
    "A careful look at {t} shows where the real tradeoffs are.",
    "In practice, {t} works best when it is kept simple and measured.",
    "Most problems with {t} come from skipping the basics.",
    "Start small with {t}, check the results, and adjust as you go.",
)


def _number_word(i: int) -> str:
    return _NUMBER_WORDS[i] if 0 <= i < len(_NUMBER_WORDS) else str(i)


def _topics(text: str) -> list[str]:
    """Content words of the question: the last sentence ending in '?' if there is one, else the text."""
    questions = _QUESTION.findall(text)
    source = questions[-1] if questions else text
    words = (w.lower().strip("'-") for w in _WORD.findall(source))
    topics = list(dict.fromkeys(w for w in words if len(w) > 3 and w not in _STOPWORDS))
    if not topics and questions:
        return _topics(text.replace("?", "."))
    return topics or ["the topic"]


def word_count(text: str) -> int:
    """Prompt tokens as the test upstream counts them: whitespace-separated words."""
    return len(text.split())


def classify(messages: Sequence[Msg]) -> Kind:
    """Which SoT stage a conversation looks like (see the module docstring for the rules)."""
    last = messages[-1]
    prefill = last.content if last.role == "assistant" else ""
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), "").lower()
    if _POINT_REF.search(last_user) or _NUMBERED_PREFILL.search(prefill):
        return "point"
    instructions = " ".join(m.content for m in messages if m.role in ("system", "developer")).lower()
    if any(marker in f"{instructions}\n{last_user}" for marker in ("skeleton", "outline")):
        return "skeleton"
    if "point" in last_user or last.role == "assistant":
        return "point"
    return "full"


def _tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _skeleton_line(i: int, topics: list[str], words: int | None) -> str:
    """Point `i`'s line: "i. Point <number> about <topic>", or exactly `words` words after the number."""
    topic = topics[(i - 1) % len(topics)]
    if words is None:
        return f"{i}. Point {_number_word(i)} about {topic}"
    filler = ["Point", _number_word(i), "about", topic]
    filler += [topics[(i + j) % len(topics)] for j in range(max(0, words - len(filler)))]
    return f"{i}. " + " ".join(filler[: max(1, words)])


def _skeleton_text(topics: list[str], points: int, prefill: str, words: Sequence[int] | None = None) -> str:
    lines = [_skeleton_line(i, topics, None if words is None else words[i - 1]) for i in range(1, points + 1)]
    if not prefill:
        return "\n".join(lines)
    trailing = _TRAILING_NUMBER.search(prefill)
    if trailing:
        # The reply stops right after "k." (typically the "1." prefill): continue from point k's text.
        k = int(trailing.group(1))
        rest = lines[k - 1 :] if 1 <= k <= points else []
        if not rest:
            return ""
        first = rest[0].split(" ", 1)[1]
        lead = "" if prefill[-1].isspace() else " "
        return lead + "\n".join([first, *rest[1:]])
    full = "\n".join(lines)
    if full.startswith(prefill):
        return full[len(prefill) :]
    return ("" if prefill.endswith("\n") else "\n") + full


def _prose_words(topics: list[str], n: int) -> list[str]:
    words: list[str] = []
    j = 0
    while len(words) < n:
        topic = topics[j % len(topics)]
        sentence = _SENTENCES[j % len(_SENTENCES)].format(t=topic, T=topic[:1].upper() + topic[1:])
        words.extend(sentence.split())
        j += 1
    words = words[:n]
    if words and not words[-1].endswith((".", "!", "?")):
        words[-1] = words[-1].rstrip(",;:") + "."
    return words


def _prose_tokens(topics: list[str], n: int, prefill: str) -> list[str]:
    words = _prose_words(topics, n)
    tokens = [w + " " for w in words[:-1]] + words[-1:]
    if tokens and prefill and not prefill[-1].isspace():
        tokens[0] = " " + tokens[0]
    return tokens


def _apply_stop(tokens: list[str], stops: Sequence[str]) -> tuple[list[str], bool]:
    """Tokens up to (not including) the first stop string, and whether one was found."""
    text = "".join(tokens)
    hits = [text.find(s) for s in stops if s and s in text]
    if not hits:
        return tokens, False
    cut = min(hits)
    out: list[str] = []
    pos = 0
    for token in tokens:
        if pos + len(token) <= cut:
            out.append(token)
            pos += len(token)
            continue
        if cut > pos:
            out.append(token[: cut - pos])
        break
    return out, True


@dataclass(frozen=True, slots=True)
class Plan:
    """The whole answer of one request, decided up front."""

    kind: Kind
    tokens: list[str]
    finish_reason: str


def jittered_length(length: int, jitter: float, seed: int, messages: Sequence[Msg]) -> int:
    """`length` scaled by a factor in [1 - jitter, 1 + jitter] that depends only on `seed` and the messages
    (at least 1 when `length` is); `length` itself when `jitter` is 0."""
    if jitter <= 0 or length <= 0:
        return length
    key = json.dumps([seed, [[m.role, m.content] for m in messages]]).encode()
    unit = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64  # in [0, 1)
    return max(1, round(length * (1 + jitter * (2 * unit - 1))))


def plan_answer(
    messages: Sequence[Msg],
    options: UpstreamOptions,
    *,
    tokens: int | None = None,
    kind: Kind | None = None,
    max_tokens: int | None = None,
    stop: Sequence[str] = (),
) -> Plan:
    """The deterministic answer to a conversation, as tokens, with its finish reason. `tokens` is the exact
    length of a prose answer; without it the length comes from the options (with their jitter)."""
    kind = kind or classify(messages)
    last = messages[-1]
    prefill = last.content if last.role == "assistant" else ""
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
    replayed = options.replay.lengths(messages, kind) if options.replay is not None else None
    if kind == "skeleton":
        points = options.skeleton_points
        words = None
        if replayed is not None and replayed.points:
            points, words = replayed.points, replayed.skeleton_words
        answer = _tokenize(_skeleton_text(_topics(last_user), points, prefill, words))
    else:
        if tokens is None and replayed is not None:
            tokens = replayed.tokens
        if tokens is None:
            length = options.tokens_per_answer
            if kind == "full":
                length = round(length * options.full_answer_factor)
            tokens = jittered_length(length, options.tokens_jitter, options.seed, messages)
        numbered = _NUMBERED_PREFILL.search(prefill)
        topics = _topics(numbered.group(0)) if numbered else _topics(last_user)
        answer = _prose_tokens(topics, tokens, prefill)
    answer, _ = _apply_stop(answer, stop)
    # A stop string and max_tokens both end the answer; whichever comes first decides the reason.
    if max_tokens is not None and len(answer) > max_tokens:
        return Plan(kind, answer[:max_tokens], "length")
    return Plan(kind, answer, "stop")
