"""JSON lines, read the one way every converter needs: numbered, blank lines skipped, bad lines kept as None."""
from __future__ import annotations

import json
from typing import Any, Iterator


def json_lines(text: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value), or (line number, None) for a line that does not parse."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except ValueError:
            yield number, None
