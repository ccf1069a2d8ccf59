"""Token ids -> text that is safe to show: cut at the first stop string, and hold back a tail that
could still turn into one, so streamed text and the final text are always the same."""

from __future__ import annotations


class TextTracker:
    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""  # shown so far: never contains a stop string or a pending prefix of one
        self.stopped = False  # a stop string was found

    def add(self, ids: list[int], final: bool = False) -> str:
        """Take new token ids; return the new text that can be shown. ``final``: no more will come."""
        self.ids.extend(ids)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._first_stop(full)
        if cut is not None:
            full, final, self.stopped = full[:cut], True, True
        if not final:
            if full.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
                return ""
            full = full[: len(full) - self._pending_prefix(full)]
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text = self.text + delta
        return delta

    def _first_stop(self, full: str) -> int | None:
        """Where the earliest stop string starts; shown text cannot hold one (see ``_pending_prefix``)."""
        hits = [i for s in self.stops if (i := full.find(s, len(self.text))) >= 0]
        return min(hits) if hits else None

    def _pending_prefix(self, full: str) -> int:
        """Length of the longest tail of ``full`` that is the start of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:n]):
                    best = n
                    break
        return best
