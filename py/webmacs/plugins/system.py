"""The built-in `system` plugin: health metrics of the controller's host (read-only inputs)."""

from __future__ import annotations

from webmacs.plugins import Channel, PluginDescriptor

SYSTEM = PluginDescriptor(
    id="system",
    name="System Monitor",
    version="0.1.0",
    vendor="WebMACS",
    description="CPU, memory, disk and temperature monitoring of the host system.",
    url="https://github.com/stefanposs/webmacs",
    channels=(
        Channel("cpu_percent", "CPU Usage", "input", "%", 0.0, 100.0),
        Channel("memory_percent", "Memory Usage", "input", "%", 0.0, 100.0),
        Channel("memory_used_gb", "Memory Used", "input", "GB", 0.0, 128.0),
        Channel("disk_percent", "Disk Usage", "input", "%", 0.0, 100.0),
        Channel("disk_used_gb", "Disk Used", "input", "GB", 0.0, 10000.0),
        Channel("load_avg_1m", "Load Average (1 min)", "input", "load", 0.0, 256.0),
    ),
)
