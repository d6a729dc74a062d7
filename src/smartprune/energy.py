"""Energy from hardware counters: NVML on an NVIDIA GPU, RAPL on a CPU that exposes it, else nothing.

A counter is read around a timed region; the idle draw (measured over a short quiet interval
before) times the region's length is subtracted, so what remains is the work's own energy. Where no
counter exists the meter says so (``source`` None and a ``reason``) and callers report "not
measurable here": an estimate is never shown as a measurement.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

RAPL = Path("/sys/class/powercap")


@dataclass
class EnergyMeter:
    """Cumulative joules of one device from its counter (`read`), or why there is none."""

    source: str | None  # "nvml" | "rapl" | None
    reason: str = ""
    _handle: object = None
    _zones: tuple[Path, ...] = ()

    @property
    def measurable(self) -> bool:
        return self.source is not None

    def counters(self) -> list[float]:
        """Joules since an arbitrary origin, one per counter (RAPL: per package, each wrapping on its own)."""
        if self.source == "nvml":
            import pynvml

            return [pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0]  # millijoules
        if self.source == "rapl":
            return [int((z / "energy_uj").read_text()) / 1e6 for z in self._zones]
        raise RuntimeError(f"no energy counter: {self.reason}")

    def read(self) -> float:
        return sum(self.counters())

    def _ranges(self) -> list[float]:
        return [int((z / "max_energy_range_uj").read_text()) / 1e6 for z in self._zones] or [0.0]

    def measure(self, fn, *, idle_watts: float = 0.0) -> tuple[float, float]:
        """(joules above idle, seconds) of running `fn` once."""
        start, t = self.counters(), time.perf_counter()
        fn()
        seconds = time.perf_counter() - t
        used = 0.0
        for before, after, span in zip(start, self.counters(), self._ranges(), strict=False):
            used += after - before if after >= before else after - before + span  # a counter wrapped once
        return max(0.0, used - idle_watts * seconds), seconds

    def idle_watts(self, seconds: float = 2.0) -> float:
        """Mean draw while nothing of ours runs."""
        joules, took = self.measure(lambda: time.sleep(seconds))
        return joules / took


def _rapl_zones() -> tuple[Path, ...]:
    """Package-level RAPL zones (intel-rapl:N, not their sub-zones), readable by this process."""
    zones = tuple(sorted(p for p in RAPL.glob("intel-rapl:*") if p.name.count(":") == 1))
    readable = tuple(z for z in zones if (z / "energy_uj").is_file())
    try:
        for z in readable:
            int((z / "energy_uj").read_text())
    except (OSError, ValueError):
        return ()
    return readable


def energy_meter(device_type: str, index: int = 0) -> EnergyMeter:
    """The counter for a device of type ``cuda`` or ``cpu``."""
    if device_type == "cuda":
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            meter = EnergyMeter("nvml", _handle=handle)
            meter.read()
            return meter
        except ImportError:
            return EnergyMeter(None, "nvidia-ml-py (pynvml) is not installed")
        except Exception as exc:  # NVML raises its own error classes; any of them means no counter
            return EnergyMeter(None, f"NVML has no energy counter here ({exc})")
    zones = _rapl_zones()
    if zones:
        return EnergyMeter("rapl", _zones=zones)
    return EnergyMeter(None, f"no readable RAPL counter under {RAPL} (no energy counters on this CPU, or no "
                             "permission)")
