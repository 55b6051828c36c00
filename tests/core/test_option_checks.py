"""Options are checked where they are declared: types, choices, bounds, finite floats."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import pytest

from amgi.errors import ConfigurationError
from amgi.options import bounds_text, build, check, invalid, option
from amgi.runtime import RuntimeConfig


@dataclass(slots=True)
class Sample:
    size: int = option(10, "most per batch", ge=1, le=100)
    linger: float = option(0.5, "seconds", ge=0)
    timeout: float = option(1.0, "seconds", gt=0)
    limit: float | None = option(None, "optional bound", lt=10)
    mode: Literal["fast", "safe"] = option("safe", "delivery mode")
    user: str | None = option(None, "user")
    password: str | None = option(None, "password", secret=True)
    tags: list[str] = option(factory=list, help="tags")

    def check_together(self) -> None:
        if self.password and not self.user:
            raise invalid(self, "password", "needs --user")


def test_defaults_pass() -> None:
    check(Sample())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"size": 0}, "--size must be 1 to 100 (got size=0)"),
        ({"size": 101}, "--size must be 1 to 100 (got size=101)"),
        ({"size": "9"}, "--size must be an integer (got size='9')"),
        ({"size": True}, "--size must be an integer"),
        ({"linger": -0.1}, "--linger must be at least 0 (got linger=-0.1)"),
        ({"linger": math.nan}, "--linger must be a finite number (got linger=nan)"),
        ({"linger": math.inf}, "--linger must be a finite number (got linger=inf)"),
        ({"timeout": 0.0}, "--timeout must be above 0"),
        ({"timeout": "1"}, "--timeout must be a number"),
        ({"limit": 10.0}, "--limit must be below 10"),
        ({"limit": -math.inf}, "--limit must be a finite number"),
        ({"mode": "sideways"}, "--mode must be one of fast, safe (got mode='sideways')"),
        ({"user": 5}, "--user must be a string"),
        ({"tags": "a"}, "--tags must be a list of strings"),
        ({"password": "pw"}, "--password needs --user (got password=*****)"),
    ],
)
def test_each_problem_is_one_line_naming_the_flag(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        check(Sample(**values))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_none_is_refused_where_the_type_does_not_allow_it() -> None:
    with pytest.raises(ConfigurationError, match="--size must be given"):
        check(Sample(size=None))  # type: ignore[arg-type]


def test_an_int_is_a_valid_float_and_none_a_valid_optional() -> None:
    check(Sample(linger=2, limit=None))


def test_build_checks_what_the_command_line_gave() -> None:
    with pytest.raises(ConfigurationError, match="--linger must be a finite number"):
        build(Sample, {"linger": float("nan")})
    assert build(Sample, {"size": 5}).size == 5


def test_bounds_in_words() -> None:
    assert bounds_text({"ge": 1}) == "at least 1"
    assert bounds_text({"ge": 0, "le": 20}) == "0 to 20"
    assert bounds_text({"gt": 0, "lt": 1.5}) == "above 0 and below 1.5"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("concurrency", 0, "--concurrency must be at least 1"),
        ("max_attempts", 0, "--max-attempts must be at least 1"),
        ("retry_delay", math.nan, "--retry-delay must be a finite number"),
        ("retry_delay", math.inf, "--retry-delay must be a finite number"),
        ("retry_delay_max", -1.0, "--retry-delay-max must be at least 0"),
        ("shutdown_timeout", math.nan, "--shutdown-timeout must be a finite number"),
        ("lifespan", "sometimes", "--lifespan must be one of auto, on, off"),
    ],
)
def test_runtime_config_refuses_bad_values_at_construction(
    field: str, value: Any, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RuntimeConfig(**{field: value})


def test_option_table_shows_flags_defaults_help_and_bounds() -> None:
    from amgi.options import option_table

    table = option_table(Sample)
    assert "| `--size` | `10` | most per batch (1 to 100) |" in table
    assert "| `--password` | (none) | password |" in table
