"""The prompting router: ask the serving model whether the reply is a list of independent points.

One short request (at most 4 tokens, greedy) with a multiple-choice prompt: (A) independent points,
(B) points that build on each other, (C) not a list. Only A gets SoT. The reply is parsed leniently
(`parse_router_reply`), and anything that is not clearly one letter, as well as any backend failure or a
timeout, means normal decoding with the reason recorded: this router never raises for a conversation.
It does not retry; a failed routing call costs one answer its skeleton, not its answer.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, cast

from sot.backends.base import Backend, GenerationRequest, Message, SamplingParams
from sot.engine.calls import Deadline, TextSink, call_backend
from sot.errors import BackendError, ConfigError
from sot.router.base import RouteDecision, RouterInput, render_request, router_input

Choice = Literal["A", "B", "C"]

# Our own wording of the paper's three choices. The paper's prompt (reference/router_gpt4.json in the
# shared folder) loads with `load_router_prompt`; both take the conversation where `{request}` is.
DEFAULT_ROUTER_PROMPT = """\
Do not answer the request below. Only decide how a good reply to it would be organised.

Request: {request}

A. As a list of points (tips, reasons, factors, perspectives) that could each be written without \
reading the others.
B. As a list of points where later ones build on earlier ones (a derivation, a calculation, an ordered \
procedure).
C. Not as a list: a short answer, code, a solved problem, or one continuous piece of writing such as a \
story, a letter or a poem.

Reply with the single letter A, B or C."""

PLACEHOLDER = "{request}"
REPLY_MAX_TOKENS = 4
DEFAULT_TIMEOUT = 20.0

# Decorations a model wraps around its letter: markdown emphasis and quotes (an apostrophe inside a word,
# as in "I'd", is not a quote). Brackets stay: "B)" labels a line.
_DECORATION = re.compile(r"[*_`\"“”]|(?<![a-z])['‘’]|['‘’](?![a-z])", re.IGNORECASE)
_BARE = re.compile(r"^[(\[]?([abc])[)\]]?\s*[.:,!]?$", re.IGNORECASE)
_LEAD_IN = re.compile(
    r"^(?:(?:the\s+)?(?:final\s+)?(?:answer|option|choice|reply)(?:\s+is)?"
    r"|i(?:\s+would|'d|’d)?\s+(?:choose|pick|say|go\s+with)"
    r"|my\s+(?:answer|choice)(?:\s+is)?)"
    r"\s*[:\-]?\s*(?:option\s+)?[(\[]?([abc])\b",
    re.IGNORECASE,
)
# A letter that labels a line: upper case alone, before a newline or "is"; either case before ".", ")", ":".
_LEADING_LETTER = re.compile(r"^(?:([ABC])(?=\s*$|\s*\n|\s+is\b)|[(\[]?([ABCabc])\s*[.:)\]\-])")
# What follows a letter in an echo of the choices ("A, B or C"): no choice was made.
_MORE_LETTERS = re.compile(r"^\s*(?:,|/|or\b|and\b)\s*[abc]\b", re.IGNORECASE)


def parse_router_reply(text: str) -> Choice | None:
    """The letter a model chose, or None when the reply is not clearly one of A, B and C.

    Accepts a bare letter in any case ("a", "B.", "**C**", "(A)"), a lead-in ("Answer: C",
    "Option B", "I'd choose A"), and a letter that labels the first line ("A. Organise...", "b) ...",
    "C is best").
    Prose that merely starts with the article ("A list would be best") and echoes of the choices
    ("A, B or C") are None.

    >>> [parse_router_reply(s) for s in ("a", "A.", "Answer: C", "A good question!", "")]
    ['A', 'A', 'C', None, None]
    """
    cleaned = _DECORATION.sub("", text).strip()
    if not cleaned:
        return None
    first_line = cleaned.splitlines()[0].strip()
    for pattern, candidate in ((_BARE, first_line), (_LEAD_IN, first_line), (_LEADING_LETTER, cleaned)):
        found = pattern.match(candidate)
        if found:
            letter = next(g for g in found.groups() if g)
            if _MORE_LETTERS.match(candidate[found.end() :]):
                return None
            return cast(Choice, letter.upper())
    return None


def load_router_prompt(path: str | Path) -> str:
    """A router prompt from a file: JSON with a "prompt" field (the paper's format) or plain text.

    The prompt must contain `{request}`, where the conversation goes.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the router prompt {file}: {exc.strerror or exc}") from None
    if file.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}: not valid JSON ({exc.msg})") from None
        prompt = data.get("prompt") if isinstance(data, dict) else None
        if not isinstance(prompt, str):
            raise ConfigError(f"{file}: expected a JSON object with a string field 'prompt'")
        text = prompt
    if PLACEHOLDER not in text:
        raise ConfigError(f"{file}: a router prompt must contain {PLACEHOLDER}")
    return text


def build_router_prompt(view: RouterInput, template: str = DEFAULT_ROUTER_PROMPT) -> str:
    """The routing question for one conversation (`{request}` replaced; other braces left alone)."""
    return template.replace(PLACEHOLDER, render_request(view))


def _collect(parts: list[str]) -> TextSink:
    def on_text(text: str) -> bool:
        parts.append(text)
        return False

    return on_text


class PromptingRouter:
    """Asks `backend` to classify the reply; only "A" (independent points) gets SoT."""

    name = "prompting"

    def __init__(
        self,
        backend: Backend,
        *,
        prompt: str = DEFAULT_ROUTER_PROMPT,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        if PLACEHOLDER not in prompt:
            raise ConfigError(f"a router prompt must contain {PLACEHOLDER}")
        self.backend = backend
        self.prompt = prompt
        self.timeout = timeout

    def request_for(self, view: RouterInput) -> GenerationRequest:
        return GenerationRequest(
            messages=(Message(role="user", content=build_router_prompt(view, self.prompt)),),
            sampling=SamplingParams(max_tokens=REPLY_MAX_TOKENS, temperature=0.0),
        )

    async def _ask(self, request: GenerationRequest) -> str:
        """The model's reply, through the engine's checked call (the backend contract, a stall timeout)."""
        parts: list[str] = []
        stall = self.timeout if self.timeout is not None else 30.0
        deadline = Deadline.after("router timeout", stall)
        await call_backend(
            self.backend, request, stage="routing call", deadline=deadline, stall_timeout=stall, on_text=_collect(parts)
        )
        return "".join(parts)

    async def decide(self, messages: Sequence[Message]) -> RouteDecision:
        view = router_input(messages)
        if not view.request:
            return RouteDecision(False, self.name, "no user request to route: normal decoding", None)
        try:
            reply = await asyncio.wait_for(self._ask(self.request_for(view)), self.timeout)
        except BackendError as exc:
            return RouteDecision(False, self.name, f"routing call failed ({exc.message}): normal decoding", None)
        except TimeoutError:
            return RouteDecision(
                False, self.name, f"routing call timed out after {self.timeout:g}s: normal decoding", None
            )
        choice = parse_router_reply(reply)
        shown = reply.strip()[:40]
        if choice is None:
            return RouteDecision(False, self.name, f"unparsable reply {shown!r}: normal decoding", None)
        meaning = {
            "A": "independent points: SoT",
            "B": "dependent points: normal decoding",
            "C": "not a list: normal decoding",
        }[choice]
        return RouteDecision(choice == "A", self.name, f"model chose {choice} ({meaning})", None)
