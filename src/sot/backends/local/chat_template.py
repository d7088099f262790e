"""Render a conversation (plus an assistant prefill) into the exact prompt text the model was trained on.

ChatML is rendered by hand, byte-exact, mirroring the GGUF template's default system message. Other
templates embedded in a GGUF are rendered with jinja2 in a sandbox. Tokenization is not done here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sot.backends.base import Message
from sot.errors import ConfigError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# What SmolLM2-Instruct's embedded template inserts when the conversation has no system message.
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Probe texts for recognising a template's behaviour by rendering it; unlikely to occur in a real template.
_P_SYS, _P_USER, _P_ASSIST, _P_USER2 = "\x01sys\x01", "\x01user\x01", "\x01assistant\x01", "\x01user2\x01"


class ChatTemplate(Protocol):
    """Turns messages and a prefill into prompt text (special tokens written out as text)."""

    def render(self, messages: Sequence[Message], prefill: str = "") -> str: ...


@dataclass(frozen=True, slots=True)
class ChatMLTemplate:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn, then `<|im_start|>assistant\\n` + prefill.

    `default_system` is inserted as the first turn when the conversation does not start with a system
    message, as SmolLM2's own template does; None inserts nothing.
    """

    default_system: str | None = SMOLLM2_DEFAULT_SYSTEM

    def render(self, messages: Sequence[Message], prefill: str = "") -> str:
        parts: list[str] = []
        if self.default_system is not None and (not messages or messages[0].role != "system"):
            parts.append(f"{IM_START}system\n{self.default_system}{IM_END}\n")
        for m in messages:
            parts.append(f"{IM_START}{m.role}\n{m.content}{IM_END}\n")
        parts.append(f"{IM_START}assistant\n{prefill}")
        return "".join(parts)


class JinjaTemplate:
    """A GGUF's own jinja chat template (sandboxed), with the prefill appended after the generation prompt."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ConfigError(f"the model's chat template does not parse: {exc}") from exc
        self._bos = bos_token
        self._eos = eos_token

    def render(self, messages: Sequence[Message], prefill: str = "") -> str:
        from jinja2 import TemplateError

        try:
            text = self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except TemplateError as exc:
            raise ConfigError(f"the model's chat template rejected the conversation: {exc}") from exc
        return text + prefill


def _chatml_default_system(source: str) -> tuple[bool, str | None]:
    """(is ChatML, default system message) for a jinja template, found by rendering probe conversations."""
    try:
        probe = JinjaTemplate(source)
        with_system = probe.render(
            [
                Message("system", _P_SYS),
                Message("user", _P_USER),
                Message("assistant", _P_ASSIST),
                Message("user", _P_USER2),
            ]
        )
        without_system = probe.render([Message("user", _P_USER)])
    except ConfigError:
        return False, None
    expected = ChatMLTemplate(default_system=None).render(
        [
            Message("system", _P_SYS),
            Message("user", _P_USER),
            Message("assistant", _P_ASSIST),
            Message("user", _P_USER2),
        ]
    )
    if with_system != expected:
        return False, None
    user_turn = f"{IM_START}user\n{_P_USER}{IM_END}\n{IM_START}assistant\n"
    if not without_system.endswith(user_turn):
        return False, None
    head = without_system[: -len(user_turn)]
    if head == "":
        return True, None
    sys_open, sys_close = f"{IM_START}system\n", f"{IM_END}\n"
    if head.startswith(sys_open) and head.endswith(sys_close):
        return True, head[len(sys_open) : -len(sys_close)]
    return False, None


def template_for_model(source: str | None, *, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    """The renderer for a GGUF's `tokenizer.chat_template` metadata.

    ChatML-like templates (checked by rendering probes, not by guessing from the text) get the exact
    hand-written renderer with the template's own default system message; anything else that renders is
    used through jinja2; a model without a template cannot be chatted with.
    """
    if not source:
        raise ConfigError(
            "this GGUF has no chat template (tokenizer.chat_template); the local backend needs a chat model"
        )
    is_chatml, default_system = _chatml_default_system(source)
    if is_chatml:
        return ChatMLTemplate(default_system=default_system)
    template = JinjaTemplate(source, bos_token=bos_token, eos_token=eos_token)
    try:
        template.render([Message("user", "hi")])
    except ConfigError as exc:
        raise ConfigError(f"unsupported chat template in this GGUF: {exc}") from exc
    return template
