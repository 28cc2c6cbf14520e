"""Timestamps: every way SQLite stores a datetime, read as the instant it denotes.

The reference for every expectation is computed here with `datetime` (and exact fractions for
REAL values), independently of the uploader. The property that matters most for the cursor: the
key computed inside SQLite orders rows like the instants they hold, and is NULL exactly when the
uploader cannot read the value (such rows are tracked apart, so they neither get lost nor block).
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone
from fractions import Fraction
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import sqlite_to_databricks_uploader as upl

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
JULIAN_EPOCH = Fraction(4881175, 2)  # 2440587.5, the Julian day of 1970-01-01T00:00Z
US_PER_DAY = 86_400 * 10**6

# Instants where every storage form is unambiguous: after 1973-03-03 integers in ms and us are
# told apart by magnitude, and REAL unix seconds are above the Julian-day range.
LOW_US = (datetime(1974, 1, 1, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)
HIGH_US = (datetime(2200, 12, 31, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)


def micros(moment: datetime) -> int:
    """Exact microseconds since 1970 UTC of an aware datetime."""
    return (moment - EPOCH) // timedelta(microseconds=1)


def at(*parts: int, tz=UTC) -> int:
    return micros(datetime(*parts, tzinfo=tz))


# ---------------------------------------------------------------------------------------------
# timestamp_to_micros: examples of every storage form
# ---------------------------------------------------------------------------------------------

T = at(2024, 1, 15, 14, 30)  # 2024-01-15T14:30:00Z

READABLE = [
    # INTEGER nanoseconds (from 1e18; Go's time.UnixNano(), OpenTelemetry)
    (T * 1000 + 789, T),
    (10**18, 10**15),
    # Go's time.Time.String() (Telegraf's SQL output): the numeric offset counts, the zone name not
    ("2024-01-15 14:30:00 +0000 UTC", T),
    ("2024-01-15 15:30:00.123456789 +0100 CET", T + 123_456),
    ("2024-01-15 09:30:00 -0500 EST m=+0.001200001", T),
    # TEXT, space or T, with and without seconds and fractions
    ("2024-01-15 14:30:00", T),
    ("2024-01-15T14:30:00", T),
    ("2024-01-15 14:30", T),
    ("2024-01-15T14:30", T),
    ("2024-01-15 14:30:00.5", T + 500_000),
    ("2024-01-15 14:30:00.12", T + 120_000),
    ("2024-01-15 14:30:00.123", T + 123_000),
    ("2024-01-15T14:30:00.1234", T + 123_400),
    ("2024-01-15T14:30:00.12345", T + 123_450),
    ("2024-01-15T14:30:00.123456", T + 123_456),
    ("2024-01-15T14:30:00.1234567", T + 123_456),  # beyond microseconds: truncated
    ("2024-01-15T14:30:00.12345678", T + 123_456),
    ("2024-01-15 14:30:00.123456789", T + 123_456),
    ("2024-01-15 14:30:00,5", T + 500_000),  # ISO 8601 allows a decimal comma
    # offsets
    ("2024-01-15T14:30:00Z", T),
    ("2024-01-15 14:30:00z", T),
    ("2024-01-15T14:30:00.250Z", T + 250_000),
    ("2024-01-15T16:30:00+02:00", T),
    ("2024-01-15T09:00:00-05:30", T),
    ("2024-01-15T16:30:00+0200", T),
    ("2024-01-15T09:00:00-0530", T),
    ("2024-01-15 16:30:00.000001+02:00", T + 1),
    ("2024-01-15T14:30:00+00:00", T),
    ("2024-01-16T00:30:00+10:00", T),
    # date only: midnight
    ("2024-01-15", at(2024, 1, 15)),
    # surrounding blanks are not part of the value
    ("  2024-01-15 14:30:00  ", T),
    # numbers stored as text
    ("1705329000", T),
    ("1705329000000", T),
    ("1705329000.25", T + 250_000),
    # INTEGER unix seconds, milliseconds, microseconds (told apart by magnitude)
    (1705329000, T),
    (1705329000123, T + 123_000),
    (1705329000123456, T + 123_456),
    (10_000_000, 10_000_000 * 10**6),  # from 1e7 on, integers are unix seconds
    (-10_000_000, -10_000_000 * 10**6),
    (99_999_999_999, 99_999_999_999 * 10**6),  # largest seconds value: year 5138
    # REAL unix seconds
    (1705329000.0, T),
    (1705329000.5, T + 500_000),
    # REAL Julian days (what julianday() returns): resolved to milliseconds like SQLite does
    (2460325.1041666665, T),
    (2440587.5, 0),
    (2460325.5, at(2024, 1, 16)),
    # an INTEGER Julian day: a DATETIME column (NUMERIC affinity) turns a whole REAL into one
    (2460326, at(2024, 1, 16, 12)),
    # BLOB holding text
    (b"2024-01-15 14:30:00", T),
    (b"2024-01-15T16:30:00+02:00", T),
    # the ends of the range a Delta timestamp holds
    ("0001-01-01 00:00:00", at(1, 1, 1)),
    ("9999-12-31 23:59:59.999999", at(9999, 12, 31, 23, 59, 59, 999_999)),
]

UNREADABLE = [
    None, "", "   ", "garbage", "n/a", "NULL", "now", "today", "10:00:00", "T10:00:00",
    "2024-13-01 00:00:00", "2024-00-10", "2024-01-00", "2024-01-32", "2024-02-30", "2023-02-29",
    "2024-01-01 24:00:00", "2024-01-01 10:61:00", "2024-01-01 10:00:61", "2024-1-1",
    "2024-01-01T10:00:00.", "2024-01-01x", "2024-01-01 10:00:00 garbage", "+2024-01-01",
    "2024-01-01 10:00:00+25:00", "inf", "NaN", "1e400",
    b"", b"\xff\xfe", b"garbage",
    float("nan"), float("inf"), float("-inf"), 1e300,
    "0000-01-01 00:00:00", "10000-01-01",  # outside years 1-9999
    2**63 - 1, -(10**18),  # a sentinel; integers beyond year 9999 (negative: no nanoseconds)
    0.5, 21.5,  # Julian days before year 1
]


@pytest.mark.parametrize(("value", "expected"), READABLE, ids=[repr(v) for v, _ in READABLE])
def test_readable_forms(value, expected):
    assert upl.timestamp_to_micros(value) == expected


@pytest.mark.parametrize("value", UNREADABLE, ids=[repr(v) for v in UNREADABLE])
def test_unreadable_values_are_none(value):
    assert upl.timestamp_to_micros(value) is None
    assert upl.timestamp_to_micros(value, BERLIN) is None


# Naive values in a configured zone; values with an offset, numbers and Julian days are instants
# already and do not move.
ZONED = [
    ("2024-01-15 15:30:00", T),  # CET, +01:00
    ("2024-01-15T15:30:00.250", T + 250_000),
    ("2024-01-15 15:30", T),
    ("2024-07-15 16:30:00", at(2024, 7, 15, 14, 30)),  # CEST, +02:00
    ("2024-07-15", at(2024, 7, 14, 22)),  # midnight in Berlin
    ("2024-01-15T14:30:00Z", T),
    ("2024-01-15T16:30:00+02:00", T),
    ("2024-01-15T16:30:00+0200", T),
    ("1705329000", T),
    (1705329000, T),
    (1705329000123, T + 123_000),
    (1705329000.5, T + 500_000),
    (2460325.1041666665, T),
    (b"2024-01-15 15:30:00", T),
    # the autumn hour that happens twice: the first occurrence (fold=0, still CEST)
    ("2024-10-27 02:30:00", at(2024, 10, 27, 0, 30)),
]


@pytest.mark.parametrize(("value", "expected"), ZONED, ids=[repr(v) for v, _ in ZONED])
def test_naive_values_in_a_configured_zone(value, expected):
    assert upl.timestamp_to_micros(value, BERLIN) == expected
    # the zone as the uploader builds it from the source_timezone setting
    assert upl.timestamp_to_micros(value, upl.timezone_from_name("Europe/Berlin")) == expected


def test_a_wall_clock_time_skipped_by_daylight_saving_still_reads():
    # 02:30 does not exist in Berlin on 2024-03-31; it must still land next to the transition.
    got = upl.timestamp_to_micros("2024-03-31 02:30:00", BERLIN)
    assert got in (at(2024, 3, 31, 0, 30), at(2024, 3, 31, 1, 30))


def test_fixed_offset_zone_for_naive_values():
    assert upl.timestamp_to_micros("2024-01-15 09:30:00", timezone(timedelta(hours=-5))) == T


# ---------------------------------------------------------------------------------------------
# Random instants in random storage forms
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """A value as SQLite would hold it, and the instant it denotes, exactly (microseconds)."""

    value: object
    exact: Fraction | None  # None: unreadable
    form: str

    def expected_micros(self) -> tuple[int, int]:
        """The inclusive range timestamp_to_micros may return for this value."""
        assert self.exact is not None
        if self.form in ("text", "blob"):  # digits beyond microseconds are truncated
            return math.floor(self.exact), math.floor(self.exact)
        if self.form == "real_julian":  # milliseconds, like SQLite; the double itself is ~40 us
            return math.ceil(self.exact - 501), math.floor(self.exact + 501)
        if self.form in ("real_unix", "numeric_text_real"):  # a double: within 1 us
            return math.ceil(self.exact - 1), math.floor(self.exact + 1)
        return int(self.exact), int(self.exact)


TEXT_KINDS = ("naive", "Z", "z", "colon", "nocolon")
NUMERIC_FORMS = ("int_s", "int_ms", "int_us", "real_unix", "real_julian", "numeric_text", "numeric_text_real")
FORMS = ("text", "text", "text", "blob", *NUMERIC_FORMS)


def _offset_text(minutes: int, colon: bool) -> str:
    sign = "+" if minutes >= 0 else "-"
    hours, mins = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}{':' if colon else ''}{mins:02d}"


@st.composite
def rendered(draw, instant_us: int, naive_tz) -> Stored:
    """One instant stored in one of the forms SQLite applications use."""
    form = draw(st.sampled_from(FORMS))
    if form in ("text", "blob"):
        kind = draw(st.sampled_from(TEXT_KINDS))
        moment = EPOCH + timedelta(microseconds=instant_us)
        if kind == "naive":
            zone, suffix = naive_tz, ""
        elif kind in ("Z", "z"):
            zone, suffix = UTC, kind
        else:
            minutes = draw(st.integers(-14 * 60, 14 * 60))
            zone, suffix = timezone(timedelta(minutes=minutes)), _offset_text(minutes, kind == "colon")
        # The wall-clock reading in that zone; a naive one means the first occurrence (fold=0).
        wall = moment.astimezone(zone).replace(tzinfo=None, fold=0)
        shape = draw(st.sampled_from(("seconds", "seconds", "seconds", "minutes", "date")))
        if shape == "date" and kind != "naive":
            shape = "minutes"
        date_part = f"{wall.year:04d}-{wall.month:02d}-{wall.day:02d}"
        if shape == "date":
            text, base, fraction = date_part, datetime.combine(wall.date(), time()), Fraction(0)
        else:
            sep = draw(st.sampled_from((" ", "T")))
            text = f"{date_part}{sep}{wall.hour:02d}:{wall.minute:02d}"
            base = wall.replace(second=0, microsecond=0)
            fraction = Fraction(0)
            if shape == "seconds":
                text += f":{wall.second:02d}"
                base = wall.replace(microsecond=0)
                digits = draw(st.integers(0, 9))
                if digits:
                    all_digits = f"{wall.microsecond:06d}{draw(st.integers(0, 999)):03d}"[:digits]
                    text += "." + all_digits
                    fraction = Fraction(int(all_digits), 10**digits)
            text += suffix
        exact = micros(base.replace(tzinfo=zone)) + fraction * 10**6
        return Stored(text.encode() if form == "blob" else text, exact, form)
    if form in ("int_s", "numeric_text"):
        value = instant_us // 10**6
        if form == "numeric_text":
            return Stored(str(value), Fraction(value * 10**6), form)
        return Stored(value, Fraction(value * 10**6), form)
    if form == "int_ms":
        value = instant_us // 1000
        return Stored(value, Fraction(value * 1000), form)
    if form == "int_us":
        return Stored(instant_us, Fraction(instant_us), form)
    if form == "real_unix":
        value = instant_us / 10**6
        return Stored(value, Fraction(value) * 10**6, form)
    if form == "numeric_text_real":
        text = f"{instant_us // 10**6}.{instant_us % 10**6:06d}"
        return Stored(text, Fraction(text) * 10**6, form)
    value = instant_us / US_PER_DAY + 2440587.5
    return Stored(value, (Fraction(value) - JULIAN_EPOCH) * US_PER_DAY, "real_julian")


# Values both the uploader and SQLite's date functions refuse (text without digits cannot be a
# date; the list holds the near misses).
GARBAGE = st.one_of(
    st.sampled_from([
        None, "", "   ", "garbage", "n/a", "NULL", "now", "today", "10:00:00", "2024-13-01 00:00:00",
        "2024-00-10", "2024-01-32", "2024-01-01 10:61:00", "2024-1-1", "2024-01-01T10:00:00.", "2024-01-01x",
        "2024-01-01 10:00:00 garbage", "+2024-01-01", "2024-01-01 10:00:00+25:00", "inf", "NaN",
        b"", b"\xff\xfe", b"garbage", float("inf"), float("-inf"), 1e300,
    ]),
    st.text(st.characters(exclude_categories=("Nd", "Cs")), max_size=12),
).map(lambda value: Stored(value, None, "garbage"))

instants = st.integers(LOW_US, HIGH_US)


@st.composite
def stored_values(draw, naive_tz) -> list[Stored]:
    """A handful of instants close together (ties and near-ties), each stored in random forms."""
    base = draw(instants)
    pool = draw(st.lists(st.one_of(st.integers(-3_000, 3_000).map(lambda d: base + d), instants),
                         min_size=1, max_size=8))
    items = draw(st.lists(
        st.one_of(st.sampled_from(pool).flatmap(lambda i: rendered(i, naive_tz)), GARBAGE),
        min_size=2, max_size=30))
    return items


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_random_instants_in_random_forms_read_back(data):
    naive_tz = data.draw(st.sampled_from([UTC, BERLIN, timezone(timedelta(hours=-7))]))
    stored = data.draw(st.lists(instants.flatmap(lambda i: rendered(i, naive_tz)), min_size=1, max_size=10))
    for item in stored:
        low, high = item.expected_micros()
        got = upl.timestamp_to_micros(item.value, naive_tz)
        assert got is not None and low <= got <= high, (item, got)
        if item.form == "real_julian":
            assert got % 1000 == 0, (item, got)


@given(GARBAGE)
def test_garbage_is_unreadable(item):
    assert upl.timestamp_to_micros(item.value) is None


# ---------------------------------------------------------------------------------------------
# The cursor key computed inside SQLite
# ---------------------------------------------------------------------------------------------


def sql_keys(values: list, naive_tz, python_for_text: bool) -> list[int | None]:
    """The cursor key of each value, computed by SQLite the way the uploader's reads do."""
    connection = sqlite3.connect(":memory:")
    try:
        connection.create_function("upl_key", 1, upl.cursor_key_udf(naive_tz), deterministic=True)
        connection.execute("CREATE TABLE t (v)")  # no declared type: values keep their storage class
        connection.executemany("INSERT INTO t (v) VALUES (?)", [(v,) for v in values])
        sql = f"SELECT {upl.cursor_key_sql('v', python_for_text)} FROM t ORDER BY rowid"
        return [row[0] for row in connection.execute(sql)]
    finally:
        connection.close()


# The assertion messages name the offending pair of values; shrinking long lists of them is slow.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)

KEY_MODES = [
    pytest.param(UTC, False, id="utc-sql-dates"),
    pytest.param(UTC, True, id="utc-python-text"),
    pytest.param(BERLIN, True, id="berlin"),
]


@pytest.mark.parametrize(("naive_tz", "python_for_text"), KEY_MODES)
@given(data=st.data())
@settings(max_examples=250, deadline=None, phases=NO_SHRINK,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_sql_cursor_key_orders_rows_like_their_instants(naive_tz, python_for_text, data):
    items = data.draw(stored_values(naive_tz))
    keys = sql_keys([item.value for item in items], naive_tz, python_for_text)
    for item, key in zip(items, keys):
        unreadable = upl.timestamp_to_micros(item.value, naive_tz) is None
        assert unreadable == (item.exact is None), item
        assert (key is None) == unreadable, (item, key)
        if key is not None:
            assert abs(key * 1000 - item.exact) < 1000, (item, key)  # milliseconds of the instant
    readable = [(item, key) for item, key in zip(items, keys) if key is not None]
    for a, key_a in readable:
        for b, key_b in readable:
            if a.exact == b.exact:
                assert abs(key_a - key_b) <= 1, (a, key_a, b, key_b)
            elif b.exact - a.exact > 1000:
                assert key_a < key_b, (a, key_a, b, key_b)


@pytest.mark.parametrize(("naive_tz", "python_for_text"), KEY_MODES)
@given(data=st.data())
@settings(max_examples=250, deadline=None, phases=NO_SHRINK,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_sql_cursor_key_never_goes_backwards_in_time(naive_tz, python_for_text, data):
    """A later instant never gets a smaller key.

    This is what timestamp mode relies on: the watermark is the highest key uploaded, so a new row
    whose instant is later than an uploaded one but whose key is smaller is never read.
    (2 us of slack: a REAL Julian day is multiplied out in floating point.)
    """
    items = data.draw(stored_values(naive_tz))
    keys = sql_keys([item.value for item in items], naive_tz, python_for_text)
    readable = [(item, key) for item, key in zip(items, keys) if key is not None]
    for a, key_a in readable:
        for b, key_b in readable:
            if b.exact - a.exact >= 2:
                assert key_a <= key_b, (a, key_a, b, key_b)


def test_sub_millisecond_instants_in_different_forms_keep_their_order():
    """0.6 ms as text, then 0.9 ms as INTEGER microseconds: the later one must not key lower."""
    earlier = "2024-01-01 00:00:00.000600"
    later = 1704067200000900  # 2024-01-01T00:00:00.000900Z in microseconds
    assert upl.timestamp_to_micros(earlier) < upl.timestamp_to_micros(later)
    key_earlier, key_later = sql_keys([earlier, later], UTC, False)
    assert key_earlier <= key_later


# Values the uploader itself calls unreadable (it uploads them with a NULL timestamp), but that
# SQLite's date arithmetic would give a key: such a key can jump far ahead of every real
# timestamp (and block newer rows) or fall far behind the watermark (and the row is never read).
CALENDAR_NEAR_MISSES = [
    "2024-02-30", "2024-02-31 10:00:00", "2023-04-31 08:00:00", "2024-01-01 24:00:00",
    "0000-06-15 00:00:00", 3 * 10**17, 2**63 - 1, -(10**18), 0.5, 21.5, 0, 21,
]


@pytest.mark.parametrize("value", CALENDAR_NEAR_MISSES, ids=[repr(v) for v in CALENDAR_NEAR_MISSES])
def test_sql_key_is_null_whenever_the_value_is_unreadable(value):
    keyed = {}
    for mode in KEY_MODES:
        naive_tz, python_for_text = mode.values
        assert upl.timestamp_to_micros(value, naive_tz) is None
        (key,) = sql_keys([value], naive_tz, python_for_text)
        if key is not None:
            keyed[mode.id] = key
    assert not keyed, f"unreadable {value!r} gets a cursor key (ms) in SQL: {keyed}"


@pytest.mark.parametrize(("value", "expected"), READABLE, ids=[repr(v) for v, _ in READABLE])
def test_sql_key_of_every_example_form(value, expected):
    for naive_tz, python_for_text in ((UTC, False), (UTC, True)):
        (key,) = sql_keys([value], naive_tz, python_for_text)
        assert key is not None and abs(key * 1000 - expected) < 1000, (value, key)


def test_cursor_key_udf_rounds_to_milliseconds_and_passes_none():
    key = upl.cursor_key_udf(UTC)
    assert key("2024-01-15 14:30:00.0004") == T // 1000
    assert key("2024-01-15 14:30:00.0006") == T // 1000 + 1
    assert key(1705329000) == T // 1000
    assert key("garbage") is None
    assert key(None) is None
    assert upl.cursor_key_udf(BERLIN)("2024-01-15 15:30:00") == T // 1000


# ---------------------------------------------------------------------------------------------
# micros_to_iso
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (None, None),
    (0, "1970-01-01T00:00:00Z"),
    (1, "1970-01-01T00:00:00.000001Z"),
    (T, "2024-01-15T14:30:00Z"),
    (T + 250_000, "2024-01-15T14:30:00.250000Z"),
    (-1, "1969-12-31T23:59:59.999999Z"),
    (at(9999, 12, 31, 23, 59, 59, 999_999), "9999-12-31T23:59:59.999999Z"),
])
def test_micros_to_iso_examples(value, expected):
    assert upl.micros_to_iso(value) == expected


def test_micros_to_iso_pads_years_before_1000():
    # ISO 8601 years have four digits; a timestamp in year 999 must still read back.
    text = upl.micros_to_iso(at(999, 1, 1))
    assert text == "0999-01-01T00:00:00Z"
    assert upl.timestamp_to_micros(text) == at(999, 1, 1)


@given(st.integers(at(1000, 1, 1), at(9999, 12, 31, 23, 59, 59, 999_999)))
def test_micros_to_iso_round_trips(value):
    text = upl.micros_to_iso(value)
    assert text.endswith("Z")
    moment = datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC)
    assert micros(moment) == value
    assert upl.timestamp_to_micros(text) == value
    assert upl.timestamp_to_micros(text, BERLIN) == value  # it carries its zone
