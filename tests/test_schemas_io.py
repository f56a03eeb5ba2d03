"""The JSON Schemas in ``schemas/`` are generated from the models and kept in sync."""

from __future__ import annotations

import json
from pathlib import Path

from cdp_stream.events import MODELS
from cdp_stream.schemas_io import check_schemas, write_schemas

REPO_SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


def test_committed_schemas_match_the_models() -> None:
    assert check_schemas(REPO_SCHEMAS) == []


def test_drift_is_reported(tmp_path: Path) -> None:
    written = write_schemas(tmp_path)
    assert {p.name for p in written} >= {f"{name}.json" for name in MODELS} | {"event.json"}
    assert check_schemas(tmp_path) == []

    track = tmp_path / "track.json"
    schema = json.loads(track.read_text())
    del schema["properties"]["event"]
    track.write_text(json.dumps(schema))
    (tmp_path / "identify.json").unlink()
    (tmp_path / "old.json").write_text("{}")
    problems = check_schemas(tmp_path)
    assert any("track.json: differs" in p for p in problems)
    assert any("identify.json: missing" in p for p in problems)
    assert any("old.json: no model generates it" in p for p in problems)

    write_schemas(tmp_path)  # regenerating fixes all three
    assert check_schemas(tmp_path) == []


def test_track_schema_requires_event_and_keeps_unknown_keys() -> None:
    track = json.loads((REPO_SCHEMAS / "track.json").read_text())
    assert "event" in track["required"]
    assert track["additionalProperties"] is True
