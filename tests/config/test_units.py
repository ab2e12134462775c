"""Durations, sizes, percentages and addresses as the config accepts them (poise.config.units,
poise.core.units)."""

import math

import pytest

from poise.config.units import parse_address, parse_duration, parse_size
from poise.core.units import parse_percent

# -- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("250ms", 0.25),
    ("2s", 2.0),
    ("1m", 60.0),
    ("1h", 3600.0),
    ("500us", 0.0005),
    ("1.5s", 1.5),
    ("0ms", 0.0),
    (" 2s ", 2.0),
    ("10", 10.0),        # a bare number in a string is seconds
    ("0.5", 0.5),
])
def test_duration_strings(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("number", "seconds"), [(2, 2.0), (0, 0.0), (1.5, 1.5), (0.25, 0.25)])
def test_duration_numbers_are_seconds(number, seconds):
    value = parse_duration(number)
    assert isinstance(value, float)
    assert value == seconds


@pytest.mark.parametrize("bad", ["", "ms", "5x", "2 sec", "1d", "-1s", "1e3", "s2", "2ss",
                                 None, [], {}, True, False])
def test_bad_durations(bad):
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(bad)


def test_negative_duration_number():
    with pytest.raises(ValueError, match="negative"):
        parse_duration(-1)


def test_nan_is_not_a_duration():
    # YAML `.nan` and TOML `nan` parse to a float NaN; a NaN timeout is never sensible.
    with pytest.raises(ValueError):
        parse_duration(math.nan)


# -- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [
    ("64KiB", 64 * 1024),
    ("1MiB", 1024**2),
    ("1GiB", 1024**3),
    ("1.5KiB", 1536),
    ("64KB", 64_000),
    ("2MB", 2_000_000),
    ("1GB", 10**9),
    ("10k", 10 * 1024),
    ("10K", 10 * 1024),
    ("3M", 3 * 1024**2),
    ("1G", 1024**3),
    ("512B", 512),
    ("512", 512),
    ("64 KiB", 64 * 1024),
])
def test_size_strings(text, size):
    value = parse_size(text)
    assert isinstance(value, int)
    assert value == size


@pytest.mark.parametrize(("number", "size"), [(0, 0), (512, 512), (4096.0, 4096)])
def test_size_numbers_are_bytes(number, size):
    value = parse_size(number)
    assert isinstance(value, int)
    assert value == size


@pytest.mark.parametrize("bad", ["", "KiB", "64kib", "1 TB", "-1KiB", "1e3", "lots",
                                 1.5, math.nan, math.inf, None, [], True])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(bad)


def test_negative_size_number():
    with pytest.raises(ValueError, match="negative"):
        parse_size(-1)


# -- addresses ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "host", "port"), [
    ("127.0.0.1:8080", "127.0.0.1", 8080),
    ("localhost:80", "localhost", 80),
    ("backend.internal:9001", "backend.internal", 9001),
    ("[::1]:80", "::1", 80),
    ("[2001:db8::7]:443", "2001:db8::7", 443),
    ("0.0.0.0:0", "0.0.0.0", 0),
    ("h:65535", "h", 65535),
])
def test_addresses(text, host, port):
    assert parse_address(text) == (host, port)


@pytest.mark.parametrize("bad", [
    "localhost",         # no port
    "localhost:",        # empty port
    ":80",               # empty host
    "host:http",         # port not a number
    "host:-1",
    "host:+80",
    "[::1]80",           # no colon after the bracket
    "[::1:80",           # unclosed bracket
    "host:80/",
    "",
    None,
    8080,
    ["h", 80],
])
def test_bad_addresses(bad):
    with pytest.raises(ValueError, match="expected host:port"):
        parse_address(bad)


def test_bare_ipv6_is_rejected_with_a_hint():
    with pytest.raises(ValueError, match=r"\[addr\]:port"):
        parse_address("::1:80")


def test_port_out_of_range():
    with pytest.raises(ValueError, match="0..65535"):
        parse_address("host:65536")


def test_empty_bracketed_host_is_rejected():
    with pytest.raises(ValueError, match="expected host:port"):
        parse_address("[]:80")


def test_non_ascii_digits_are_not_a_port():
    # str.isdigit() accepts '²', which int() then refuses: the error must still be ours.
    with pytest.raises(ValueError, match="expected host:port"):
        parse_address("127.0.0.1:²")


# -- percentages ----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "fraction"), [
    ("10%", 0.10),
    ("12.5%", 0.125),
    ("0%", 0.0),
    ("100%", 1.0),
    (" 5 % ", 0.05),
    (10, 0.10),          # a plain number is percent, not a fraction
    (12.5, 0.125),
    (0, 0.0),
    (100, 1.0),
    (0.5, 0.005),
])
def test_percentages_are_fractions(value, fraction):
    result = parse_percent(value)
    assert isinstance(result, float)
    assert result == pytest.approx(fraction)


@pytest.mark.parametrize("bad", ["10", "ten%", "%", "10 %%", "1e1%", "-5%", "0.1.%", "",
                                 None, [], True, False])
def test_bad_percentages(bad):
    with pytest.raises(ValueError, match="expected a percentage like 10%"):
        parse_percent(bad)


@pytest.mark.parametrize("bad", [-1, -0.5])
def test_negative_percentage(bad):
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_percent(bad)


@pytest.mark.parametrize("bad", ["101%", "100.5%", 101, 1000])
def test_percentage_above_100(bad):
    with pytest.raises(ValueError, match="cannot exceed 100%"):
        parse_percent(bad)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_percentage(bad):
    with pytest.raises(ValueError, match="expected a percentage"):
        parse_percent(bad)


def test_percentage_maximum_can_be_raised():
    assert parse_percent("1000%", maximum=10.0) == 10.0
    with pytest.raises(ValueError, match="cannot exceed 1000%"):
        parse_percent("1000.1%", maximum=10.0)
