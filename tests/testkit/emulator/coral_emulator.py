#!/usr/bin/python3
"""A Google Coral USB Accelerator emulated with umockdev, for end-to-end tests.

Run as:  umockdev-wrapper /usr/bin/python3 coral_emulator.py [options] -- COMMAND...

Builds a umockdev testbed holding the Coral (DFU boot loader 1a6e:089a, or the
ready 18d1:9302), runs COMMAND inside it, answers its usbfs ioctls, and when
COMMAND exits writes a JSON result (--result) and exits with COMMAND's status.

The boot loader follows DFU 1.1 as strictly as the project's in-process
simulator: a request that is invalid in the current state stalls and leaves
the device in dfuERROR/errSTALLEDPKT (ABORT in dfuDNLOAD-SYNC or
dfuMANIFEST-SYNC, any request before bwPollTimeout has passed in dfuDNBUSY or
dfuMANIFEST). After a complete, manifested download a USB reset makes it
leave the bus and come back, --reenumerate-ms later, as 18d1:9302 at
--ready-path (the SuperSpeed bus on xHCI).

The testbed's sysfs has the ports of each xHCI controller's two root hubs
(buses 1/2, and 3/4 when used) with their `peer` links as Linux makes them:
`/sys/bus/usb/devices/usbN/N-0:1.0/usbN-portM/peer` -> the other hub's port.
By default port M of bus 1 is the peer of port M of bus 2; --peer 1-5=2-3
models a chipset whose two sides of a port carry different numbers.

Fault knobs reproduce the field: a reset that fails with another errno, a
garbled bwPollTimeout, an upload that never ends, a boot loader that appears
late, one that comes back as 1a6e:089a, one left mid-transfer by an
interrupted run. Written by the coral project from the DFU 1.1 spec,
coral-dfu.md and usb-emulation.md.
"""
import argparse
import errno
import gc
import json
import os
import shutil
import signal
import struct
import sys
import time

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import GLib, UMockdev  # noqa: E402

# usbfs ioctls (x86-64)
SUBMITURB = 0x8038550A
DISCARDURB = 0x550B
REAPURB = 0x4008550C
REAPURBNDELAY = 0x4008550D
CLAIMINTERFACE = 0x8004550F
RELEASEINTERFACE = 0x80045510
SETINTERFACE = 0x80085504
SETCONFIGURATION = 0x80045505
GETDRIVER = 0x41045508
IOCTL = 0xC0105512
RESET = 0x5514
CLEAR_HALT = 0x80045515
GET_CAPABILITIES = 0x8004551A
DISCONNECT_CLAIM = 0x8108551B
GET_SPEED = 0x551F
CONNECTINFO = 0x40085511

# DFU
DETACH, DNLOAD, UPLOAD, GETSTATUS, CLRSTATUS, GETSTATE, ABORT = range(7)
APP_IDLE, APP_DETACH, IDLE, DNLOAD_SYNC, DNBUSY, DNLOAD_IDLE, MANIFEST_SYNC = range(7)
MANIFEST, MANIFEST_WAIT_RESET, UPLOAD_IDLE, ERROR = 7, 8, 9, 10
ERR_STALLEDPKT = 0x0F

BOOTLOADER = {"vid": 0x1A6E, "pid": 0x089A, "bcd_usb": 0x0210, "vendor": "Global Unichip Corp.",
              "version": "2.10", "speed": "480", "xapi_speed": "480.000", "class": 0xFE}
READY = {"vid": 0x18D1, "pid": 0x9302, "bcd_usb": 0x0310, "vendor": "Google Inc.",
         "version": "3.10", "speed": "5000", "xapi_speed": "5000.000", "class": 0xFF}


def device_descriptor(ident):
    return struct.pack("<BBHBBBBHHHBBBB", 18, 1, ident["bcd_usb"], 0, 0, 0,
                       9 if ident is READY else 64, ident["vid"], ident["pid"], 0x0100, 1, 2, 0, 1)


def config_descriptor(ident, transfer_size):
    if ident is BOOTLOADER:
        interface = struct.pack("<BBBBBBBBB", 9, 4, 0, 0, 0, 0xFE, 0x01, 0x02, 0)
        functional = struct.pack("<BBBHHH", 9, 0x21, 0x0B, 255, transfer_size, 0x0110)
        body = interface + functional
    else:
        interface = struct.pack("<BBBBBBBBB", 9, 4, 0, 0, 4, 0xFF, 0xFF, 0xFF, 0)
        eps = b"".join(struct.pack("<BBBBHB", 7, 5, ep, attr, size, 0)
                       for ep, attr, size in ((0x01, 2, 1024), (0x81, 2, 1024), (0x82, 2, 1024), (0x83, 3, 64)))
        body = interface + eps
    header = struct.pack("<BBHBBBBB", 9, 2, 9 + len(body), 1, 1, 0, 0x80, 250)
    return header + body


ROOT_PORTS = 8  # ports per root hub in the testbed
UEVENT_ATTEMPTS = 3  # a uevent lost to umockdev's sender race is sent again
UEVENT_CHILD_SECONDS = 2.0  # a forked sender that takes longer has hung
UEVENT_LOST = "coral_emulator: uevent lost"  # the harness repeats such a run


def controller_partner(bus):
    """The other root hub of the same xHCI controller: 1<->2, 3<->4."""
    return bus + 1 if bus % 2 else bus - 1


class Emulator:
    def __init__(self, opts):
        self.opts = opts
        self.tb = UMockdev.Testbed.new()
        self.hubs = {}
        self.peers = {}  # "1-5" -> "2-3", both ways
        self.requests = []
        self.received = bytearray()
        self.flashed = b""
        self.events = []
        self.bus_events = []
        self.devices = {}  # name -> dict(state)
        self.pending = []  # URBs to reap
        self.handlers = {}
        self.next_devnum = opts.first_devnum
        self.reenumerating = 0
        self.command_running = False
        self.handler_ms = 0.0
        self.t0 = time.monotonic()

    def uevent(self, syspath, action):
        """Send a uevent. While the command runs, its libusb opens and closes
        udev monitors all the time, and umockdev aborts the sender when a
        listener's socket vanishes between finding and connecting to it: so
        send from a short-lived child, whose abort costs only that attempt.
        A child forked from this multi-threaded process can also hang (a lock
        another thread held at the fork): it gets UEVENT_CHILD_SECONDS, then
        is killed. A lost event is sent again, UEVENT_ATTEMPTS times in all;
        if every attempt is lost the run is marked for the harness to repeat
        (UEVENT_LOST on stderr)."""
        if not self.command_running:
            self.tb.uevent(syspath, action)
            return
        for attempt in range(1, UEVENT_ATTEMPTS + 1):
            if self.uevent_from_child(syspath, action):
                return
            self.log("uevent %s lost (attempt %d)" % (action, attempt))
        sys.stderr.write("%s: %s %s\n" % (UEVENT_LOST, action, syspath))
        sys.stderr.flush()

    def uevent_from_child(self, syspath, action):
        """One attempt from a forked child; True when it completed."""
        pid = os.fork()
        if pid == 0:
            try:
                self.tb.uevent(syspath, action)
            finally:
                os._exit(0)
        deadline = time.monotonic() + UEVENT_CHILD_SECONDS
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status == 0
            if time.monotonic() >= deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return False
            time.sleep(0.005)

    def log(self, what):
        self.events.append({"t_ms": round((time.monotonic() - self.t0) * 1000, 1),
                            "unix_ms": int(time.time() * 1000), "event": what})

    def drop(self, coral):
        """A brownout: the Coral leaves the bus and comes back, --drop-gap-ms
        later, as a fresh boot loader at its boot-loader port (its firmware
        is lost), whatever identity it had."""
        dev = next((d for d in self.devices.values() if d["coral"] is coral), None)
        if dev is not None:
            self.unplug(dev)

        def back():
            self.plug(coral["boot"], BOOTLOADER, faults=False, coral=coral)
            return False
        GLib.timeout_add(self.opts.drop_gap_ms, back)
        return False

    def link_drop(self, coral):
        """A link drop or xHCI reset without power loss: the Coral leaves the
        bus and is back --link-drop-gap-ms later as itself (its firmware
        survives: same identity, same port), under a new device number.
        udev reports the remove and the add (xapi-usb.md, "A drop that XAPI
        does not see")."""
        dev = next((d for d in self.devices.values() if d["coral"] is coral), None)
        if dev is None:
            return False
        path, ident = dev["path"], dev["ident"]
        self.unplug(dev)

        def back():
            self.plug(path, ident, faults=False, coral=coral)
            return False
        GLib.timeout_add(self.opts.link_drop_gap_ms, back)
        return False

    # -- devices ---------------------------------------------------------------
    def hub(self, bus):
        if bus not in self.hubs:
            hub = self.tb.add_device(
                "usb", "usb%d" % bus, None,
                ["busnum", "%d\n" % bus, "devnum", "1\n", "speed", "5000\n", "bConfigurationValue", "1\n"],
                ["SUBSYSTEM", "usb", "DEVTYPE", "usb_device", "BUSNUM", "%03d" % bus, "DEVNUM", "001"])
            hub_device = struct.pack("<BBHBBBBHHHBBBB", 18, 1, 0x0300, 9, 0, 3, 9, 0x1D6B, 3, 0x0600, 3, 2, 1, 1)
            hub_config = struct.pack("<BBHBBBBB", 9, 2, 25, 1, 1, 0, 0xE0, 0) + \
                struct.pack("<BBBBBBBBB", 9, 4, 0, 0, 1, 9, 0, 0, 0) + struct.pack("<BBBBHB", 7, 5, 0x81, 3, 4, 12)
            self.tb.set_attribute_binary(hub, "descriptors", hub_device + hub_config)
            # Its usbfs node exists as on a real host (a static libusb looks for /dev/bus/usb).
            node_file = "%s/dev/bus/usb/%03d/001" % (self.tb.get_root_dir(), bus)
            os.makedirs(os.path.dirname(node_file), exist_ok=True)
            open(node_file, "w").close()
            self.hubs[bus] = hub
            for port in range(1, ROOT_PORTS + 1):
                os.makedirs(self.port_dir(bus, port), exist_ok=True)
        return self.hubs[bus]

    def port_dir(self, bus, port):
        return "%s%s/%d-0:1.0/usb%d-port%d" % (self.tb.get_root_dir(), self.hubs[bus], bus, bus, port)

    def link_peers(self):
        """Every root port's `peer` symlink: the same number on the
        controller's other hub unless --peer says otherwise."""
        overrides = {}
        for pair in self.opts.peer:
            a, b = pair.split("=")
            overrides[a], overrides[b] = b, a
        for bus in sorted(self.hubs):
            other = controller_partner(bus)
            if other not in self.hubs:
                continue
            for port in range(1, ROOT_PORTS + 1):
                here = "%d-%d" % (bus, port)
                peer = overrides.get(here)
                if peer is None:
                    peer = "%d-%d" % (other, port)
                    if peer in overrides:  # that port's peer is another one
                        continue
                pbus, pport = (int(x) for x in peer.split("-"))
                link = os.path.join(self.port_dir(bus, port), "peer")
                target = "../../../usb%d/%d-0:1.0/usb%d-port%d" % (pbus, pbus, pbus, pport)
                if os.path.lexists(link):
                    os.remove(link)
                os.symlink(target, link)
                self.peers[here] = peer

    def plug(self, path, ident, faults=True, coral=None):
        bus = int(path.split("-")[0])
        devnum = self.next_devnum
        self.next_devnum += 1
        node = "/dev/bus/usb/%03d/%03d" % (bus, devnum)
        descriptors = device_descriptor(ident) + config_descriptor(ident, self.opts.transfer_size)
        if coral is None:  # a new physical Coral: where its two identities appear
            coral = {"boot": path, "ready": self.opts.ready_path, "flashed": b""}
        start = self.opts.start_state if faults and ident is BOOTLOADER else IDLE
        dev = {"path": path, "ident": ident, "devnum": devnum, "node": node, "syspath": None,
               "gone": False, "state": start, "status": 0, "next_block": 0, "manifested": False,
               "upload_block": 0, "detach": False, "faults": faults, "coral": coral,
               "received": bytearray(), "uploads": 0, "until": 0.0,
               "busy_left": self.opts.busy_polls if start == DNLOAD_SYNC and faults else 0,
               "manifest_left": self.opts.manifest_polls if start == MANIFEST_SYNC and faults else 0}
        # The node file and its ioctl handler exist before the device is added.
        node_file = self.tb.get_root_dir() + node
        os.makedirs(os.path.dirname(node_file), exist_ok=True)
        open(node_file, "w").close()
        dev["node_file"] = node_file
        handler = UMockdev.IoctlBase()
        handler.connect("handle-ioctl", self.on_ioctl, dev)
        self.tb.attach_ioctl(node, handler)
        self.handlers[node] = handler
        syspath = self.tb.add_device(
            "usb", path, self.hub(bus),
            ["busnum", "%d\n" % bus, "devnum", "%d\n" % devnum, "speed", ident["speed"] + "\n",
             "dev", "189:%d\n" % ((bus - 1) * 128 + devnum - 1),
             "bConfigurationValue", "1\n", "manufacturer", ident["vendor"] + "\n", "product", "\n",
             "idVendor", "%04x\n" % ident["vid"], "idProduct", "%04x\n" % ident["pid"]],
            ["SUBSYSTEM", "usb", "DEVTYPE", "usb_device", "BUSNUM", "%03d" % bus,
             "DEVNUM", "%03d" % devnum, "DEVNAME", node, "PRODUCT",
             "%x/%x/100" % (ident["vid"], ident["pid"])])
        self.tb.set_attribute_binary(syspath, "descriptors", descriptors)
        dev["syspath"] = syspath
        self.devices[path] = dev
        self.uevent(syspath, "add")
        self.log("add %s %04x:%04x devnum %d" % (path, ident["vid"], ident["pid"], devnum))
        self.write_bus()
        return dev

    def unplug(self, dev):
        dev["gone"] = True
        self.uevent(dev["syspath"], "remove")
        self.tb.remove_device(dev["syspath"])
        self.tb.detach_ioctl(dev["node"])
        try:
            os.remove(dev["node_file"])
        except OSError:
            pass
        self.devices.pop(dev["path"], None)
        self.log("remove %s" % dev["path"])
        self.write_bus()

    def write_bus(self):
        """The bus file the fake xe reads: every change so far, each with its
        time, as udev reported them (add and remove events), so XAPI's scans
        can be replayed in order even when nobody called xe in between."""
        if not self.opts.bus_file:
            return
        items = []
        for dev in sorted(self.devices.values(), key=lambda d: d["path"]):
            ident = dev["ident"]
            items.append({"path": dev["path"], "vendor_id": "%04x" % ident["vid"],
                          "product_id": "%04x" % ident["pid"], "vendor_desc": ident["vendor"],
                          "product_desc": "", "serial": "", "version": ident["version"],
                          "speed": ident["xapi_speed"], "interface_classes": [ident["class"]]})
        event = {"unix_ms": int(time.time() * 1000), "devices": items}
        if self.command_running:
            self.bus_events.append(event)
        else:  # setting up: the bus as XAPI's start-up scan saw it
            self.bus_events = [event]
        tmp = self.opts.bus_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"events": self.bus_events}, f)
        os.replace(tmp, self.opts.bus_file)

    def reenumerate(self, dev, ident, path):
        self.unplug(dev)
        if self.opts.no_reenumerate and ident is READY:
            return

        self.reenumerating += 1

        def back():
            self.plug(path, ident, faults=False, coral=dev["coral"])
            self.reenumerating -= 1
            return False
        GLib.timeout_add(self.opts.reenumerate_ms, back)

    # -- ioctls ----------------------------------------------------------------
    def on_ioctl(self, handler, client, dev):
        started = time.monotonic()
        try:
            return self.ioctl(client, dev)
        except Exception as exc:  # never let an exception reach umockdev
            sys.stderr.write("coral_emulator: ioctl handler error: %r\n" % (exc,))
            client.complete(-1, errno.EIO)
            return True
        finally:
            self.handler_ms += (time.monotonic() - started) * 1000

    def ioctl(self, client, dev):
        req = client.get_request()
        if dev["gone"]:
            client.complete(-1, errno.ENODEV)
            return True
        if req == SUBMITURB:
            return self.submit(client, dev)
        if req in (REAPURB, REAPURBNDELAY):
            if not self.pending:
                client.complete(-1, errno.EAGAIN)
                return True
            urb = self.pending.pop(0)
            client.get_arg().resolve(0, 8).set_ptr(0, urb)
            client.complete(0, 0)
            return True
        if req == GET_CAPABILITIES:
            client.get_arg().resolve(0, 4).update(0, list(struct.pack("<I", 0)))
            client.complete(0, 0)
            return True
        if req == GET_SPEED:
            client.complete(5 if dev["ident"] is READY else 3, 0)
            return True
        if req in (CLAIMINTERFACE, RELEASEINTERFACE, SETINTERFACE, SETCONFIGURATION, CLEAR_HALT,
                   DISCONNECT_CLAIM, DISCARDURB):
            client.complete(0, 0)
            return True
        if req in (GETDRIVER, IOCTL):
            client.complete(-1, errno.ENODATA)
            return True
        if req == CONNECTINFO:
            client.get_arg().resolve(0, 8).update(0, list(struct.pack("<IB3x", dev["devnum"], 0)))
            client.complete(0, 0)
            return True
        if req == RESET:
            return self.reset(client, dev)
        sys.stderr.write("coral_emulator: unhandled ioctl %#x\n" % req)
        client.complete(-1, errno.ENOTTY)
        return True

    def submit(self, client, dev):
        # The ioctl argument is the pointer to the client's struct usbdevfs_urb.
        urb = client.get_arg().resolve(0, 56)
        raw = bytes(urb.retrieve())
        urb_type, endpoint = raw[0], raw[1]
        length = struct.unpack_from("<i", raw, 24)[0]
        if urb_type != 2 or endpoint != 0:  # only control transfers
            client.complete(-1, errno.EINVAL)
            return True
        buf = urb.resolve(16, length)
        data_in = bytes(buf.retrieve())
        setup = data_in[:8]
        rtype, request, value, index, wlength = struct.unpack("<BBHHH", setup)
        data_out = data_in[8:8 + wlength] if rtype & 0x80 == 0 else b""
        if not self.requests:
            self.log("first request")
        self.requests.append({"type": rtype, "request": request, "value": value, "index": index,
                              "length": wlength, "path": dev["path"]})
        result = self.control(dev, rtype, request, value, index, wlength, data_out)
        if result == "vanish":
            client.complete(-1, errno.ENODEV)
            self.unplug(dev)
            return True
        if result is None:  # stall
            urb.update(4, list(struct.pack("<i", -errno.EPIPE)))
            urb.update(28, list(struct.pack("<i", 0)))
        else:
            if rtype & 0x80:
                buf.update(8, list(result))
                actual = len(result)
            else:
                actual = len(data_out)
            urb.update(4, list(struct.pack("<i", 0)))
            urb.update(28, list(struct.pack("<i", actual)))
        self.pending.append(urb)
        client.complete(0, 0)
        return True

    def stall(self, dev):
        dev["state"] = ERROR
        dev["status"] = ERR_STALLEDPKT
        return None

    def control(self, dev, rtype, request, value, index, wlength, data):
        # Standard requests: GET_DESCRIPTOR / GET_STATUS on the device are answered.
        if rtype == 0x80 and request == 6:
            kind = value >> 8
            if kind == 1:
                return device_descriptor(dev["ident"])[:wlength]
            if kind == 2:
                return config_descriptor(dev["ident"], self.opts.transfer_size)[:wlength]
            return None
        if dev["ident"] is READY:
            if rtype == 0x21 and request == DETACH and index == 0 and wlength == 0:
                dev["detach"] = True
                return b""
            return None
        if index != 0 or rtype not in (0x21, 0xA1):
            return self.stall(dev)
        # dfuDNBUSY / dfuMANIFEST accept nothing until bwPollTimeout has passed.
        if dev["state"] in (DNBUSY, MANIFEST):
            if time.monotonic() < dev["until"]:
                return self.stall(dev)
            dev["state"] = DNLOAD_SYNC if dev["state"] == DNBUSY else MANIFEST_SYNC
        state = dev["state"]
        if rtype == 0xA1 and request == GETSTATUS and wlength == 6:
            poll = 0
            reported = 0xFFFFFF if self.opts.garbled_poll_timeout else self.opts.poll_ms
            if state == DNLOAD_SYNC:
                if dev["busy_left"] > 0:
                    dev["busy_left"] -= 1
                    dev["state"] = DNBUSY
                    dev["until"] = time.monotonic() + self.opts.poll_ms / 1000
                    poll = reported
                else:
                    dev["state"] = DNLOAD_IDLE
            elif state == MANIFEST_SYNC:
                if dev["manifest_left"] > 0:
                    dev["manifest_left"] -= 1
                    dev["state"] = MANIFEST
                    dev["until"] = time.monotonic() + self.opts.poll_ms / 1000
                    poll = reported
                else:
                    dev["state"] = IDLE
                    dev["manifested"] = True
                    dev["next_block"] = 0
                    dev["coral"]["flashed"] = bytes(dev["received"])
                    self.flashed = bytes(dev["received"])
            return struct.pack("<B", dev["status"]) + struct.pack("<I", poll)[:3] + bytes([dev["state"], 0])
        if rtype == 0xA1 and request == GETSTATE and wlength == 1:
            return bytes([state])
        if rtype == 0x21 and request == DNLOAD and state in (IDLE, DNLOAD_IDLE):
            if wlength > self.opts.transfer_size or value != dev["next_block"]:
                return self.stall(dev)
            if wlength == 0:
                if state != DNLOAD_IDLE:
                    return self.stall(dev)
                dev["state"] = MANIFEST_SYNC
                return b""
            if dev["faults"] and self.opts.vanish_at_block == value:
                self.log("vanish at block %d" % value)
                if self.opts.replug_ms is not None:
                    GLib.timeout_add(self.opts.replug_ms, lambda: self.plug(dev["path"], BOOTLOADER, faults=False) and False)
                return "vanish"
            if dev["faults"] and self.opts.stall_at_block == value:
                dev["faults"] = False  # a one-off: the rerun goes through
                return self.stall(dev)
            if state == IDLE:
                dev["received"] = bytearray()
            dev["received"] += data
            self.received = dev["received"]
            dev["next_block"] = (value + 1) & 0xFFFF
            dev["state"] = DNLOAD_SYNC
            dev["busy_left"] = self.opts.busy_polls if dev["faults"] else 0
            return b""
        if rtype == 0xA1 and request == UPLOAD and wlength <= self.opts.transfer_size:
            starting = state == IDLE and value == 0
            continuing = state == UPLOAD_IDLE and value == dev["upload_block"]
            if not (starting or continuing):
                return self.stall(dev)
            memory = bytearray(dev["coral"]["flashed"])
            if dev["faults"] and self.opts.corrupt_readback and memory:
                memory[len(memory) // 2] ^= 0xFF
            dev["uploads"] += 1
            endless = dev["faults"] and self.opts.endless_upload
            if endless and dev["uploads"] > 20000:  # a host that never stops: fail, do not hang
                return self.stall(dev)
            start = min(value * wlength, len(memory))
            chunk = bytes(memory[start:start + wlength])
            if endless:  # full blocks for ever: the image, then filler
                chunk += b"\xa5" * (wlength - len(chunk))
            if len(chunk) < wlength:
                dev["state"] = IDLE
                dev["upload_block"] = 0
            else:
                dev["state"] = UPLOAD_IDLE
                dev["upload_block"] = (value + 1) & 0xFFFF
            return chunk
        if rtype == 0x21 and request == CLRSTATUS and state == ERROR:
            dev.update(state=IDLE, status=0, next_block=0)
            return b""
        # DFU 1.1: ABORT only in dfuIDLE, dfuDNLOAD-IDLE and dfuUPLOAD-IDLE.
        if rtype == 0x21 and request == ABORT and state in (IDLE, DNLOAD_IDLE, UPLOAD_IDLE):
            dev.update(state=IDLE, status=0, next_block=0)
            return b""
        return self.stall(dev)

    def reset(self, client, dev):
        self.log("reset %s" % dev["path"])
        if dev["ident"] is BOOTLOADER and dev["manifested"]:
            # Linux fails the reset with ENODEV when the descriptors change;
            # --reset-errno models a reset that fails otherwise (EIO, EPIPE…)
            # while the device still leaves the bus and comes back.
            code = getattr(errno, self.opts.reset_errno) if self.opts.reset_errno else errno.ENODEV
            client.complete(-1, code)
            if self.opts.reenumerate_as == "bootloader":
                self.reenumerate(dev, BOOTLOADER, dev["coral"]["boot"])
            else:
                self.reenumerate(dev, READY, dev["coral"]["ready"])
        elif dev["ident"] is READY and dev["detach"]:
            client.complete(-1, errno.ENODEV)
            self.reenumerate(dev, BOOTLOADER, dev["coral"]["boot"])
        else:
            dev.update(state=IDLE, status=0, next_block=0)
            client.complete(0, 0)
        return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", choices=["uninitialized", "ready", "none"], default="uninitialized")
    parser.add_argument("--path", default="1-4", help="boot loader port path")
    parser.add_argument("--ready-path", default="2-4", help="port path after re-enumeration")
    parser.add_argument("--transfer-size", type=int, default=256)
    parser.add_argument("--reenumerate-ms", type=int, default=100)
    parser.add_argument("--vanish-at-block", type=int)
    parser.add_argument("--replug-ms", type=int, help="after vanishing, come back as a fresh boot loader")
    parser.add_argument("--stall-at-block", type=int, help="stall this block once")
    parser.add_argument("--no-reenumerate", action="store_true")
    parser.add_argument("--corrupt-readback", action="store_true")
    parser.add_argument("--second-coral", metavar="BOOT[:READY]",
                        help="another uninitialized Coral (boot loader path, ready path)")
    parser.add_argument("--other-ready", metavar="PATH",
                        help="an unrelated, already ready Coral, e.g. 4-4 on a second controller")
    parser.add_argument("--peer", action="append", default=[], metavar="A=B",
                        help="root ports A and B are peers (default: same number on the other hub)")
    parser.add_argument("--reset-errno", metavar="NAME", help="the reset fails with this errno (EIO, EPIPE…)")
    parser.add_argument("--reenumerate-as", choices=["ready", "bootloader"], default="ready")
    parser.add_argument("--busy-polls", type=int, default=0, help="dfuDNBUSY answers per block")
    parser.add_argument("--manifest-polls", type=int, default=0, help="dfuMANIFEST answers")
    parser.add_argument("--poll-ms", type=int, default=0, help="real busy time, reported as bwPollTimeout")
    parser.add_argument("--garbled-poll-timeout", action="store_true", help="report bwPollTimeout 0xFFFFFF")
    parser.add_argument("--start-state", type=int, default=IDLE, help="DFU state an interrupted run left")
    parser.add_argument("--endless-upload", action="store_true", help="UPLOAD never sends a short block")
    parser.add_argument("--appear-after-ms", type=int, help="the Coral enumerates this long after the start")
    parser.add_argument("--second-state", choices=["uninitialized", "ready"], default="uninitialized",
                        help="the --second-coral's identity at the start")
    parser.add_argument("--drop-at-ms", type=int, action="append", default=[], metavar="MS",
                        help="the (first) Coral drops off the bus MS after the start and comes back as a boot loader")
    parser.add_argument("--drop-gap-ms", type=int, default=200, help="how long a dropped Coral stays off the bus")
    parser.add_argument("--link-drop-at-ms", type=int, action="append", default=[], metavar="MS",
                        help="the (first) Coral drops off the bus MS after the start and comes back as itself")
    parser.add_argument("--link-drop-gap-ms", type=int, default=50, help="how long a link drop lasts")
    parser.add_argument("--first-devnum", type=int, default=5,
                        help="the first device number handed out (a later run of the same host)")
    parser.add_argument("--sigterm-at-ms", type=int, action="append", default=[], metavar="MS",
                        help="send SIGTERM to the command MS after the start")
    parser.add_argument("--bus-file", help="JSON list of present devices, for the fake xe")
    parser.add_argument("--result", help="write the JSON result here")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    command = opts.command[1:] if opts.command[:1] == ["--"] else opts.command
    if not command:
        parser.error("no command to run")

    emu = Emulator(opts)
    for bus in (1, 2):  # an xHCI controller: a USB 2 and a SuperSpeed root hub
        emu.hub(bus)
    if opts.other_ready:  # a second controller
        bus = int(opts.other_ready.split("-")[0])
        emu.hub(bus)
        emu.hub(controller_partner(bus))
    emu.link_peers()
    coral = {"boot": opts.path, "ready": opts.ready_path, "flashed": b""}

    def first_plug():
        if opts.state == "uninitialized":
            emu.plug(opts.path, BOOTLOADER, coral=coral)
        elif opts.state == "ready":
            emu.plug(opts.ready_path, READY, coral=coral)
        return False
    if opts.appear_after_ms is None:
        first_plug()
    if opts.state == "none" or opts.appear_after_ms is not None:
        emu.write_bus()
    if opts.second_coral:
        boot, _, ready = opts.second_coral.partition(":")
        second = {"boot": boot, "ready": ready or emu.peers.get(boot, boot), "flashed": b""}
        if opts.second_state == "ready":
            emu.plug(second["ready"], READY, faults=False, coral=second)
        else:
            emu.plug(boot, BOOTLOADER, faults=False, coral=second)
    if opts.other_ready:
        emu.plug(opts.other_ready, READY, faults=False,
                 coral={"boot": emu.peers.get(opts.other_ready, opts.other_ready),
                        "ready": opts.other_ready, "flashed": b""})

    loop = GLib.MainLoop()
    status = {"code": None}
    # The testbed sets UMOCKDEV_DIR in the C environment (os.environ is a snapshot).
    envp = [e for e in GLib.get_environ() if not e.startswith("UMOCKDEV_DIR=")]
    envp.append("UMOCKDEV_DIR=" + emu.tb.get_root_dir())
    emu.log("spawn")
    emu.command_running = True
    if opts.appear_after_ms is not None:
        GLib.timeout_add(opts.appear_after_ms, first_plug)
    pid, _, _, _ = GLib.spawn_async(command, envp=envp,
                                    flags=GLib.SpawnFlags.SEARCH_PATH | GLib.SpawnFlags.DO_NOT_REAP_CHILD
                                    | GLib.SpawnFlags.CHILD_INHERITS_STDIN)

    def exited(pid_, wait_status):
        emu.log("exit")
        emu.command_running = False
        status["code"] = os.waitstatus_to_exitcode(wait_status)
        # Let a re-enumeration already under way complete (e.g. after dfu-util -R).
        GLib.timeout_add(opts.reenumerate_ms + 50 if emu.reenumerating else 0, lambda: loop.quit() or False)
    GLib.child_watch_add(GLib.PRIORITY_DEFAULT, pid, exited)
    for at in opts.drop_at_ms:
        GLib.timeout_add(at, emu.drop, coral)
    for at in opts.link_drop_at_ms:
        GLib.timeout_add(at, emu.link_drop, coral)

    def sigterm():
        if status["code"] is None:
            emu.log("sigterm")
            os.kill(pid, signal.SIGTERM)
        return False
    for at in opts.sigterm_at_ms:
        GLib.timeout_add(at, sigterm)
    loop.run()

    if opts.result:
        present = [{"path": d["path"], "id": "%04x:%04x" % (d["ident"]["vid"], d["ident"]["pid"]),
                    "devnum": d["devnum"], "flashed": d["coral"]["flashed"].hex()}
                   for d in emu.devices.values()]
        with open(opts.result, "w") as f:
            json.dump({"exit": status["code"], "requests": emu.requests, "received": emu.flashed.hex(),
                       "received_any": bytes(emu.received).hex(), "devices": present,
                       "events": emu.events, "handler_ms": round(emu.handler_ms, 1)}, f, indent=1)
    root = emu.tb.get_root_dir()
    emu.tb = None  # the testbed removes its directory when finalized
    gc.collect()
    shutil.rmtree(root, ignore_errors=True)
    code = status["code"]
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if code is not None and code >= 0 else 128)


if __name__ == "__main__":
    main()
