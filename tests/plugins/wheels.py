"""Build small WebMACS plugin wheels with zipfile: valid ones pip can install, and broken ones."""

from __future__ import annotations

import zipfile
from pathlib import Path

PLUGIN_MODULE = '''\
"""A WebMACS test plugin."""


class Plugin:
    id = "{plugin_id}"
    name = "Test Plugin {plugin_id}"
    version = "{version}"
    vendor = "Tests"
    description = "Built on the fly."
    url = "https://example.com/{plugin_id}"
    channels = [
        {{"id": "level", "name": "Level", "direction": "input", "unit": "mm", "min_value": 0, "max_value": 10}},
        {{"id": "pump", "name": "Pump", "direction": "bidirectional", "unit": "%", "min_value": 0, "max_value": 1}},
    ]
'''


def build_wheel(
    directory: Path,
    dist: str,
    version: str = "1.0.0",
    *,
    plugin_id: str | None = None,
    metadata: bool = True,
    entry_points: str | None = None,
    extra: dict[str, bytes] | None = None,
    file_name: str | None = None,
) -> Path:
    """A wheel for distribution `dist` (a Python identifier) providing `plugin_id` via `[webmacs.plugins]`.
    `entry_points` replaces the entry_points.txt text ("" omits the file)."""
    plugin_id = plugin_id or dist
    module = dist
    info = f"{dist}-{version}.dist-info"
    files: dict[str, bytes] = {
        f"{module}/__init__.py": PLUGIN_MODULE.format(plugin_id=plugin_id, version=version).encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: webmacs-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    if metadata:
        files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    if entry_points is None:
        entry_points = f"[webmacs.plugins]\n{plugin_id} = {module}:Plugin\n"
    if entry_points:
        files[f"{info}/entry_points.txt"] = entry_points.encode()
    files.update(extra or {})
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"]).encode()
    path = directory / (file_name or f"{dist}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path
