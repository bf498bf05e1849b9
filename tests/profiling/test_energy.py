"""Energy meters on fake NVML and fake RAPL trees: exact joules, wraparound, and missing backends."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from vlmopt.profiling import energy as energy_module
from vlmopt.profiling.energy import DEFAULT_POWERCAP_ROOT, EnergyMeter, EnergyResult, per_sample_energy


def scripted_timer(*values):
    ticks = iter(values)
    return lambda: next(ticks)


class NVMLError(Exception):
    pass


def fake_pynvml(energy_mj=(), power_mw=(), log=None, fail=None):
    """A pynvml stand-in whose counters return the given values in order; ``fail`` names a call that raises."""
    log = log if log is not None else []
    energy, power = iter(energy_mj), iter(power_mw)
    module = types.ModuleType("pynvml")
    module.NVMLError = NVMLError

    def call(name, result):
        def fn(*args):
            log.append((name, *args))
            if fail == name:
                raise NVMLError(f"{name}: Not Supported")
            return result() if callable(result) else result

        return fn

    module.nvmlInit = call("init", None)
    module.nvmlShutdown = call("shutdown", None)
    module.nvmlDeviceGetHandleByIndex = call("handle", lambda: "handle")
    module.nvmlDeviceGetHandleByUUID = call("handle_uuid", lambda: "handle")
    module.nvmlDeviceGetTotalEnergyConsumption = call("energy", lambda: next(energy))
    module.nvmlDeviceGetPowerUsage = call("power", lambda: next(power))
    module.log = log
    return module


@pytest.fixture
def calls(monkeypatch):
    """One log of NVML calls and CUDA synchronizations, in order; no CUDA_VISIBLE_DEVICES."""
    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("sync", device)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return log


def test_nvml_energy_minus_idle_power_times_duration(monkeypatch, calls):
    nvml = fake_pynvml(energy_mj=[1_000_000, 1_500_000], power_mw=[30_000, 34_000], log=calls)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    meter = EnergyMeter("cuda:0", idle_s=0.02, idle_interval_s=0.01, settle_s=0, timer=scripted_timer(10.0, 12.5))
    with meter:
        calls.append("body")
    result = meter.result
    assert result.total_j == 500.0  # (1,500,000 - 1,000,000) mJ
    assert result.idle_w == 32.0  # mean of 30 W and 34 W
    assert result.seconds == 2.5
    assert result.energy_j == 420.0  # 500 J - 32 W x 2.5 s
    assert result.reason is None and result.unit == "J" and result.device == "cuda:0"
    assert result.method.startswith("NVML total energy minus idle power x time (NVML index 0)")
    assert calls == [
        ("init",),
        ("handle", 0),
        ("power", "handle"),
        ("power", "handle"),
        ("energy", "handle"),
        "body",
        ("sync", torch.device("cuda:0")),
        ("energy", "handle"),
        ("shutdown",),
    ]


def test_idle_power_is_taken_once_the_gpu_has_settled(monkeypatch, calls):
    # Right after earlier work the board still draws 180 W, falling to 80 W: windows of 2 samples.
    falling = [190_000, 170_000, 140_000, 120_000, 95_000, 85_000, 80_500, 79_500, 80_000, 80_000]
    nvml = fake_pynvml(energy_mj=[0, 300_000], power_mw=falling, log=calls)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(energy_module.time, "sleep", lambda seconds: None)
    with EnergyMeter("cuda:0", idle_s=0.2, idle_interval_s=0.1, timer=scripted_timer(0.0, 2.0)) as meter:
        pass
    result = meter.result
    # Windows: 180, 130, 90, 80, 80 W; the fourth is 10 W below the third, the fifth not below the fourth.
    assert result.idle_w == 80.0 and "power settled after 0.8 s" in result.method
    assert result.total_j == 300.0 and result.energy_j == 140.0  # 300 J - 80 W x 2 s
    assert sum(entry[0] == "power" for entry in calls if isinstance(entry, tuple)) == 10


def test_idle_power_taken_too_early_gives_no_negative_energy(monkeypatch, calls):
    """The measured failure: idle power sampled right after work (180 W) above the region's mean (150 W)."""
    nvml = fake_pynvml(energy_mj=[0, 300_000], power_mw=[190_000, 170_000, 150_000, 130_000], log=calls)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(energy_module.time, "sleep", lambda seconds: None)
    meter = EnergyMeter("cuda:0", idle_s=0.2, idle_interval_s=0.1, settle_s=0, timer=scripted_timer(0.0, 2.0))
    with meter:
        pass
    result = meter.result
    assert result.energy_j is None and result.total_j == 300.0 and result.idle_w == 180.0
    assert result.reason == (
        "net energy below zero: idle power 180.0 W is above the region's mean power 150.0 W "
        "(the device had not settled when idle power was taken)"
    )
    # With a bounded wait that ends while power still falls, the method says so.
    nvml = fake_pynvml(energy_mj=[0, 300_000], power_mw=[190_000, 170_000, 150_000, 130_000], log=calls)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    meter = EnergyMeter("cuda:0", idle_s=0.2, idle_interval_s=0.1, settle_s=0.2, timer=scripted_timer(0.0, 2.0))
    with meter:
        pass
    assert meter.result.idle_w == 140.0
    assert "power still falling after 0.2 s (180.0 W -> 140.0 W)" in meter.result.method
    assert meter.result.energy_j == 20.0


def test_a_counter_that_did_not_advance_gives_no_energy(monkeypatch, calls):
    """NVML updates its energy counter periodically: a region shorter than that reads 0 J."""
    nvml = fake_pynvml(energy_mj=[5_000_000, 5_000_000], log=calls)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with EnergyMeter("cuda:0", idle_w=80.0, timer=scripted_timer(0.0, 0.02)) as meter:
        assert meter.measuring
    result = meter.result
    assert result.energy_j is None and result.total_j == 0.0
    assert result.reason == "the energy counter did not advance over the 0.02 s region; time longer work"
    assert not meter.measuring


def test_nvml_follows_cuda_visible_devices(monkeypatch, calls):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    nvml = fake_pynvml(energy_mj=[0, 4_000], log=calls)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with EnergyMeter("cuda:1", idle_w=1.0, timer=scripted_timer(0.0, 2.0)) as meter:
        pass
    assert ("handle", 5) in calls
    assert meter.result.energy_j == 2.0  # 4 J - 1 W x 2 s
    assert meter.result.idle_w == 1.0 and "idle power given (1 W)" in meter.result.method
    assert not any(entry[0] == "power" for entry in calls if isinstance(entry, tuple))

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234abcd")
    nvml = fake_pynvml(energy_mj=[0, 4_000], log=calls)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with EnergyMeter("cuda:0", idle_s=0, timer=scripted_timer(0.0, 2.0)) as meter:
        pass
    assert ("handle_uuid", "GPU-1234abcd") in calls
    assert (meter.result.energy_j, meter.result.idle_w) == (4.0, None)
    assert meter.result.method.endswith("no idle power subtracted")


def test_missing_pynvml_gives_none_and_the_reason(monkeypatch, calls):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    ran = []
    with EnergyMeter("cuda", timer=scripted_timer(1.0, 4.0)) as meter:
        ran.append(True)
    result = meter.result
    assert ran == [True]
    assert (result.energy_j, result.total_j, result.idle_w) == (None, None, None)
    assert result.reason == "pynvml (nvidia-ml-py) is not installed"
    assert result.seconds == 3.0
    assert calls == []  # nothing to synchronize for


@pytest.mark.parametrize(
    ("fail", "reason"),
    [
        ("init", "NVML could not be initialised: init: Not Supported"),
        ("energy", "nvmlDeviceGetTotalEnergyConsumption failed for NVML index 0: energy: Not Supported"),
        ("power", "nvmlDeviceGetPowerUsage failed for NVML index 0: power: Not Supported"),
    ],
)
def test_nvml_errors_give_none_and_the_reason(monkeypatch, calls, fail, reason):
    nvml = fake_pynvml(energy_mj=[0, 1000], power_mw=[1000, 1000], log=calls, fail=fail)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with EnergyMeter("cuda:0", idle_s=0.01, idle_interval_s=0.01, timer=scripted_timer(0.0, 1.0)) as meter:
        pass
    assert meter.result.energy_j is None
    assert meter.result.reason == reason
    if fail != "init":
        assert calls[-1] == ("shutdown",)


MAX_UJ = 262_143_328_850


def make_zone(root, name, index, energy_uj, max_uj=MAX_UJ):
    zone = root / f"intel-rapl:{index}"
    zone.mkdir(parents=True)
    (zone / "name").write_text(f"{name}\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


def set_energy(zone, energy_uj):
    (zone / "energy_uj").write_text(f"{energy_uj}\n")


def test_rapl_sums_package_zones(tmp_path):
    p0 = make_zone(tmp_path, "package-0", 0, 1_000_000)
    p1 = make_zone(tmp_path, "package-1", 1, 500)
    core = make_zone(tmp_path, "core", "0:0", 0)  # a subzone: not a package
    mmio = tmp_path / "intel-rapl-mmio:0"
    mmio.mkdir()
    with EnergyMeter(powercap_root=tmp_path, idle_s=0, timer=scripted_timer(5.0, 7.0)) as meter:
        set_energy(p0, 4_000_000)
        set_energy(p1, 2_000_500)
        set_energy(core, 9_000_000)
    result = meter.result
    assert result.total_j == 5.0  # 3 J + 2 J
    assert result.energy_j == 5.0 and result.idle_w is None
    assert result.seconds == 2.0 and result.device == "cpu"
    assert result.method.startswith("RAPL powercap package-0 + package-1")


def test_rapl_counter_wraparound(tmp_path):
    p0 = make_zone(tmp_path, "package-0", 0, MAX_UJ - 1_000_000)
    with EnergyMeter(powercap_root=tmp_path, idle_s=0, timer=scripted_timer(0.0, 1.0)) as meter:
        set_energy(p0, 500_000)
    assert meter.result.total_j == 1.5


def test_rapl_idle_power_is_subtracted(tmp_path, monkeypatch):
    p0 = make_zone(tmp_path, "package-0", 0, 0)
    monkeypatch.setattr(energy_module.time, "sleep", lambda seconds: set_energy(p0, 1_000_000))
    timer = scripted_timer(100.0, 100.5, 101.0, 103.0)  # idle window 0.5 s, region 2 s
    with EnergyMeter(powercap_root=tmp_path, idle_s=0.5, settle_s=0, timer=timer) as meter:
        set_energy(p0, 11_000_000)
    result = meter.result
    assert result.idle_w == 2.0  # 1 J over 0.5 s
    assert result.total_j == 10.0
    assert result.energy_j == 6.0  # 10 J - 2 W x 2 s
    assert "idle power over 0.5 s" in result.method


def test_missing_powercap_tree_names_the_path(tmp_path):
    root = tmp_path / "powercap"
    with EnergyMeter(powercap_root=root, timer=scripted_timer(0.0, 1.0)) as meter:
        pass
    assert meter.result.energy_j is None
    assert meter.result.reason == f"RAPL is not available: {root} does not exist"


def test_tree_without_packages_or_readable_counters(tmp_path):
    make_zone(tmp_path / "a", "psys", 0, 0)
    with EnergyMeter(powercap_root=tmp_path / "a", idle_s=0, timer=scripted_timer(0.0, 1.0)) as meter:
        pass
    assert "no package zone" in meter.result.reason and str(tmp_path / "a") in meter.result.reason

    zone = make_zone(tmp_path / "b", "package-0", 0, 0)
    (zone / "energy_uj").unlink()
    (zone / "energy_uj").mkdir()  # unreadable as a file
    with EnergyMeter(powercap_root=tmp_path / "b", idle_s=0, timer=scripted_timer(0.0, 1.0)) as meter:
        pass
    assert meter.result.energy_j is None
    assert meter.result.reason.startswith(f"cannot read {zone / 'energy_uj'}")


def test_default_cpu_meter_on_a_machine_without_rapl():
    if DEFAULT_POWERCAP_ROOT.exists():
        pytest.skip(f"{DEFAULT_POWERCAP_ROOT} exists here; this test covers machines without it")
    with EnergyMeter(idle_s=0) as meter:
        pass
    assert meter.result.energy_j is None
    assert str(DEFAULT_POWERCAP_ROOT) in meter.result.reason


def test_per_sample_energy():
    result = EnergyResult(energy_j=420.0, total_j=500.0, idle_w=32.0, seconds=2.5, method="m", device="cuda:0")
    each = per_sample_energy(result, 8)
    assert (each.energy_j, each.total_j, each.idle_w, each.seconds) == (52.5, 62.5, 32.0, 2.5)
    assert each.unit == "J/sample" and each.method == "m; divided by 8 samples"
    missing = EnergyResult(None, None, None, 1.0, "m", "cpu", reason="no RAPL")
    assert per_sample_energy(missing, 8).energy_j is None and per_sample_energy(missing, 8).reason == "no RAPL"
    with pytest.raises(ValueError, match="n_samples"):
        per_sample_energy(result, 0)
    with pytest.raises(ValueError, match="unit 'J'"):
        per_sample_energy(each, 2)


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="idle_s"):
        EnergyMeter(idle_s=-1)
    with pytest.raises(ValueError, match="cpu and cuda"):
        EnergyMeter("meta")
    with pytest.raises(RuntimeError, match="after the with block"):
        _ = EnergyMeter().result
