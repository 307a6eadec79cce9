#!/usr/bin/env python3
"""IncrementalDetokenizer per token: the byte-level table path against the decode window.

    python benchmarks/micro/detokenize.py      # SmolLM2's tokenizer from the model cache

Prints us per token for one token per add() (the gateway's case at low load),
and the time to build the byte-level tables at model load.
"""
import os
import time

from services.common.tokenizer import IncrementalDetokenizer, Tokenizer

FOLDER = os.path.expanduser(os.environ.get("TANDEM_CACHE_DIR", "~/.cache/tandem") + "/models/smollm2-135m-instruct")
TEXT = "The quick brown fox jumps over the lazy dog while seven wise owls count 😀 coins, 你好. " * 3


class WindowOnly:
    """The tokenizer without byte_pieces: the detokenizer falls back to its decode window."""

    def __init__(self, tok):
        self.decode = tok.decode


def per_token_us(tok, ids, reps=300) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        d = IncrementalDetokenizer(tok, True)
        for i in ids:
            d.add([i])
        d.flush()
    return (time.perf_counter() - t0) / reps / len(ids) * 1e6


def main():
    tok = Tokenizer.from_folder(FOLDER)
    t0 = time.perf_counter()
    tok.byte_pieces(False), tok.byte_pieces(True)
    build = time.perf_counter() - t0
    ids = tok.encode(TEXT)[:64]
    fast, window = per_token_us(tok, ids), per_token_us(WindowOnly(tok), ids)
    print(f"byte-level tables: {build:.3f} s; per token: table {fast:.2f} us, window {window:.2f} us "
          f"({window / fast:.1f}x)")


if __name__ == "__main__":
    main()
