"""The per-node sampler, run for real against this machine's /proc, and the telemetry panels of `fab plot`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image

from cluster import plot
from cluster.monitor import host_table
from cluster.remote import sampler

SAMPLER = Path(sampler.__file__)


def test_the_sampler_records_load_until_the_run_ends(tmp_path):
    interface = next(line.split(":")[0].strip() for line in Path("/proc/net/dev").read_text().splitlines()[2:])
    proc = subprocess.Popen([sys.executable, str(SAMPLER), str(tmp_path), "node0", interface, str(tmp_path), "0.2"])
    out = tmp_path / "telemetry" / "node0.jsonl"
    deadline = time.monotonic() + 20
    while (not out.exists() or len(out.read_text().splitlines()) < 3) and time.monotonic() < deadline:
        time.sleep(0.1)
    (tmp_path / "status.json").write_text(json.dumps({"state": "succeeded"}))
    assert proc.wait(timeout=20) == 0  # it stops by itself once the run has ended
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(samples) >= 3
    for s in samples:
        assert s["host"] == "node0" and 0 <= s["cpu"] <= 100 and 0 < s["mem"] <= 100
        assert s["nic_in_mbs"] >= 0 and s["nic_out_mbs"] >= 0 and s["shared_free_gb"] > 0
        assert s["gpus"] is None or all(0 <= g["util"] <= 100 for g in s["gpus"])
    assert [s["time"] for s in samples] == sorted(s["time"] for s in samples)


def test_telemetry_panels_are_a_real_png(tmp_path):
    folder = tmp_path / "telemetry"
    folder.mkdir()
    for host, load in (("node0", 80.0), ("node1", 40.0)):
        lines = [
            json.dumps(
                {
                    "time": 100 + i,
                    "host": host,
                    "cpu": load,
                    "mem": 30.0,
                    "nic_in_mbs": 5.0,
                    "nic_out_mbs": 4.0,
                    "gpus": [{"util": load, "mem_used_mb": 1e3, "mem_total_mb": 16e3}],
                }
            )
            for i in range(5)
        ]
        (folder / f"{host}.jsonl").write_text("\n".join(lines) + '\n{"time": 10')  # a line cut mid-copy
    out = plot.plot_telemetry(tmp_path, "job: run")
    assert out == tmp_path / "telemetry.png" and out.read_bytes()[:4] == b"\x89PNG"
    height, width, _ = matplotlib.image.imread(out).shape
    assert (width, height) == (880, 770)  # the three panels at 8 x 7 inches, 110 dpi
    assert plot.plot_telemetry(tmp_path / "nothing", "x") is None
    # The panels: GPU use, CPU and NIC per host over time, a line per host in each.
    gpu_ax, cpu_ax, nic_ax = plot.telemetry_figure(plot.read_telemetry(folder), "job: run").axes
    assert [ax.get_ylabel() for ax in (gpu_ax, cpu_ax, nic_ax)] == ["GPU use % (mean)", "CPU %", "NIC MB/s (in + out)"]
    for ax, node0, node1 in ((gpu_ax, 80.0, 40.0), (cpu_ax, 80.0, 40.0), (nic_ax, 9.0, 9.0)):
        assert [line.get_label() for line in ax.get_lines()] == ["node0", "node1"]
        assert [list(line.get_ydata()) for line in ax.get_lines()] == [[node0] * 5, [node1] * 5]
    assert list(gpu_ax.get_lines()[0].get_xdata()) == [0, 1, 2, 3, 4]  # seconds since the first sample


def test_monitor_rows_per_host():
    now = 4_000_000_000.0  # a node clock decades ahead of ours changes nothing: ages are ours
    table = host_table(
        {
            "node1": {"time": now, "cpu": 12.0, "mem": 40.0, "gpus": None, "nic_in_mbs": 1.5},
            "node0": {
                "time": now - 3,
                "cpu": 90.0,
                "mem": 50.0,
                "gpus": [{"util": 97.0, "mem_used_mb": 8000, "mem_total_mb": 16000}],
            },
        },
        {"node0": 3.2, "node1": 0.4},
    )
    rows = list(zip(*[column._cells for column in table.columns], strict=True))
    assert rows[0][:4] == ("node0", "97", "50%", "90") and rows[0][-1] == "3s" and rows[1][-1] == "0s"
    assert rows[1][:3] == ("node1", "no GPU", "-") and rows[1][5] == "1.50"


def test_network_verdict():
    from cluster.monitor import network_verdict

    gpu = lambda util: [{"util": util, "mem_used_mb": 1, "mem_total_mb": 2}]  # noqa: E731
    assert (
        network_verdict({"n0": {"link_mbps": 10000, "nic_in_mbs": 1000.0, "nic_out_mbs": 950.0, "gpus": gpu(45)}})
        == "[red]network-bound[/]: n0 uses 80% of its link (GPUs at 45%)"
    )
    assert network_verdict({"n0": {"link_mbps": 10000, "nic_in_mbs": 1000.0, "gpus": gpu(98)}}).startswith("busy")
    assert (
        network_verdict({"n0": {"link_mbps": 1000, "nic_in_mbs": 10.0}, "n1": {"link_mbps": 1000}})
        == "not the bottleneck: at most 8% of a link (n0)"
    )
    assert network_verdict({"n0": {"cpu": 3}}) == "no link speed reported: cannot tell"


def test_stall_warning_before_the_stall_timeout():
    from cluster.monitor import RunView, stall_warning
    from cluster.runs import RunRecord

    record = RunRecord(
        id="r", job="j", node="n0", run_dir="/d", ranks=1, max_steps=None, started_at="2026-01-01T00:00:00Z"
    )
    view = RunView(record, metrics=[{"step": 5, "time": 10.0}])
    view.status = {"state": "running", "started_at": 1000.0, "heartbeat_at": 1040.0, "stall_timeout": 60}
    assert stall_warning(view) == "no new step for 30s; the run is stopped as stalled at 60s"
    view.status["heartbeat_at"] = 1030.0
    assert stall_warning(view) is None


def test_gpus_come_from_one_nvidia_smi_that_loops_for_the_whole_run(tmp_path):
    # A stand-in nvidia-smi: logs each start, then prints two GPUs every -lms milliseconds (one reading is N/A).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        f"#!{sys.executable}\n"
        "import sys, time\n"
        f"open({str(tmp_path / 'starts')!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "pause = int(sys.argv[sys.argv.index('-lms') + 1]) / 1000\n"
        "for i in range(10_000):\n"
        "    print(f'0, {50 + i % 2}, 1000, 16000', flush=True)\n"
        "    print('1, [N/A], 2000, 16000' if i == 0 else '1, 97, 2000, 16000', flush=True)\n"
        "    time.sleep(pause)\n"
    )
    smi.chmod(0o755)
    interface = next(line.split(":")[0].strip() for line in Path("/proc/net/dev").read_text().splitlines()[2:])
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [sys.executable, str(SAMPLER), str(tmp_path), "node0", interface, str(tmp_path), "0.2"], env=env
    )
    out = tmp_path / "telemetry" / "node0.jsonl"
    deadline = time.monotonic() + 20
    while (not out.exists() or len(out.read_text().splitlines()) < 4) and time.monotonic() < deadline:
        time.sleep(0.1)
    (tmp_path / "status.json").write_text(json.dumps({"state": "stalled"}))
    assert proc.wait(timeout=20) == 0
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    last = samples[-1]["gpus"]
    assert [g["util"] for g in last][1] == 97.0 and last[0]["util"] in (50.0, 51.0)
    assert [(g["mem_used_mb"], g["mem_total_mb"]) for g in last] == [(1000.0, 16000.0), (2000.0, 16000.0)]
    starts = (tmp_path / "starts").read_text().splitlines()
    assert len(starts) == 1 and starts[0].endswith("-lms 200")  # one process, looping at the sample interval
    # It went with the sampler.
    assert subprocess.run(["pgrep", "-f", str(smi)], capture_output=True).returncode == 1
