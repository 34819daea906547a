#!/usr/bin/python3
"""Benchmarks of coral against the umockdev-emulated Coral and the fake xe.

  scripts/bench.py init [RUNS]   coral init: transfers, wall time, overhead, RSS
  scripts/bench.py up            coral up scenarios vs the naive sequence (dfu-util + plain xe)

CORAL_TEST_BIN: the coral binary (default target/release/coral); CORAL_XE_SIM_BIN:
the fake xe (default: beside it); BENCH_RUNS: runs per scenario (default 3).

Run by scripts/bench-init.sh / scripts/bench-up.sh after `cargo build`.
Prints markdown tables (for README.md). Timings are measured, never asserted.
"""
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORAL = os.environ.get("CORAL_TEST_BIN", os.path.join(ROOT, "target/release/coral"))
XE_SIM = os.environ.get("CORAL_XE_SIM_BIN", os.path.join(os.path.dirname(CORAL), "coral-xe-sim"))
if not os.path.exists(XE_SIM):
    XE_SIM = os.path.join(ROOT, "target/release/coral-xe-sim")
EMULATOR = os.path.join(ROOT, "tests/testkit/emulator/coral_emulator.py")
# The test image beside the repository (../shared), or beside a worktree's parent.
FIRMWARE = os.environ.get("CORAL_BENCH_FIRMWARE") or next(
    (p for p in (os.path.join(ROOT, up, "shared/firmware/apex_latest_single_ep.bin") for up in ("..", "../.."))
     if os.path.exists(p)), os.path.join(ROOT, "../shared/firmware/apex_latest_single_ep.bin"))
REENUMERATE_MS = 800
CALL_MS = 150
REQUEST_NAMES = {(0x21, 1): "DNLOAD", (0xA1, 3): "GETSTATUS", (0xA1, 2): "UPLOAD",
                 (0x21, 4): "CLRSTATUS", (0x21, 6): "ABORT", (0x21, 0): "DETACH"}

# Runs the command, then prints wall ms, CPU ms and peak RSS (KiB) of it.
TIMER = ("import resource,subprocess,sys,time\n"
         "t=time.monotonic();r=subprocess.run(sys.argv[1:]);w=(time.monotonic()-t)*1000\n"
         "u=resource.getrusage(resource.RUSAGE_CHILDREN)\n"
         "print('BENCH %.1f %.1f %d' % (w,(u.ru_utime+u.ru_stime)*1000,u.ru_maxrss),file=sys.stderr)\n"
         "sys.exit(r.returncode)")


def emulate(emulator_args, command, env, workdir):
    result = os.path.join(workdir, "result.json")
    cmd = ["umockdev-wrapper", "/usr/bin/python3", EMULATOR, *emulator_args, "--result", result,
           "--", "/usr/bin/python3", "-c", TIMER, *command]
    out = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True)
    line = [l for l in out.stderr.splitlines() if l.startswith("BENCH ")][-1]
    wall, cpu, rss = line.split()[1:]
    with open(result) as f:
        res = json.load(f)
    return {"exit": res["exit"], "wall": float(wall), "cpu": float(cpu), "rss": int(rss), "result": res,
            "stdout": out.stdout, "stderr": out.stderr}


def transfers(res):
    counts = collections.Counter(REQUEST_NAMES.get((r["type"], r["request"]), "other %d/%d" % (r["type"], r["request"]))
                                 for r in res["requests"])
    return ", ".join("%s %d" % kv for kv in sorted(counts.items())) or "none"


def bench_init(runs):
    env = dict(os.environ, CORAL_LOCK="/tmp/coral-bench.lock")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(runs):
            r = emulate(["--reenumerate-ms", str(REENUMERATE_MS)], [CORAL, "-q", "init", "--firmware", FIRMWARE], env, d)
            assert r["exit"] == 0, r["stderr"]
            rows.append(r)
    med = lambda key: statistics.median(r[key] for r in rows)
    handler = statistics.median(r["result"]["handler_ms"] for r in rows)
    wall = med("wall")

    def phase(start, end):
        def at(r, prefix):
            return next(e["t_ms"] for e in r["result"]["events"] if e["event"].startswith(prefix))
        return statistics.median(at(r, end) - at(r, start) for r in rows)
    startup = phase("spawn", "first request")
    upload = phase("first request", "reset")
    reenumeration = phase("reset", "add 2-4")
    detection = phase("add 2-4", "exit")
    print("## coral init on the emulated Coral (%d runs, median; re-enumeration %d ms)\n" % (runs, REENUMERATE_MS))
    print("| measure | value |\n|---|---|")
    print("| control transfers | %s (%d in all) |" % (transfers(rows[0]["result"]), len(rows[0]["result"]["requests"])))
    print("| wall time, start to ready | %.0f ms |" % wall)
    print("| of which the emulator's re-enumeration delay | %d ms |" % REENUMERATE_MS)
    print("| of which the emulated device answering transfers (Python, umockdev) | %.0f ms |" % handler)
    print("| coral's own overhead (wall - re-enumeration - device) | %.0f ms |" % (wall - REENUMERATE_MS - handler))
    print("| phase: start to first USB request (exec, firmware check, listing) | %.1f ms |" % startup)
    print("| phase: upload + read-back (%d transfers through umockdev's socket to the Python device) | %.1f ms |" % (len(rows[0]["result"]["requests"]), upload))
    print("| phase: reset to the ready device appearing (emulator) | %.1f ms |" % reenumeration)
    print("| phase: ready device appearing to coral exiting (polling latency) | %.1f ms |" % detection)
    print("| coral-controlled time (start + polling latency) | %.1f ms |" % (startup + detection))
    print("| coral's CPU time (user + sys) | %.0f ms |" % med("cpu"))
    print("| peak RSS of coral | %.1f MiB |" % (med("rss") / 1024))


SCAN_MS = 500          # xapi reads the bus this long after a USB change, and commits
SHUTDOWN_MS = 200      # the guest's clean shutdown (the same for coral and the naive sequence)
START_MS = 100         # the VM's start
NAIVE_POLL_S = 0.25    # the naive script's pause between two `xe pusb-list`
RUNS = int(os.environ.get("BENCH_RUNS", "3"))


def setup_world(d, vm_power, coral_state):
    state = os.path.join(d, "xapi.json")
    env = dict(os.environ, CORAL_XE_SIM_STATE=state)
    host = subprocess.run([XE_SIM, "--sim-setup", "--vm-power", vm_power, "--coral", coral_state,
                           "--call-ms", str(CALL_MS), "--scan-ms", str(SCAN_MS), "--scan-read-ms", str(SCAN_MS),
                           "--shutdown-ms", str(SHUTDOWN_MS), "--start-ms", str(START_MS)],
                          env=env, capture_output=True, text=True, check=True).stdout.strip()
    bindir = os.path.join(d, "bin")
    os.makedirs(bindir, exist_ok=True)
    if not os.path.exists(os.path.join(bindir, "xe")):
        os.symlink(XE_SIM, os.path.join(bindir, "xe"))
    inventory = os.path.join(d, "inventory")
    with open(inventory, "w") as f:
        f.write("INSTALLATION_UUID='%s'\n" % host)
    with open(state) as f:
        vm = json.load(f)["world"]["vms"][0]["uuid"]
    config = os.path.join(d, "coral.toml")
    with open(config, "w") as f:
        f.write('[[coral]]\nvm = "%s"\n' % vm)
    env.update(PATH=bindir + ":" + os.environ["PATH"], CORAL_XE_SIM_USB=os.path.join(d, "bus.json"),
               CORAL_INVENTORY=inventory, CORAL_LOCK=os.path.join(d, "lock"), CORAL_CONFIG=config,
               CORAL_STATE_DIR=d)
    return state, env, host


def load_world(state):
    subprocess.run([XE_SIM, "--sim-settle"], env=dict(os.environ, CORAL_XE_SIM_STATE=state), check=True)
    with open(state) as f:
        return json.load(f)["world"]


def phase(result, start, end):
    at = lambda prefix: next((e["t_ms"] for e in result["events"] if e["event"].startswith(prefix)), None)
    a, b = at(start), at(end)
    return (b - a) if a is not None and b is not None else 0.0


# name, VM power, XAPI's Coral records, emulated Coral, coral's arguments, naive sequence (None: no baseline)
SCENARIOS = [
    ("boot: power loss, VM halted (`coral up` from the config, as the boot unit)",
     "halted", "bootloader", "uninitialized", ["up"], "boot"),
    ("by hand: power loss, VM running, `coral up --vm frigate --restart`",
     "running", "bootloader", "uninitialized", ["up", "--vm", "frigate", "--restart"], "restart"),
    ("by hand: power loss, VM running, no --restart",
     "running", "bootloader", "uninitialized", ["up", "--vm", "frigate"], None),
    ("steady state (ready and attached), `coral up --vm frigate`",
     "running", "attached", "ready", ["up", "--vm", "frigate"], None),
]


def run_once(power, xapi_coral, emu_state, command, naive, poll_phase=0.5):
    """One run of coral (naive None) or of the naive sequence, each on a fresh world."""
    with tempfile.TemporaryDirectory() as d:
        state, env, host = setup_world(d, power, xapi_coral)
        emulator = ["--state", emu_state, "--reenumerate-ms", str(REENUMERATE_MS), "--bus-file", env["CORAL_XE_SIM_USB"]]
        if naive is None:
            r = emulate(emulator, [CORAL, "-v", *command, "--firmware", FIRMWARE], env, d)
            wall = r["wall"]
        else:
            r = emulate(emulator, ["/usr/bin/python3", os.path.abspath(__file__), "naive", naive, host, FIRMWARE,
                                     str(poll_phase)], env, d)
            lines = [l for l in r["stdout"].splitlines() if l.startswith("NAIVE ")]
            assert lines, r["stdout"] + r["stderr"]
            wall = float(lines[-1].split()[1])
        assert r["exit"] == 0, r["stdout"] + r["stderr"]
        world = load_world(state)
        assert any(v["vm_uuid"] == world["vms"][0]["uuid"] for v in world["vusbs"]), "the VM has its VUSB"
        writes = [c["args"][0] for c in world["calls"] if c["args"][0] not in READS]
        return {"wall": wall, "calls": [c["args"][0] for c in world["calls"]], "writes": writes,
                "download": phase(r["result"], "first request", "reset"),
                "transitions": len(world["power_history"])}


READS = {"pusb-list", "usb-group-list", "vusb-list", "vm-list", "host-list", "pool-list",
         "pusb-param-get", "usb-group-param-get", "vusb-param-get", "vm-param-get", "host-param-get"}


def naive_sequence(kind, host, firmware, phase):
    """The naive recovery, as a person or a small script would type it: dfu-util,
    then the fact sheet's manual `xe` steps, polling pusb-list for the ready Coral.
    `phase` (0..1) shifts its polls against the scan (a script's polls fall anywhere;
    the shift lands during the re-enumeration, before any poll could find the Coral)."""
    def xe(*args):
        return subprocess.run(["xe", *args], capture_output=True, text=True).stdout.strip()
    t0 = time.monotonic()
    subprocess.run(["dfu-util", "-D", firmware, "-d", "1a6e:089a", "-R"], capture_output=True)
    time.sleep(float(phase) * (NAIVE_POLL_S + CALL_MS / 1000))
    while True:
        pusb = xe("pusb-list", "host-uuid=" + host, "vendor-id=18d1", "product-id=9302", "--minimal")
        if pusb:
            break
        time.sleep(NAIVE_POLL_S)
    xe("pusb-param-set", "uuid=" + pusb, "passthrough-enabled=true")
    group = xe("usb-group-list", "PUSB-uuids=" + pusb, "--minimal")
    vm = xe("vm-list", "name-label=frigate", "--minimal")
    if kind == "restart":
        xe("vm-shutdown", "uuid=" + vm)
    xe("vusb-create", "usb-group-uuid=" + group, "vm-uuid=" + vm)
    if kind == "restart":
        xe("vm-start", "uuid=" + vm)
    print("NAIVE %.1f" % ((time.monotonic() - t0) * 1000))


def floor_ms(download, naive):
    """Download + re-enumeration + scan delay + the two writes (+ the VM's shutdown and start calls)."""
    floor = download + REENUMERATE_MS + SCAN_MS + 2 * CALL_MS
    if naive == "restart":
        floor += 2 * CALL_MS + SHUTDOWN_MS + START_MS
    return floor


def calls_text(calls):
    by_cmd = collections.Counter(calls)
    return "%d (%s)" % (len(calls), ", ".join("%s %d" % kv for kv in sorted(by_cmd.items())))


def bench_up():
    print("## coral up vs the naive sequence (%s)\n" % os.path.basename(os.path.dirname(CORAL)))
    print("fake xe %d ms per call; XAPI's scan reads the bus and commits %d ms after each USB change; "
          "re-enumeration %d ms; VM shutdown %d ms, start %d ms; naive polls pusb-list every %.2f s "
          "(its phase spread evenly over the runs); "
          "mean of %d runs each\n" % (CALL_MS, SCAN_MS, REENUMERATE_MS, SHUTDOWN_MS, START_MS, NAIVE_POLL_S, RUNS))
    print("| scenario | coral | xe calls | naive | naive calls | coral / naive | floor | coral / floor |")
    print("|---|---|---|---|---|---|---|---|")
    for name, power, xapi_coral, emu_state, command, naive in SCENARIOS:
        corals, naives = [], []
        for i in range(RUNS):
            corals.append(run_once(power, xapi_coral, emu_state, command, None))
            if naive:
                # Its polls' phase against the scan, spread evenly over the runs.
                naives.append(run_once(power, xapi_coral, emu_state, command, naive, (i + 0.5) / RUNS))
        # Means: where a poll falls against the scan makes the walls bimodal.
        c_wall = statistics.mean(r["wall"] for r in corals)
        c = corals[0]
        cells = ["%.2f s" % (c_wall / 1000), calls_text(c["calls"])]
        if naive:
            n_wall = statistics.mean(r["wall"] for r in naives)
            n_calls = statistics.mean(len(r["calls"]) for r in naives)
            # The download as dfu-util does it (no read-back, nothing to wait for).
            floor = floor_ms(statistics.median(r["download"] for r in naives), naive)
            cells += ["%.2f s" % (n_wall / 1000), "%.1f" % n_calls, "%.2f×" % (c_wall / n_wall),
                      "%.2f s" % (floor / 1000), "%.2f×" % (c_wall / floor)]
        else:
            cells += ["-", "-", "-", "-", "writes: %s" % (", ".join(c["writes"]) or "none")]
        print("| %s | %s |" % (name, " | ".join(cells)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["init"]:
        bench_init(int(sys.argv[2]) if len(sys.argv) > 2 else 10)
    elif sys.argv[1:2] == ["up"]:
        bench_up()
    elif sys.argv[1:2] == ["naive"]:
        naive_sequence(*sys.argv[2:6])
    else:
        sys.exit(__doc__)
