"""BENCHMARKS.md sections that each benchmark command owns: replaced between its markers, the rest kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def splice(text: str, start: str, end: str, section: str, before: str | None = None) -> str:
    """``text`` with the block ``start`` .. ``end`` replaced by ``section`` (which carries both markers); a text
    without the block gets it before the line starting with ``before`` when there is one, else at the end."""
    section = section.rstrip("\n")
    if start in text and end in text:
        return text[:text.index(start)] + section + text[text.index(end) + len(end):]
    if before is not None and f"\n{before}" in text:
        i = text.index(f"\n{before}") + 1
        return text[:i] + section + "\n\n" + text[i:]
    return text.rstrip("\n") + "\n\n" + section + "\n"


def write(out: Path, start: str, end: str, section: str, key: str, result: dict[str, Any],
          before: str | None = None, edit: Any = None) -> None:
    """Put ``section`` into the markdown file ``out`` (:func:`splice`; ``edit`` may change the text first) and
    ``result`` under ``key`` in the JSON file beside it."""
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    if edit is not None:
        text = edit(text)
    out.write_text(splice(text, start, end, section, before))
    j = out.with_suffix(".json")
    data = json.loads(j.read_text()) if j.exists() else {}
    data[key] = result
    j.write_text(json.dumps(data, indent=1))
