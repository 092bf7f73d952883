"""Write a labelled CSV (columns text,label) from Debian's `fortunes` package: a second real data set.

    python scripts/fortunes-csv.py OUT.csv [--categories computers politics ...] [--cap 400]

Each category file under /usr/share/games/fortunes/ holds quotes separated by lines holding only
`%`; the category is the label. Quotes are whitespace-stripped (runs of whitespace collapsed, so
the layout of poems and dialogues becomes one line), empty ones and ones longer than `--max-chars`
are skipped, duplicates within a category are dropped, and at most `--cap` per category are kept
(the first ones, in file order: deterministic). Backspace overstriking (`_\bx`) is removed.

The data is read from the Debian install when this runs and is never committed. Licence: the
fortune data files are distributed with the fortune program (fortune-mod), whose Debian copyright
file (/usr/share/doc/fortunes/copyright) places it under the BSD licence of the Regents of the
University of California (1991; redistribution with the copyright notice, conditions and
disclaimer retained, the advertising clause deleted); some files carry their own notices there
(e.g. the atheism file's). Read that file before redistributing anything derived from it.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")
CATEGORIES = ["computers", "politics", "science", "work", "songs-poems"]


def quotes(path: Path, *, max_chars: int) -> list[str]:
    raw = path.read_text(encoding="utf-8", errors="replace")
    raw = re.sub(r".\x08", "", raw)  # overstriking: "_\bx" prints as an underlined x
    out: list[str] = []
    seen: set[str] = set()
    for block in re.split(r"^%\s*$", raw, flags=re.MULTILINE):
        text = " ".join(block.split())
        if text and len(text) <= max_chars and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="CSV to write (columns text,label)")
    parser.add_argument("--categories", nargs="+", default=CATEGORIES)
    parser.add_argument("--cap", type=int, default=400, help="quotes per category at most")
    parser.add_argument("--max-chars", type=int, default=600, help="skip longer quotes")
    parser.add_argument("--source", type=Path, default=FORTUNES)
    args = parser.parse_args(argv)
    rows: list[tuple[str, str]] = []
    for cat in args.categories:
        path = args.source / cat
        if not path.is_file():
            print(f"{path}: no such fortune file (apt-get install fortunes)", file=sys.stderr)
            return 1
        texts = quotes(path, max_chars=args.max_chars)[: args.cap]
        print(f"{cat}: {len(texts)} quotes", file=sys.stderr)
        rows += [(t, cat) for t in texts]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    print(f"wrote {args.out}: {len(rows)} rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
