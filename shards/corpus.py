"""Knowledge corpora (one text per line, or a CSV / JSON-lines file with a text column), torch-free.

Read the same way by training (``training.knowledge``: embedded with the text tower during training)
and by the Ray search job (``serving.search``: embedded with the exported text tower).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path


def read_corpus(path: str | Path, text_column: str = "text") -> list[str]:
    """Texts of a corpus file; blank lines and rows are dropped, order is kept (ids are positions)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"knowledge corpus not found: {path}")
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and text_column not in rows[0]:
            raise ValueError(f"{path}: no column {text_column!r}; columns: {list(rows[0])}")
        texts = [row[text_column] for row in rows]
    elif path.suffix in (".jsonl", ".json"):
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if text_column not in record:
                    raise ValueError(f"{path}:{number}: no field {text_column!r}")
                texts.append(record[text_column])
    else:
        texts = path.read_text(encoding="utf-8").splitlines()
    return [t.strip() for t in texts if t and t.strip()]
