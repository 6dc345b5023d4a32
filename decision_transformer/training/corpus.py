"""Reading and tokenising text corpora in bounded memory (the ChibiT maker and ``--joint`` LM co-training).

A corpus is read a batch of lines at a time and tokenised batch by batch; the ids of each batch go into a numpy
array at once, so a corpus of N tokens holds about 8·N bytes of ids (a Python list of ints held ~36·N). A line longer
than ``MAX_PIECE_CHARS`` (a corpus written as one line) is cut into pieces at a space between two words, where a
byte-level BPE pre-tokenizer splits anyway, so its tokens are those of the whole line; only a line with no such space
for ``MAX_PIECE_CHARS`` characters is cut where it must, which can change the tokens at that cut.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Iterator

import numpy as np

BATCH_LINES = 20000            # lines handed to the tokenizer at once
MAX_PIECE_CHARS = 1 << 20      # the longest piece of text handed to the tokenizer (and held at once)

_WORD_GAP = re.compile(r"(?<=\S) (?=\S)")


def _pieces(line: str, max_chars: int) -> Iterator[str]:
    """``line`` cut into pieces of at most ``max_chars`` characters, each cut just before a space between words."""
    start = 0
    while len(line) - start > max_chars:
        window = line[start + max_chars // 2:start + max_chars]
        cuts = [m.start() for m in _WORD_GAP.finditer(window)]
        cut = start + (max_chars // 2 + cuts[-1] if cuts else max_chars)
        yield line[start:cut]
        start = cut
    yield line[start:]


def _file_lines(f: Path, split_all: bool) -> Iterator[str]:
    """The lines of ``f`` with their line ends, read as UTF-8 (bad bytes become U+FFFD). ``split_all``: also split at
    the other line boundaries ``str.splitlines`` knows (form feed, U+2028, ...), as a whole-text ``splitlines``."""
    with open(f, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            yield from (line.splitlines(keepends=True) if split_all else (line,))


def text_batches(files: list[Path], batch_lines: int = BATCH_LINES, max_chars: int = MAX_PIECE_CHARS,
                 split_all: bool = False) -> Iterator[list[str]]:
    """Batches of at most ``batch_lines`` lines (overlong lines as pieces) and about ``max_chars`` characters, in file
    order; a batch never spans two files."""
    for f in files:
        batch: list[str] = []
        size = 0
        for line in _file_lines(Path(f), split_all):
            for piece in _pieces(line, max_chars):
                batch.append(piece)
                size += len(piece)
                if len(batch) >= batch_lines or size >= max_chars:
                    yield batch
                    batch, size = [], 0
        if batch:
            yield batch


def encode_batches(batches, tokenizer) -> np.ndarray:
    """The concatenated token ids (int64) of every batch of text, tokenised batch by batch."""
    parts = [np.fromiter(itertools.chain.from_iterable(tokenizer(batch)["input_ids"]), dtype=np.int64)
             for batch in batches]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
