"""The built-in `simulated` plugin: virtual sensors and actuators (spec §12.1, exact channel table)."""

from __future__ import annotations

from webmacs.plugins import Channel, PluginDescriptor

SIMULATED = PluginDescriptor(
    id="simulated",
    name="Simulated Device",
    version="0.2.0",
    vendor="WebMACS",
    description="Virtual sensors & actuators for testing and demonstration.",
    url="https://github.com/stefanposs/webmacs",
    channels=(
        Channel("temp_reactor", "Temperature Reactor", "input", "°C", 20.0, 500.0),
        Channel("temp_inlet", "Temperature Inlet", "input", "°C", 15.0, 200.0),
        Channel("temp_outlet", "Temperature Outlet", "input", "°C", 15.0, 300.0),
        Channel("pressure_chamber", "Pressure Chamber", "input", "bar", 0.0, 6.0),
        Channel("pressure_diff", "Pressure Differential", "input", "mbar", 0.0, 100.0),
        Channel("volume_flow", "Volume Flow", "input", "m³/h", 0.0, 40.0),
        Channel("humidity", "Humidity", "input", "%", 0.0, 100.0),
        Channel("heater_power", "Heater Power", "output", "%", 0.0, 100.0),
        Channel("valve_position", "Valve Position", "output", "%", 0.0, 100.0),
    ),
)
