"""RFC 9111 storage decisions of the shared cache (proxy/cache_policy.py), as pure functions."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from proxy.cache_policy import parse_cache_control, storage_plan

NOW = 1_800_000_000.0


def plan(status: int = 200, *headers: tuple[str, str], auth: bool = False, ttl: float = 30.0):  # type: ignore[no-untyped-def]
    return storage_plan(
        status,
        [(n.encode(), v.encode()) for n, v in headers],
        now=NOW,
        request_has_auth=auth,
        ttl=ttl,
        stale_if_error=300.0,
    )


def test_cache_control_directives_are_parsed_case_insensitively_with_quoted_arguments() -> None:
    assert parse_cache_control(b'Max-Age=60, no-cache="Set-Cookie", PUBLIC') == {
        "max-age": "60",
        "no-cache": "Set-Cookie",
        "public": None,
    }


def test_route_ttl_applies_when_the_upstream_gives_no_freshness() -> None:
    result = plan(200, ("content-type", "application/json"))
    assert result is not None
    assert result.fresh_for == 30.0
    assert result.stale_for == 300.0
    assert result.vary == ()


@pytest.mark.parametrize(
    ("headers", "fresh"),
    [
        ((("cache-control", "max-age=10"),), 10),
        ((("cache-control", "max-age=10, s-maxage=20"),), 20),
        ((("cache-control", "max-age=10"), ("age", "4")), 6),
        (
            (
                ("date", formatdate(NOW, usegmt=True)),
                ("expires", formatdate(NOW + 90, usegmt=True)),
            ),
            90,
        ),
    ],
)
def test_upstream_freshness_wins_over_the_route_ttl(
    headers: tuple[tuple[str, str], ...], fresh: float
) -> None:
    result = plan(200, *headers)
    assert result is not None
    assert result.fresh_for == pytest.approx(fresh)


@pytest.mark.parametrize(
    "headers",
    [
        (("cache-control", "no-store"),),
        (("cache-control", "private"),),
        (("cache-control", "max-age=60, private"),),
        (("cache-control", "no-cache"),),
        (("set-cookie", "session=1"),),
        (("vary", "Accept, *"),),
        (("cache-control", "max-age=0"),),
    ],
)
def test_responses_a_shared_cache_must_not_store_are_refused(
    headers: tuple[tuple[str, str], ...],
) -> None:
    result = storage_plan(
        200,
        [(n.encode(), v.encode()) for n, v in headers],
        now=NOW,
        request_has_auth=False,
        ttl=30.0,
        stale_if_error=0.0,
    )
    assert result is None


def test_an_expires_in_the_past_leaves_only_the_stale_window() -> None:
    result = plan(200, ("expires", "0"))
    assert result is not None
    assert result.fresh_for == 0
    assert result.stale_for == 300.0


@pytest.mark.parametrize("status", [206, 302, 500, 502, 503, 504])
def test_statuses_outside_the_cacheable_set_are_not_stored(status: int) -> None:
    assert plan(status, ("cache-control", "max-age=60")) is None


def test_route_ttl_does_not_cache_a_not_found_but_an_explicit_max_age_does() -> None:
    assert plan(404) is None
    result = plan(404, ("cache-control", "max-age=5"))
    assert result is not None and result.fresh_for == 5


def test_answers_to_requests_with_authorization_need_public_or_s_maxage() -> None:
    assert plan(200, auth=True) is None
    assert plan(200, ("cache-control", "max-age=60"), auth=True) is None
    public = plan(200, ("cache-control", "public, max-age=60"), auth=True)
    assert public is not None and public.shared_auth
    shared = plan(200, ("cache-control", "s-maxage=60"), auth=True)
    assert shared is not None and shared.shared_auth
    anonymous = plan(200, ("cache-control", "max-age=60"))
    assert anonymous is not None and not anonymous.shared_auth


@pytest.mark.parametrize("directive", ["must-revalidate", "proxy-revalidate", "s-maxage=60"])
def test_directives_that_forbid_serving_stale_close_the_stale_window(directive: str) -> None:
    result = plan(200, ("cache-control", f"max-age=60, {directive}"))
    assert result is not None
    assert result.stale_for == 0


def test_a_stale_if_error_directive_overrides_the_route_window() -> None:
    result = plan(200, ("cache-control", "max-age=60, stale-if-error=7"))
    assert result is not None and result.stale_for == 7


def test_vary_names_are_lowercased_sorted_and_deduplicated() -> None:
    result = plan(200, ("vary", "Accept-Language, accept"), ("vary", "Accept"))
    assert result is not None
    assert result.vary == (b"accept", b"accept-language")
