"""The lean-step table (benchmarks.lean): rows render, and the section is written into BENCHMARKS.md in place."""

import json

from benchmarks.lean import END, START, markdown, row, write


def test_lean_section_is_written_and_replaced(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n- Command: `python -m benchmarks`\n\n## Training step\n\ntable\n")
    (tmp_path / "BENCHMARKS.json").write_text(json.dumps({"meta": {}}))
    lean = {"command": "python -m benchmarks.lean", "date": "d", "threads": 1, "notes": ["- a note"],
            "rows": [row("CFG batched", "two forwards vs one", 0.2, 0.1, status="already in")]}
    write(out, lean)
    lean["rows"].append(row("flag compile=true", "s/step", 0.6, 3.0, unit="s", status="flag, default off"))
    write(out, lean)
    text = out.read_text()
    assert text.count(START) == 1 and text.count(END) == 1 and "## Training step" in text
    assert text.splitlines()[3] == "- Lean-step table (issue 10): `python -m benchmarks.lean`"
    assert "| CFG batched | two forwards vs one | 200.000 ms | 100.000 ms | 2.00× | already in |" in text
    assert "| flag compile=true | s/step | 0.600 s | 3.000 s | 0.20× | flag, default off |" in text
    data = json.loads((tmp_path / "BENCHMARKS.json").read_text())
    assert data["meta"] == {} and len(data["lean"]["rows"]) == 2
    assert markdown(lean).startswith(START)
