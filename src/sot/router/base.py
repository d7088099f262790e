"""What every router shares: the decision it returns, the protocol, and the view of a conversation it reads.

A router decides, per conversation, whether the next reply should be written with Skeleton-of-Thought or
with normal decoding. This module holds no policy of its own: it only turns a conversation into the
bounded texts the routers read (the latest request, the earlier user turns, a transcript), so that every
router sees the same thing and no router ever reads an unbounded input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from sot.backends.base import Message

RouterName = Literal["trained", "heuristic", "prompting"]

# The latest request is cut to its head and its tail: a long paste usually states the question before or
# after the pasted material, rarely in its middle. The trained router was fit on texts cut the same way.
MAX_REQUEST_CHARS = 2000
REQUEST_HEAD_CHARS = 1500
# Earlier turns are context, not the question: a small budget, most recent first.
MAX_CONTEXT_CHARS = 1000
MAX_CONTEXT_TURNS = 3
# An assistant turn in a transcript only needs to say what kind of reply it was.
MAX_TRANSCRIPT_TURN_CHARS = 300
ELLIPSIS = " … "


@dataclass(frozen=True)
class RouteDecision:
    """A router's answer for one conversation."""

    use_sot: bool
    router: str  # "trained" | "heuristic" | "prompting"
    reason: str  # short human-readable why
    score: float | None = None  # probability/score when the router has one


@runtime_checkable
class Router(Protocol):
    """Decides whether the next reply to a conversation should use Skeleton-of-Thought.

    Contract: `decide` never raises for any conversation, however long, empty or odd; when a router
    cannot decide, it answers with normal decoding and says why in `reason`.
    """

    name: str

    async def decide(self, messages: Sequence[Message]) -> RouteDecision: ...


def truncate_middle(text: str, limit: int, head: int | None = None) -> str:
    """`text` cut to at most `limit` characters, keeping its head (3/4 by default) and its tail.

    Cutting is idempotent: a cut text is not cut again, so texts cut before training and at routing time
    are the same.

    >>> truncate_middle("abcdefghijkl", 9, head=4)
    'abcd … kl'
    """
    if len(text) <= limit:
        return text
    room = max(limit - len(ELLIPSIS), 0)
    head = room * 3 // 4 if head is None else min(head, room)
    tail = room - head
    return text[:head] + ELLIPSIS + (text[-tail:] if tail else "")


@dataclass(frozen=True)
class RouterInput:
    """A conversation as the routers read it, every part already bounded in length.

    `request` is the latest user message (what the reply answers); `context` holds the earlier user turns,
    most recent first; `system` is the system prompt, if any. Empty strings mean "absent".
    """

    request: str
    context: tuple[str, ...] = ()
    system: str = ""
    transcript_turns: tuple[tuple[str, str], ...] = ()  # earlier (role, text) turns in order, for LLMs

    def context_text(self) -> str:
        """The earlier user turns as one text, most recent first."""
        return "\n".join(self.context)


def router_input(messages: Sequence[Message]) -> RouterInput:
    """Bound a conversation for routing: the last user turn, the earlier user turns, the system prompt.

    A conversation that ends with an assistant turn is routed on its last user turn (the assistant is
    continuing it). Assistant turns are left out of `context`: routers judge what the user asks for, and
    a long previous answer would drown the question; they stay in `transcript_turns` for an LLM to read.
    """
    last_user = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user"), None)
    system = next((m.content for m in messages if m.role == "system"), "")
    system = truncate_middle(system.strip(), MAX_CONTEXT_CHARS)
    if last_user is None:
        return RouterInput(request="", system=system)
    request = truncate_middle(messages[last_user].content.strip(), MAX_REQUEST_CHARS, REQUEST_HEAD_CHARS)

    context: list[str] = []
    budget = MAX_CONTEXT_CHARS
    for message in reversed(messages[:last_user]):
        if message.role != "user" or not message.content.strip():
            continue
        if len(context) == MAX_CONTEXT_TURNS or budget <= 0:
            break
        turn = truncate_middle(message.content.strip(), budget)
        context.append(turn)
        budget -= len(turn)

    earlier = [m for m in messages[:last_user] if m.role != "system" and m.content.strip()]
    turns = tuple(
        (m.role, truncate_middle(m.content.strip(), MAX_TRANSCRIPT_TURN_CHARS))
        for m in earlier[-2 * MAX_CONTEXT_TURNS :]
    )
    return RouterInput(request=request, context=tuple(context), system=system, transcript_turns=turns)


def model_turns(view: RouterInput) -> tuple[tuple[str, str], ...]:
    """The conversation as the serving model reads it, bounded: the system prompt, the recent turns of both
    roles, then the latest request. This is what the trained router embeds; empty parts are left out.

    >>> model_turns(router_input([Message(role="user", content="Hi"), Message(role="assistant", content="Hello"),
    ...                           Message(role="user", content="Why?")]))
    (('user', 'Hi'), ('assistant', 'Hello'), ('user', 'Why?'))
    """
    turns = [("system", view.system)] if view.system else []
    turns.extend(view.transcript_turns)
    if view.request:
        turns.append(("user", view.request))
    return tuple(turns)


def render_request(view: RouterInput) -> str:
    """The conversation as one text to put where a prompt says `{request}`: the latest request first.

    A single-turn conversation is just its question; a follow-up carries the earlier turns after it, so
    that a prompt reading "Question: {request}" still reads naturally.
    """
    if not view.transcript_turns:
        return view.request
    lines = [f"{role.capitalize()}: {text}" for role, text in view.transcript_turns]
    return view.request + "\n\n(This is a follow-up. Earlier in the conversation:\n" + "\n".join(lines) + ")"
