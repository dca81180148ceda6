"""Feature records with a changed JSON header, for the tests of the record codec and of the web tier reading it."""

from __future__ import annotations

import json
import struct
from typing import Any, Callable


def with_header(raw: bytes, change: Callable[[dict], Any]) -> bytes:
    """The record `raw` with its header changed in place by `change(header)`, the length prefix written to match."""
    (length,) = struct.unpack("<I", raw[8:12])
    header = json.loads(raw[12:12 + length])
    change(header)
    text = json.dumps(header).encode()
    return raw[:8] + struct.pack("<I", len(text)) + text + raw[12 + length:]
