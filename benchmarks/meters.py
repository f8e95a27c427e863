"""Clocks and memory meters: interleaved timing rounds (median per function, noisy rounds repeated), the CPU load of
other processes during a round, and the peak memory of one call (CUDA allocator, or the process's peak RSS)."""

import gc
import os
import resource
import statistics
import time

import torch


def available_cpus():
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def sync(device):
    """Wait for the device's queued work (so the clock measures it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(values):
    return round(statistics.median(values), 3)


class Stopwatch:
    """Seconds between `start()` and `stop()`, the device synchronised at both ends."""

    def __init__(self, device):
        self.device = device
        self.started = None

    def start(self):
        sync(self.device)
        self.started = time.perf_counter()

    def stop(self):
        sync(self.device)
        return time.perf_counter() - self.started


class OtherLoad:
    """Share of the machine's CPU time that other processes used between two calls of `sample()` (Linux
    /proc/stat minus this process's own CPU time); None where that cannot be read."""

    def __init__(self):
        self.cpus = os.cpu_count() or 1
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self._read()

    def _read(self):
        try:
            with open("/proc/stat", encoding="ascii") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / self.tick  # all CPUs, seconds; minus idle and iowait
        own = sum(os.times()[:2])
        return time.perf_counter(), busy, own

    def sample(self):
        now = self._read()
        last, self.last = self.last, now
        if now is None or last is None or now[0] <= last[0]:
            return None
        others = (now[1] - last[1]) - (now[2] - last[2]) - 2.0 / self.tick  # two ticks of rounding slack
        return max(0.0, others / ((now[0] - last[0]) * self.cpus))


def interleaved_medians(functions, runs, warmup, device, max_other_load=0.1, max_rounds=None):
    """({name: [ms per kept round]}, round info): each round calls every function once, in order, after `warmup`
    untimed rounds. A round during which other processes used more than `max_other_load` of the machine's CPU time is
    set aside and repeated, up to `max_rounds` rounds in all (default 3 x runs); if too few quiet rounds come, the
    busiest rounds are dropped last (the quietest `runs` rounds are kept)."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    max_rounds = max_rounds or 3 * runs
    load = OtherLoad()
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # no collection pauses inside timed calls
    try:
        rounds = _timed_rounds(functions, runs, device, max_other_load, max_rounds, load)
    finally:
        if gc_was_enabled:
            gc.enable()
    quiet = [r for r in rounds if r[0] is None or r[0] <= max_other_load]
    kept = quiet[:runs] if len(quiet) >= runs else sorted(rounds, key=lambda r: r[0] or 0.0)[:runs]
    info = {
        "rounds_run": len(rounds),
        "rounds_kept": len(kept),
        "max_other_load": max_other_load,
        "other_load_per_round": [None if r[0] is None else round(r[0], 3) for r in rounds],
        "all_rounds_quiet": len(quiet) >= runs,
    }
    return {name: [r[1][name] for r in kept] for name in functions}, info


def _timed_rounds(functions, runs, device, max_other_load, max_rounds, load):
    rounds = []
    while len(rounds) < max_rounds:
        load.sample()
        times = {}
        for name, function in functions.items():
            sync(device)
            start = time.perf_counter()
            function()
            sync(device)
            times[name] = (time.perf_counter() - start) * 1000.0
        other = load.sample()
        rounds.append((other, times))
        if sum(1 for r in rounds if r[0] is None or r[0] <= max_other_load) >= runs:
            break
    return rounds


def _read_status_kb(field):
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return _read_status_kb("VmHWM") is not None
    except OSError:
        return False


class MemoryMeter:
    """Peak memory of one call: the CUDA allocator's peak, or the process's peak RSS (reset per call where Linux
    allows, else `ru_maxrss`, never reset). `method` says which."""

    def __init__(self, device):
        self.device = device
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
        elif _reset_peak_rss():
            self.method = "peak resident set size of the process (VmHWM, reset per call via /proc/self/clear_refs)"
        else:
            self.method = "resource.getrusage(RUSAGE_SELF).ru_maxrss (whole process, never reset)"

    def measure(self, function):
        """{"peak_mb", "above_before_mb"} for one call."""
        if self.device.type == "cuda":
            peak, before = self._cuda(function)
        elif self.method.startswith("peak resident"):
            _reset_peak_rss()
            before = _read_status_kb("VmRSS") * 1024
            function()
            peak = _read_status_kb("VmHWM") * 1024
        else:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            function()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_mb": round(peak / 2**20, 1), "above_before_mb": round((peak - before) / 2**20, 1)}

    def _cuda(self, function):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        function()
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device), before
