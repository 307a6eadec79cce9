"""Stop strings over streamed text: hold back only what could start a stop string."""
from __future__ import annotations


class StopStrings:
    def __init__(self, stops: tuple[str, ...], include: bool = False):
        self.stops = tuple(s for s in stops if s)
        self.include = include
        self._buf = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(text to emit now, whether a stop string was hit). After a hit, stop feeding."""
        buf = self._buf + text
        hit = min(((buf.find(s), s) for s in self.stops if s in buf), default=None)
        if hit is not None:
            i, s = hit
            self._buf = ""
            return buf[:i + len(s)] if self.include else buf[:i], True
        if final:
            self._buf = ""
            return buf, False
        keep = 0
        for k in range(min(len(buf), max(map(len, self.stops), default=1) - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        self._buf = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False
