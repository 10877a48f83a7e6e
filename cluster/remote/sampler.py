"""Samples one node's load while a run lasts: GPU use and memory, CPU, memory, NIC MB/s, free disk.

Started under systemd on every node of a run; appends one JSON line every interval (1 s) to
<run>/telemetry/<host>.jsonl on the shared storage, and stops by itself once the run's
status.json says it ended. Stdlib only, reading /proc and statvfs, plus one `nvidia-smi` that
loops by itself on GPU hosts (benchmarks/health_bench.py measures the cost).
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

FINAL = {"succeeded", "failed", "cancelled", "stalled"}


def cpu_times():
    """(busy, total) jiffies from the first line of /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def memory_percent():
    info = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            name, value = line.split(":", 1)
            info[name] = int(value.split()[0])
    total = info.get("MemTotal", 0)
    return round(100.0 * (total - info.get("MemAvailable", total)) / total, 1) if total else None


def nic_bytes(interface):
    """(received, sent) bytes of one interface from /proc/net/dev, or None."""
    with open("/proc/net/dev") as fh:
        for line in fh:
            name, _, counters = line.partition(":")
            if name.strip() == interface:
                values = counters.split()
                return int(values[0]), int(values[8])
    return None


def link_mbps(interface):
    """The interface's link speed in Mb/s as the kernel reports it, or None (some virtual NICs say -1)."""
    try:
        with open(f"/sys/class/net/{interface}/speed") as fh:
            speed = int(fh.read().strip())
    except (OSError, ValueError):
        return None
    return speed if speed > 0 else None


def free_gb(path):
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return round(st.f_bavail * st.f_frsize / 1e9, 1)


class Gpus:
    """GPU use and memory from one nvidia-smi that loops by itself for the whole run, read by a thread.

    Starting nvidia-smi costs tens of milliseconds of CPU (it initialises the driver each time):
    once a second that alone would be several % of a core. Its own loop (-lms) pays that once.
    """

    QUERY = "--query-gpu=index,utilization.gpu,memory.used,memory.total"

    def __init__(self, interval):
        self.interval_ms = str(max(int(interval * 1000), 100))
        self.latest = {}  # GPU index -> its newest reading
        self.proc = None
        self.present = shutil.which("nvidia-smi") is not None
        self._start()

    def _start(self):
        if not self.present:
            return
        argv = ["nvidia-smi", self.QUERY, "--format=csv,noheader,nounits", "-lms", self.interval_ms]
        try:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc):
        for line in proc.stdout:
            try:
                index, util, used, total = (part.strip() for part in line.split(","))
                reading = {"util": float(util), "mem_used_mb": float(used), "mem_total_mb": float(total)}
                self.latest[int(index)] = reading
            except ValueError:
                continue  # "[N/A]" from a GPU that cannot say, or a line cut short

    def read(self):
        """[{util, mem_used_mb, mem_total_mb}] per GPU, or None on a host without NVIDIA GPUs."""
        if self.proc is not None and self.proc.poll() is not None:
            self._start()  # it died (a driver reset): start it again rather than report stale figures
            return None
        return [self.latest[i] for i in sorted(self.latest)] or None

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def ended(run_dir):
    try:
        with open(os.path.join(run_dir, "status.json")) as fh:
            return json.load(fh).get("state") in FINAL
    except (OSError, ValueError):
        return False


def sample_forever(run_dir, host, interface, shared, interval):
    out_dir = os.path.join(run_dir, "telemetry")
    os.makedirs(out_dir, exist_ok=True)
    previous = (time.time(), cpu_times(), nic_bytes(interface))
    gpus = Gpus(interval)
    try:
        return _sample(run_dir, out_dir, host, interface, shared, interval, previous, gpus)
    finally:
        gpus.stop()


def _sample(run_dir, out_dir, host, interface, shared, interval, previous, gpus):
    with open(os.path.join(out_dir, f"{host}.jsonl"), "a") as out:
        while True:
            time.sleep(interval)
            now, cpu, nic = time.time(), cpu_times(), nic_bytes(interface)
            then, cpu_before, nic_before = previous
            elapsed = max(now - then, 1e-6)
            record = {
                "time": round(now, 2),
                "host": host,
                "cpu": round(100.0 * (cpu[0] - cpu_before[0]) / max(cpu[1] - cpu_before[1], 1), 1),
                "mem": memory_percent(),
                "gpus": gpus.read(),
                "shared_free_gb": free_gb(shared),
                "scratch_free_gb": free_gb("/data1"),
                "link_mbps": link_mbps(interface),
            }
            if nic and nic_before:
                record["nic_in_mbs"] = round((nic[0] - nic_before[0]) / elapsed / 1e6, 3)
                record["nic_out_mbs"] = round((nic[1] - nic_before[1]) / elapsed / 1e6, 3)
            out.write(json.dumps(record) + "\n")
            out.flush()
            previous = (now, cpu, nic)
            if ended(run_dir):
                return 0


if __name__ == "__main__":
    run_dir, host, interface, shared = sys.argv[1:5]
    interval = float(sys.argv[5]) if len(sys.argv) > 5 else 2.0
    sys.exit(sample_forever(run_dir, host, interface, shared, interval))
