#!/usr/bin/python3
"""Benchmarks of coral against the umockdev-emulated Coral and the fake xe.

  scripts/bench.py init [RUNS]   coral init: transfers, wall time, overhead, RSS
  scripts/bench.py up            coral up scenarios vs the manual procedure

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
XE_SIM = os.path.join(os.path.dirname(CORAL), "coral-xe-sim")
if not os.path.exists(XE_SIM):
    XE_SIM = os.path.join(ROOT, "target/release/coral-xe-sim")
EMULATOR = os.path.join(ROOT, "tests/testkit/emulator/coral_emulator.py")
FIRMWARE = os.path.join(ROOT, "../shared/firmware/apex_latest_single_ep.bin")
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


def setup_world(d, vm_power, coral_state, extra=()):
    state = os.path.join(d, "xapi.json")
    env = dict(os.environ, CORAL_XE_SIM_STATE=state)
    host = subprocess.run([XE_SIM, "--sim-setup", "--vm-power", vm_power, "--coral", coral_state,
                           "--call-ms", str(CALL_MS), *extra], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()
    bindir = os.path.join(d, "bin")
    os.makedirs(bindir, exist_ok=True)
    if not os.path.exists(os.path.join(bindir, "xe")):
        os.symlink(XE_SIM, os.path.join(bindir, "xe"))
    inventory = os.path.join(d, "inventory")
    with open(inventory, "w") as f:
        f.write("INSTALLATION_UUID='%s'\n" % host)
    env.update(PATH=bindir + ":" + os.environ["PATH"], CORAL_XE_SIM_USB=os.path.join(d, "bus.json"),
               CORAL_INVENTORY=inventory, CORAL_LOCK=os.path.join(d, "lock"))
    return state, env


def load_world(state):
    subprocess.run([XE_SIM, "--sim-settle"], env=dict(os.environ, CORAL_XE_SIM_STATE=state), check=True)
    with open(state) as f:
        return json.load(f)["world"]


def xapi_wait_seen_by_coral(stderr):
    """Time coral spent in xe calls (process start included) plus the sleeps
    between polls while XAPI's scan ran, from coral's -v log."""
    total, in_scan, scanning, scan_wait = 0.0, 0.0, False, 0.0
    for line in stderr.splitlines():
        if "scan wait: waiting for XAPI" in line:
            scanning = True  # the scan wait is timed from here
        m = re.search(r"xe (\S+) answered in ([0-9.]+) ms", line)
        if m:
            total += float(m.group(2))
            if scanning:
                in_scan += float(m.group(2))
        m = re.search(r"after ([0-9.]+) ms of scan wait", line)
        if m:
            scanning = False
            scan_wait = float(m.group(1))
    return total + max(scan_wait - in_scan, 0.0)


def phase(result, start, end):
    at = lambda prefix: next((e["t_ms"] for e in result["events"] if e["event"].startswith(prefix)), None)
    a, b = at(start), at(end)
    return (b - a) if a is not None and b is not None else 0.0


def xapi_wait(calls):
    """Time spent in xe calls, plus the wait for XAPI's scan (from the scan kick to the poll that saw the device)."""
    total = sum(c["duration_ms"] for c in calls)
    scans = [c for c in calls if c["args"][0] == "pusb-scan"]
    if scans:
        start = scans[0]["at_ms"]
        lists = [c for c in calls if c["args"][0] == "pusb-list" and c["at_ms"] >= start]
        end = lists[-1]["at_ms"] + lists[-1]["duration_ms"]
        inside = sum(c["duration_ms"] for c in calls if start <= c["at_ms"] < end)
        total += (end - start) - inside
    return total


SCENARIOS = [
    ("power loss, VM halted (boot service)", "halted", "bootloader", "uninitialized", []),
    ("power loss, VM running, --restart", "running", "bootloader", "uninitialized", ["--restart"]),
    ("power loss, VM running, no --restart", "running", "bootloader", "uninitialized", []),
    ("steady state (ready and attached)", "running", "attached", "ready", []),
]


def bench_up():
    print("## coral up (fake xe %d ms per call, XAPI scan 500 ms, VM shutdown 5 s, start 3 s; re-enumeration %d ms)\n"
          % (CALL_MS, REENUMERATE_MS))
    print("| scenario | wall | xe calls | power transitions | USB transfers | device: upload (emulated transfers) | device: re-enumeration | waiting on XAPI (as coral sees it) | coral's own overhead |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, power, coral_state, emu_state, flags in SCENARIOS:
        with tempfile.TemporaryDirectory() as d:
            state, env = setup_world(d, power, coral_state)
            r = emulate(["--state", emu_state, "--reenumerate-ms", str(REENUMERATE_MS), "--bus-file", env["CORAL_XE_SIM_USB"]],
                        [CORAL, "-v", "up", "--vm", "frigate", "--firmware", FIRMWARE, *flags], env, d)
            assert r["exit"] == 0, r["stderr"]
            world = load_world(state)
            calls = world["calls"]
            by_cmd = collections.Counter(c["args"][0] for c in calls)
            upload = phase(r["result"], "first request", "reset")
            reenumeration = phase(r["result"], "reset", "add 2-4")
            xapi = xapi_wait_seen_by_coral(r["stderr"])
            transitions = ", ".join("%s→%s" % (e["from"], e["to"]) for e in world["power_history"]) or "none"
            print("| %s | %.2f s | %d (%s) | %s | %d | %.0f ms | %.0f ms | %.0f ms | %.0f ms |" % (
                name, r["wall"] / 1000, len(calls), ", ".join("%s %d" % kv for kv in sorted(by_cmd.items())),
                transitions, len(r["result"]["requests"]), upload, reenumeration, xapi,
                r["wall"] - upload - reenumeration - xapi))
    manual()


def manual():
    """The fact sheet's manual helper-VM route, modelled on the same fake host."""
    with tempfile.TemporaryDirectory() as d:
        state, env = setup_world(d, "running", "bootloader")
        with open(state) as f:
            st = json.load(f)
        w = st["world"]
        helper = dict(w["vms"][0], uuid="00000000-0000-4000-8000-0000000000aa", name_label="coral-helper",
                      power_state="running")
        w["vms"].append(helper)
        with open(state, "w") as f:
            json.dump(st, f)
        host = open(os.path.join(d, "inventory")).read().split("'")[1]
        bus = env["CORAL_XE_SIM_USB"]

        def xe(*args):
            out = subprocess.run(["xe", *args], env=env, capture_output=True, text=True)
            return out.stdout.strip()

        def write_bus(device):
            with open(bus, "w") as f:
                json.dump([device], f)

        boot = {"path": "1-4", "vendor_id": "1a6e", "product_id": "089a", "vendor_desc": "Global Unichip Corp.",
                "product_desc": "", "serial": "", "version": "2.10", "speed": "480.000", "interface_classes": [254]}
        ready = dict(boot, path="2-4", vendor_id="18d1", product_id="9302", vendor_desc="Google Inc.",
                     version="3.10", speed="5000.000", interface_classes=[255])
        write_bus(boot)
        t0 = time.monotonic()

        def hand_over(vid, vm_name):
            pusb = xe("pusb-list", "host-uuid=" + host, "vendor-id=" + vid, "--minimal")
            xe("pusb-param-set", "uuid=" + pusb, "passthrough-enabled=true")
            group = xe("usb-group-list", "PUSB-uuids=" + pusb, "--minimal")
            vm = xe("vm-list", "name-label=" + vm_name, "--minimal")
            xe("vm-shutdown", "uuid=" + vm)
            xe("vusb-create", "usb-group-uuid=" + group, "vm-uuid=" + vm)
            xe("vm-start", "uuid=" + vm)

        hand_over("1a6e", "coral-helper")        # restart 1: the helper VM's runtime uploads the firmware
        time.sleep(REENUMERATE_MS / 1000)        # the Coral re-enumerates as 18d1:9302
        write_bus(ready)
        while not xe("pusb-list", "host-uuid=" + host, "vendor-id=18d1", "--minimal"):
            time.sleep(0.25)                     # wait for XAPI's scan (a person would rerun pusb-list)
        hand_over("18d1", "frigate")             # restart 2: the target VM, the whole sequence again
        wall = time.monotonic() - t0
        world = load_world(state)
        print("| manual helper-VM route (fact sheet), same fake host, no human delays counted | %.2f s | %d | %d transitions (2 VM restarts) | done by the guest | - | %d ms | %.0f ms | (a person typing) |" % (
            wall, len(world["calls"]), len(world["power_history"]), REENUMERATE_MS, xapi_wait(world["calls"])))


if __name__ == "__main__":
    if sys.argv[1:2] == ["init"]:
        bench_init(int(sys.argv[2]) if len(sys.argv) > 2 else 10)
    elif sys.argv[1:2] == ["up"]:
        bench_up()
    else:
        sys.exit(__doc__)
