"""Turn a sequence's token bytes into safe streamed text: whole UTF-8 characters only, stop strings cut.

Operates on token *bytes* (from the vocabulary); it never sees logits, the KV cache or the event loop. The
stop-string rule itself is `sot.core.stops.StopHoldback`, the one implementation every edge uses.
"""

from __future__ import annotations

import codecs

from sot.core.stops import StopHoldback


class TextStream:
    """Incremental detokenizer with stop-string detection for one generated sequence.

    Token pieces may split a multi-byte UTF-8 character (byte-level BPE does this for emoji and many
    accented letters), so bytes go through an incremental decoder that holds incomplete characters back.
    Text that could still be the start of a stop string is held back too (by `StopHoldback`), so a stop
    string is never partially emitted.
    """

    __slots__ = ("_decoder", "_stops")

    def __init__(self, stops: tuple[str, ...] = ()) -> None:
        # errors="replace": a model can emit byte sequences that are not UTF-8 at all; those become U+FFFD
        # rather than an exception. Incomplete-but-valid prefixes are held, never replaced.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopHoldback(stops)

    @property
    def stopped(self) -> bool:
        """A stop string was found; nothing more will be emitted."""
        return self._stops.stopped

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to emit."""
        if self._stops.stopped:
            return ""
        return self._stops.push(self._decoder.decode(piece, final=False))

    def flush(self) -> str:
        """The held-back text at the end of generation (incomplete trailing UTF-8 bytes are dropped)."""
        self._decoder.reset()
        return self._stops.flush()
