"""Turn a sequence's token bytes into safe streamed text: whole UTF-8 characters only, stop strings cut.

Operates on token *bytes* (from the vocabulary); it never sees logits, the KV cache or the event loop.
"""

from __future__ import annotations

import codecs


class TextStream:
    """Incremental detokenizer with stop-string detection for one generated sequence.

    Token pieces may split a multi-byte UTF-8 character (byte-level BPE does this for emoji and many
    accented letters), so bytes go through an incremental decoder that holds incomplete characters back.
    Text that could still be the start of a stop string is held back too, so a stop string is never
    partially emitted.
    """

    __slots__ = ("_decoder", "_max_stop", "_pending", "_stops", "stopped")

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        # errors="replace": a model can emit byte sequences that are not UTF-8 at all; those become U+FFFD
        # rather than an exception. Incomplete-but-valid prefixes are held, never replaced.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stops if s)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._pending = ""  # decoded text not yet emitted (a possible stop-string prefix)
        self.stopped = False  # a stop string was found; nothing more will be emitted

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece, final=False)
        if not self._stops:
            out, self._pending = self._pending, ""
            return out
        # The earliest stop occurrence wins; it can only start inside the pending text (see `_holdback`).
        first = -1
        for s in self._stops:
            i = self._pending.find(s)
            if i != -1 and (first == -1 or i < first):
                first = i
        if first != -1:
            self.stopped = True
            out, self._pending = self._pending[:first], ""
            return out
        keep = self._holdback()
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """The held-back text at the end of generation (incomplete trailing UTF-8 bytes are dropped)."""
        if self.stopped:
            return ""
        out, self._pending = self._pending, ""
        self._decoder.reset()
        return out

    def _holdback(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of some stop string."""
        text = self._pending
        for n in range(min(len(text), self._max_stop - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
