"""Config loading: validation, error paths, environment expansion and units."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import ConfigError, load_config, parse_config
from proxy.config.units import format_duration, parse_duration, parse_size
from proxy.redact import redacted_config


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "f.yaml", env or {})
    return str(info.value).splitlines()


def test_empty_file_gives_the_documented_defaults() -> None:
    config = parse_config("", "f.yaml", {})
    assert config.listen.port == 8080
    assert config.admin.host == "127.0.0.1" and config.admin.port == 9901
    assert config.store.backend == "memory"
    assert config.upstreams["app"].url == "http://127.0.0.1:3000"
    assert config.trusted_proxies == []
    assert config.limits.max_header_bytes == 65536


def test_unknown_keys_are_errors_with_their_path() -> None:
    assert errors_of("listen: {port: 1, hots: x}") == ["f.yaml: listen.hots: unknown key"]


def test_every_error_is_reported_with_file_and_field_path() -> None:
    text = """
upstreams:
  app: {url: "http://127.0.0.1:3000", retry: {max_attempts: 0}}
routes:
  - match: {path: /a}
  - match: {path: /b}
    retry: {max_attempts: 11, base_delay: soon}
"""
    assert errors_of(text) == [
        "f.yaml: upstreams.app.retry.max_attempts: must be >= 1",
        "f.yaml: routes[1].retry.max_attempts: must be <= 10",
        "f.yaml: routes[1].retry.base_delay: 'soon' is not a duration (use e.g. 250ms, 5s, 1m, 24h)",
    ]


def test_route_naming_an_unknown_upstream_is_an_error() -> None:
    assert errors_of("routes: [{upstream: nope}]") == [
        "f.yaml: routes[0].upstream: unknown upstream 'nope' (defined: app)"
    ]


def test_redis_store_requires_a_url() -> None:
    assert errors_of("store: {backend: redis}") == [
        "f.yaml: store.url: required when backend is redis"
    ]


def test_invalid_yaml_names_line_and_column() -> None:
    (error,) = errors_of("listen:\n  port: [1\n")
    assert error.startswith("f.yaml: line ") and "invalid YAML" in error


def test_environment_variables_are_expanded_with_defaults() -> None:
    text = "listen:\n  port: ${PORT}\n  host: ${HOST:-127.0.0.2}\nstore: {backend: memory, key_prefix: 'x-${ENV:-dev}:'}\n"
    config = parse_config(text, "f.yaml", {"PORT": "9000"})
    assert config.listen.port == 9000
    assert config.listen.host == "127.0.0.2"
    assert config.store.key_prefix == "x-dev:"


def test_unset_variable_without_default_is_an_error() -> None:
    assert errors_of("listen:\n  port: ${NOPE}\n") == [
        "f.yaml: listen.port: environment variable NOPE is not set (use ${NOPE:-default})"
    ]


def test_missing_file_is_reported() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("/nonexistent/sidecar.yaml")
    assert str(info.value).startswith("/nonexistent/sidecar.yaml: cannot read file")


def test_shipped_config_is_valid() -> None:
    config = load_config("config/sidecar.yaml")
    assert config.routes[0].idempotency is not None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("1.5m", 90.0),
        ("24h", 86400.0),
        ("2d", 172800.0),
        (3, 3.0),
        ("10", 10.0),
    ],
)
def test_durations_parse(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"), [("64KiB", 65536), ("1MiB", 1048576), ("10MB", 10_000_000), (512, 512)]
)
def test_sizes_parse(text: object, size: int) -> None:
    assert parse_size(text) == size


@given(st.integers(min_value=0, max_value=10**7))
def test_formatted_durations_parse_back_to_the_same_value(millis: int) -> None:
    seconds = millis / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@given(st.text(max_size=20))
def test_duration_parser_never_crashes_on_garbage(text: str) -> None:
    try:
        parse_duration(text)
    except ValueError:
        pass


def test_config_view_redacts_secrets() -> None:
    config = parse_config(
        "store: {backend: redis, url: 'redis://:hunter2@redis:6379/0'}", "f.yaml", {}
    )
    view = redacted_config(config)
    assert view["store"]["url"] == "redis://:***@redis:6379/0"
    assert "hunter2" not in str(view)
