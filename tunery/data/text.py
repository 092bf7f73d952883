"""Text normalisation and the stable hash that split membership and de-duplication key on."""

from __future__ import annotations

import hashlib
import re

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Case- and whitespace-insensitive key: two texts equal under it are duplicates."""
    return _WS.sub(" ", text).strip().casefold()


def unit_hash(key: str, salt: str = "") -> float:
    """A stable number in [0, 1) from `key`: the same on every machine and Python version."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
