"""Plugin discovery through `webmacs.plugins` entry points: descriptors from varied plugin shapes, and failing
entry points skipped rather than failing the listing."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from webmacs.plugins import Channel, builtin
from webmacs.services.plugins import available, describe, discover_installed


class MetaStylePlugin:
    """Shaped like a WebMACS `DevicePlugin`: metadata under `meta`, channels from `get_channels()`."""

    meta = SimpleNamespace(
        id="metastyle", name="Meta Style", version="1.0", vendor="V", description="d", url="https://example.com"
    )

    def get_channels(self) -> list[SimpleNamespace]:
        return [
            SimpleNamespace(
                id="t", name="Temp", direction=SimpleNamespace(value="input"), unit="°C", min_value=-40, max_value=85
            )
        ]


def test_describe_meta_style_plugin() -> None:
    d = describe(MetaStylePlugin, "webmacs-plugin-metastyle")
    assert d.metadata() == {
        "id": "metastyle",
        "name": "Meta Style",
        "version": "1.0",
        "vendor": "V",
        "description": "d",
        "url": "https://example.com",
    }
    assert d.channels == (Channel("t", "Temp", "input", "°C", -40.0, 85.0),)
    assert d.distribution == "webmacs-plugin-metastyle"


@pytest.mark.parametrize(
    ("channels", "message"),
    [
        ([{"id": "a", "name": "A", "direction": "sideways"}], "unknown channel direction"),
        ([{"id": "", "name": "A"}], "invalid text"),
        ([{"id": "a", "name": "A", "unit": "u" * 51}], "invalid text"),
        ([{"id": "a", "name": "A", "min_value": float("nan")}], "non-finite channel bound"),
        ([{"id": "a", "name": "A"}, {"id": "a", "name": "again"}], "duplicate channel ids"),
        ([{"id": "a\x00", "name": "A"}], "invalid text"),
    ],
)
def test_describe_rejects_bad_channels(channels: list[dict[str, object]], message: str) -> None:
    plugin = SimpleNamespace(id="p", name="P", version="1", vendor="", description="", url="", channels=channels)
    with pytest.raises(ValueError, match=message):
        describe(plugin)


def test_builtins_come_first() -> None:
    assert [d.id for d in builtin()] == ["simulated", "system"]
    assert [d.id for d in available()][:2] == ["simulated", "system"]


GOOD_MODULE = """
class Plugin:
    id = "{id}"
    name = "Good"
    version = "2.0"
    vendor = "T"
    description = ""
    url = ""
    channels = [{{"id": "x", "name": "X", "direction": "output", "unit": "V", "min_value": 0, "max_value": 5}}]

class Shadow:
    id = "simulated"  # an installed plugin cannot replace a built-in
    name = "Impostor"
    version = "9"
    vendor = ""
    description = ""
    url = ""
    channels = []
"""


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    sys.path.append(str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        importlib.invalidate_caches()


def test_failing_entry_points_are_skipped(site: Path, caplog: pytest.LogCaptureFixture) -> None:
    module = f"good_plugin_{site.name.replace('-', '_')}"
    (site / f"{module}.py").write_text(GOOD_MODULE.format(id=module))
    info = site / f"{module}-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text(
        "[webmacs.plugins]\n"
        "missing = no_such_module_for_webmacs_tests:Plugin\n"
        f"noattr = {module}:NoSuchClass\n"
        f"good = {module}:Plugin\n"
        f"shadow = {module}:Shadow\n"
    )
    found = {d.id: d for d in discover_installed()}
    assert found[module].channels == (Channel("x", "X", "output", "V", 0.0, 5.0),)
    assert found[module].distribution == module
    assert "missing" not in found and "noattr" not in found
    assert "skipping plugin entry point" in caplog.text
    listed = {d.id: d for d in available()}
    assert listed["simulated"].name == "Simulated Device"
    assert module in listed
