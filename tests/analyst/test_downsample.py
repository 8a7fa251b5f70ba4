"""Downsamplers (core-rs `downsample`, through `webmacs._core`): properties against plain-Python references."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webmacs import _core
from webmacs.exceptions import InvalidDataError
from webmacs.services.series import PackedSeries, downsample, pack_times, pack_values


def reference_stride(n: int, max_points: int) -> list[int]:
    """Spec §4.2, literally."""
    if n <= max_points:
        return list(range(n))
    step = n / max_points
    return [int(i * step) for i in range(max_points - 1)] + [n - 1]


def reference_lttb(times: list[int], values: list[float], threshold: int) -> list[int]:
    """Steinarsson's LTTB in plain Python (times relative to the first, as floats)."""
    n = len(times)
    if n <= threshold:
        return list(range(n))
    x = [float(t - times[0]) for t in times]
    every = (n - 2) / (threshold - 2)
    a, kept = 0, [0]
    for i in range(threshold - 2):
        avg_start = int((i + 1) * every) + 1
        avg_end = min(int((i + 2) * every) + 1, n)
        avg_x = avg_y = 0.0
        for j in range(avg_start, avg_end):
            avg_x += x[j]
            avg_y += values[j]
        avg_x /= avg_end - avg_start
        avg_y /= avg_end - avg_start
        start, end = int(i * every) + 1, int((i + 1) * every) + 1
        best, best_area = start, -1.0
        for j in range(start, end):
            area = abs((x[a] - avg_x) * (values[j] - values[a]) - (x[a] - x[j]) * (avg_y - values[a])) * 0.5
            if area > best_area:
                best, best_area = j, area
        kept.append(best)
        a = best
    kept.append(n - 1)
    return kept


@st.composite
def series(draw: st.DrawFn, max_size: int = 600) -> tuple[list[int], list[float]]:
    """Non-decreasing µs timestamps (irregular, with repeats and gaps) and finite values."""
    steps = draw(st.lists(st.integers(0, 10**9), max_size=max_size))
    t0 = draw(st.integers(0, 2 * 10**15))
    times, t = [], t0
    for s in steps:
        times.append(t)
        t += s
    values = draw(st.lists(st.floats(-1e9, 1e9, allow_nan=False), min_size=len(times), max_size=len(times)))
    return times, values


SELECTORS = {"lttb": (_core.downsample_lttb, 3), "minmax": (_core.downsample_minmax, 4), "m4": (_core.downsample_m4, 4)}


@given(n=st.integers(0, 5000), max_points=st.integers(2, 3000))
def test_stride_is_the_spec_formula(n: int, max_points: int) -> None:
    kept = _core.downsample_stride(n, max_points)
    assert kept == reference_stride(n, max_points)
    assert len(kept) == min(n, max_points)


@settings(max_examples=200)
@given(data=series(), max_points=st.integers(4, 300), name=st.sampled_from(sorted(SELECTORS)))
def test_selectors_never_exceed_max_points_and_keep_the_ends(
    data: tuple[list[int], list[float]], max_points: int, name: str
) -> None:
    times, values = data
    select, _ = SELECTORS[name]
    kept = select(pack_times(times), pack_values(values), max_points)
    assert len(kept) <= max_points
    assert kept == sorted(set(kept))
    if times:
        assert kept[0] == 0 and kept[-1] == len(times) - 1
    if len(times) <= max_points:
        assert kept == list(range(len(times)))


@settings(max_examples=200)
@given(data=series(), max_points=st.integers(3, 150))
def test_lttb_is_identical_to_the_python_reference(data: tuple[list[int], list[float]], max_points: int) -> None:
    times, values = data
    assert _core.downsample_lttb(pack_times(times), pack_values(values), max_points) == reference_lttb(
        times, values, max_points
    )


@settings(max_examples=200)
@given(data=series(), max_points=st.integers(4, 150), name=st.sampled_from(["minmax", "m4"]))
def test_minmax_and_m4_keep_the_global_extremes(
    data: tuple[list[int], list[float]], max_points: int, name: str
) -> None:
    times, values = data
    if not values:
        return
    select, _ = SELECTORS[name]
    kept_values = [values[i] for i in select(pack_times(times), pack_values(values), max_points)]
    assert min(kept_values) == min(values)
    assert max(kept_values) == max(values)


@settings(max_examples=200)
@given(data=series(), max_points=st.integers(2, 300))
def test_avg_buckets_are_means_within_the_range(data: tuple[list[int], list[float]], max_points: int) -> None:
    times, values = data
    out_t, out_v = _core.downsample_avg(pack_times(times), pack_values(values), max_points)
    assert len(out_t) == len(out_v) <= max_points
    assert out_t == sorted(out_t)
    if times:
        assert times[0] <= out_t[0] and out_t[-1] <= times[-1]
        lo, hi = min(values), max(values)
        assert all(lo - 1e-6 * abs(lo) - 1e-9 <= v <= hi + 1e-6 * abs(hi) + 1e-9 for v in out_v)
    if len(times) <= max_points:
        assert (out_t, out_v) == (times, values)


def test_service_downsample_keeps_experiments_and_modes() -> None:
    times = list(range(0, 10_000_000, 1000))
    values = [math.sin(i / 50) for i in range(len(times))]
    packed = PackedSeries(
        pack_times(times),
        pack_values(values),
        b"".join((7 if i < 5000 else 0).to_bytes(4, "big") for i in range(len(times))),
    )
    for mode in ("stride", "lttb", "minmax", "m4", "avg"):
        points = downsample(packed, 100, mode)
        assert 0 < len(points) <= 100
        if mode != "avg":
            assert points[0].experiment_id == 7 and points[-1].experiment_id is None
            assert points[0].micros == 0 and points[-1].micros == times[-1]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: _core.downsample_stride(10, 1), "at least 2 for stride"),
        (lambda: _core.downsample_lttb(pack_times([1, 2, 3]), pack_values([1.0, 2.0, 3.0]), 2), "at least 3 for lttb"),
        (
            lambda: _core.downsample_minmax(pack_times([1, 2, 3]), pack_values([1.0, 2.0, 3.0]), 3),
            "at least 4 for minmax",
        ),
        (lambda: _core.downsample_m4(pack_times([1, 2, 3]), pack_values([1.0, 2.0]), 10), "differ in length"),
        (lambda: _core.downsample_avg(pack_times([3, 2, 1]), pack_values([1.0, 2.0, 3.0]), 10), "non-decreasing"),
        (lambda: _core.downsample_lttb(b"\x00" * 7, b"", 10), "cannot be 7 bytes long"),
    ],
)
def test_bad_input_raises_invalid_data(call: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidDataError, match=message) as raised:
        call()
    assert raised.value.code in {"length_mismatch", "too_few_points", "unsorted", "bad_packing"}
