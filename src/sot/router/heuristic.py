"""The heuristic router: a few readable rules, for a fallback and a baseline; no model and no I/O.

SoT suits answers that are lists of independent points and hurts code, math, step-by-step reasoning,
short answers and single pieces of writing. The rules say exactly that, in order of how costly a wrong
skeleton would be: code, math and step-by-step requests are answered normally whatever else they say;
an explicit request for a list, or a typical list question ("what are some ways", "how can I",
"what if"), gets SoT; anything else gets normal decoding, the safe default. These rules are not tuned to
a benchmark and deliberately do not try to be clever: the trained router is the one to use.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from sot.backends.base import Message
from sot.router.base import RouteDecision, RouterInput, router_input

_LANGS = r"python|java|javascript|typescript|c\+\+|c#|rust|golang|ruby|php|kotlin|swift|bash|sql|matlab|haskell|scala"
_CODE_NOUNS = (
    r"program|function|script|code|class|method|algorithm|regex|regular expression|query|snippet|"
    r"unit tests?|api|endpoint|sql|bash|shell command|one-liner|data structure"
)
_WRITING_NOUNS = (
    r"poem|story|stories|letter|e-?mail|essay|song|lyrics|script|speech|review|blog|post|article|"
    r"announcement|haiku|limerick|joke|tweet|ad|advert\w*|slogan|dialog(?:ue)?|novel|chapter|paragraph|"
    r"sonnet|rap|toast|eulogy|bio|biography|description|message|note|invitation|proposal|cover letter|"
    r"resume|cv|press release|product description|monologue|soliloquy|limerick"
)
_LIST_NOUNS = (
    r"tips|ways|strategies|methods|techniques|factors|reasons|benefits|advantages|disadvantages|"
    r"pros and cons|challenges|differences|similarities|ideas|suggestions|examples|types|kinds|aspects|"
    r"causes|effects|impacts|implications|consequences|considerations|features|characteristics|options|"
    r"alternatives|recommendations|best practices|habits|skills|signs|clues|mistakes|principles|elements|"
    r"components|qualities|traits|arguments|risks|drawbacks|applications|uses"
)


@dataclass(frozen=True)
class Rule:
    """A named pattern; `use_sot` is what a match decides."""

    name: str
    use_sot: bool
    pattern: re.Pattern[str]


def _rule(name: str, use_sot: bool, *patterns: str) -> Rule:
    return Rule(name, use_sot, re.compile("|".join(f"(?:{p})" for p in patterns), re.MULTILINE))


# Checked in this order; the first rule that matches decides.
RULES: tuple[Rule, ...] = (
    _rule(
        "code",
        False,
        r"```",
        r"^\s*(?:def |class |import |from \S+ import |#include|public |private |function |const |let |var )",
        rf"\b(?:write|implement|develop|create|code|build|generate|fix|debug|refactor|optimi[sz]e|complete)\b"
        rf"[^.?!\n]{{0,60}}\b(?:{_CODE_NOUNS})\b",
        rf"\b(?:in|using) (?:{_LANGS})\b",
        r"\b(?:stack ?trace|traceback|segfault|syntax error|compiler? error)\b",
    ),
    _rule(
        "math",
        False,
        r"\d\s*[-+*/^×÷=<>]\s*\(?-?\d",
        r"\b\d*[a-z]\s*(?:\^|\*\*)\s*\d",
        r"\b\d+[a-z]\b\s*[-+=]",
        r"\b[a-z]\s*\(\s*[a-z0-9]\s*\)\s*=",
        r"\b(?:solve|calculate|compute|evaluate|simplify|derivative|integral|integrate|differentiate|"
        r"equation|prove|proof|probability|how many|how much|how long would|how far)\b",
        r"\bwhat is the (?:sum|product|value|area|volume|length|perimeter|average|mean|median|remainder)\b",
    ),
    _rule(
        "step-by-step",
        False,
        r"\bstep[- ]by[- ]step\b",
        r"\bwalk me through\b",
        r"\bshow (?:your|the|all) work\b",
        r"\bexplain your (?:reasoning|answer)\b",
        r"\bderiv(?:e|ation)\b",
        r"\bchain of thought\b",
    ),
    _rule(
        "short answer",
        False,
        r"\b(?:yes or no|true or false|one[- ]word|one[- ]liner|tl;?dr|short answer|briefly)\b",
        r"\bin (?:one|a single|1|two|2|three|3) (?:words?|sentences?|lines?)\b",
        r"\b(?:in|under|less than|at most|no more than|fewer than|within) \d+ (?:words|characters|sentences|lines)\b",
        r"^(?:who (?:is|was|wrote|invented|discovered|won|painted)|when (?:did|was|is|were|will)|"
        r"where (?:is|was|are|were)|which (?:is|was|one))\b",
        r"^what (?:is|was|'s) (?:the )?(?:capital|population|name|date|year|time|meaning|definition|plural|"
        r"opposite|synonym|distance|height|age)\b",
        r"^(?:translate|define|spell|convert|paraphrase|rephrase|rewrite|correct|proofread|summari[sz]e)\b",
    ),
    _rule(
        "explicit list",
        True,
        r"\b(?:list|enumerate)\b(?! comprehension)",
        rf"\b(?:\d+|top|several|a few|some) (?:[a-z-]+ ){{0,2}}(?:{_LIST_NOUNS}|things|ideas)\b",
    ),
    _rule(
        "writing",
        False,
        r"^(?:(?:please|can you|could you|would you|help me|i need you to|i want you to|now)[ ,]+)*"
        r"(?:write|compose|draft|create|generate|rewrite|craft|pen|structure|format)\b"
        rf"[^?!\n]{{0,80}}\b(?:{_WRITING_NOUNS})s?\b",
        r"^(?:(?:please|now)[ ,]+)?(?:write|compose|draft)\b",
    ),
    _rule(
        "role-play",
        False,
        r"^(?:pretend|imagine you are|imagine yourself|act as|role-?play|you are an? |as an? [^,.?]{1,40},|"
        r"if you were an? )",
    ),
    _rule(
        "list question",
        True,
        rf"\b(?:{_LIST_NOUNS})\b",
        r"\b(?:difference between|differ|compare|comparison|contrast|versus|vs\.?)\b",
        r"^how (?:can|should|could|would|might|to|do i|do you|do we|does one)\b",
        r"^what if\b",
        r"\bwhat would (?:happen|have happened|be different)\b",
        r"^why (?:might|would|should|do some|are some|is it important)\b",
        r"^what (?:are|were) (?:the|some)\b",
        r"^what (?:should|can|could) (?:i|you|we)\b",
        r"\b(?:explain|discuss|describe|outline) (?:the )?(?:basics|main|key|major|different|various|pros|"
        r"role|impact|importance)\b",
        r"\b(?:affect|influence|impact|shape)s?\b",
    ),
)

# A request this short with no cue of its own is a follow-up or chit-chat ("thanks", "why?", "go on").
_SHORT_TOKENS = 6


def _normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower().replace("’", "'")


def match_rule(text: str) -> tuple[Rule, str] | None:
    """The first rule that matches `text`, with the matched words; None if no rule does.

    >>> rule, words = match_rule("What is 3x + 10 when x is 2?")
    >>> rule.name, words
    ('math', '3x +')
    """
    norm = _normalise(text)
    for rule in RULES:
        found = rule.pattern.search(norm)
        if found:
            return rule, found.group(0).strip()
    return None


class HeuristicRouter:
    """Routes with `RULES`: the first matching rule decides; no rule means normal decoding."""

    name = "heuristic"

    def decide_view(self, view: RouterInput) -> RouteDecision:
        if not view.request:
            return RouteDecision(False, self.name, "no user request to route: normal decoding", None)
        if view.system:
            found = match_rule(view.system)
            if found and found[0].name == "short answer":
                return self._decision(found, "system prompt")
        found = match_rule(view.request)
        if found:
            return self._decision(found, "request")
        if view.context and len(view.request.split()) <= _SHORT_TOKENS:
            # An elliptical follow-up ("what about cats?") takes the shape of the question it follows.
            found = match_rule(view.context[0])
            if found:
                return self._decision(found, "previous question")
        if len(view.request.split()) <= 3:
            return RouteDecision(False, self.name, "very short request: normal decoding", None)
        return RouteDecision(False, self.name, "no list cue: normal decoding (the safe default)", None)

    def _decision(self, found: tuple[Rule, str], where: str) -> RouteDecision:
        rule, words = found
        words = words if len(words) <= 40 else words[:37] + "..."
        mode = "SoT" if rule.use_sot else "normal decoding"
        return RouteDecision(rule.use_sot, self.name, f"{rule.name} ({where}: {words!r}): {mode}", None)

    async def decide(self, messages: Sequence[Message]) -> RouteDecision:
        return self.decide_view(router_input(messages))
