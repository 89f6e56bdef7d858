import pytest

from compter.durations import parse_duration


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        (90, 90.0),
        (0.5, 0.5),
        ("90s", 90.0),
        ("15m", 900.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        ("1d2h3m4s", 93784.0),
        ("0s", 0.0),
    ],
)
def test_parses(given: object, seconds: float) -> None:
    assert parse_duration(given) == seconds


@pytest.mark.parametrize(
    "given",
    [
        *("", "90", "1.5h", "h", "1x", "30m1h", "-5s", " 1h", "1h ", "1s\n", "1h 30m", "\u0661h", "1H"),
        *(True, None, [], float("nan"), float("inf")),
    ],
)
def test_rejects(given: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(given)


def test_the_error_shows_the_value_as_json() -> None:
    with pytest.raises(ValueError, match=r"^null is not a duration"):
        parse_duration(None)


@pytest.mark.parametrize("given", [10**400, f"{10**400}s"])
def test_a_number_too_large_for_a_float_is_a_duration_error(given: object) -> None:
    with pytest.raises(ValueError, match="at most a year"):
        parse_duration(given)


def test_a_negative_number_too_large_for_a_float_is_said_to_be_negative() -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_duration(-(10**400))
