"""docker-compose.yml stays true: every cdp-stream service runs a command the CLI has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from typer.main import get_command

from cdp_stream.cli import cli
from cdp_stream.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_every_cdp_service_runs_a_real_cli_command() -> None:
    commands = set(get_command(cli).commands)  # type: ignore[attr-defined]
    services = _compose()["services"]
    cdp = {name: s for name, s in services.items() if "build" in s}
    assert {"migrate", "collector", "resolver", "activation", "api"} <= set(cdp)
    for name, service in cdp.items():
        assert service["command"][0] in commands, name
        assert (ROOT / service["build"]["dockerfile"]).is_file()


def test_infrastructure_services_have_health_checks_and_stages_wait_for_them() -> None:
    services = _compose()["services"]
    assert "healthcheck" in services["kafka"] and "healthcheck" in services["postgres"]
    assert services["collector"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    env = services["resolver"]["environment"]
    assert env["CDP_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert env["CDP_DATABASE_URL"].startswith("postgresql+asyncpg://")


def test_every_cdp_variable_is_a_setting() -> None:
    """pydantic-settings ignores an unknown CDP_ name silently: a misspelt one would be lost."""
    fields = {f"CDP_{name.upper()}" for name in Settings.model_fields}
    services = _compose()["services"]
    for name, service in services.items():
        if "build" in service:
            assert set(service["environment"]) <= fields, (
                name,
                set(service["environment"]) - fields,
            )
    assert services["resolver"]["environment"]["CDP_METRICS_PORT"] == "9102"
    assert services["activation"]["environment"]["CDP_METRICS_PORT"] == "9102"
