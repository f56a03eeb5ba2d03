"""``schemas/``: the JSON Schemas generated from :mod:`cdp_stream.events`, and a drift check.

The models are the source of truth; the files are for people and tools that do not read
Python (tracking-plan linters, other languages' SDKs). ``cdp-stream schemas --check``
(run by ``make lint``) fails when a model changed and the files were not regenerated.
"""

from __future__ import annotations

import json
from pathlib import Path

from cdp_stream.events import json_schemas


def _render(schema: dict[str, object]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schemas(directory: Path) -> list[Path]:
    """Write every schema (and remove stale ones); returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    expected = json_schemas()
    for stale in directory.glob("*.json"):
        if stale.name not in expected:
            stale.unlink()
    written = []
    for name, schema in sorted(expected.items()):
        path = directory / name
        path.write_text(_render(schema), encoding="utf-8")
        written.append(path)
    return written


def check_schemas(directory: Path) -> list[str]:
    """One line per file that is missing, stale or different from the models."""
    expected = {name: _render(schema) for name, schema in json_schemas().items()}
    problems = []
    for name, text in sorted(expected.items()):
        path = directory / name
        if not path.exists():
            problems.append(f"{path}: missing (run `cdp-stream schemas`)")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{path}: differs from the models (run `cdp-stream schemas`)")
    for path in sorted(directory.glob("*.json")):
        if path.name not in expected:
            problems.append(f"{path}: no model generates it (run `cdp-stream schemas`)")
    return problems
