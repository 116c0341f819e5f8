"""Process-memory readings shared by the benchmarks (Linux ``/proc``; no library reports the high-water mark)."""


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB, e.g. ``VmRSS`` (resident now) or ``VmHWM`` (resident peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise KeyError(field)
