#!/usr/bin/env python3
"""Boot tests of the m365-sensor appliance image (tests/image; `make test-image`, `make test-image-arm`).

Each scenario boots the REAL image (image/out/<arch>/m365-sensor-<target>.raw, a sparse copy per test) under
QEMU with `-accel tcg`, UEFI firmware (OVMF / AAVMF), a virtio disk and user-mode networking with
`restrict=on` (the guest reaches nothing outside QEMU). Every boot is bounded (300 s by default). What the
guest says comes from its serial console: m365-boot-report.service prints `key=value` lines between
M365-REPORT-BEGIN and M365-REPORT-END; m365-health prints `M365-HEALTH: ...`.

The agent's configuration arrives the way it does in production: `provision/seed` writes it into the data
partition and the first boot applies it. The backend and Microsoft endpoints are https://127.0.0.1:9 in the
GUEST (nothing listens there): the agent must run, report its collectors `api_unreachable`, and keep
running; no packet leaves QEMU.

Scenarios (--only a,b,...): helper (no image: the root update helper on the host against a hostile agent
user, tests/image/helper_checks.py), flash, seed-boot, verity, bundle (host-side bundle checks: wrong key,
downgrade, the downgrade switch and floor, other target), update (a newer bundle installed, slot B boots and is marked good), rollback (a bundle whose
agent fails: slot B boots, the health check fails, slot A boots again). The last line is
`N passed, N failed`; the exit code is 1 when anything failed.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_TARGET = {"x86_64": "x86_64-vm", "aarch64": "aarch64-metal"}

RESULTS = []  # (name, ok, detail)
REPORT_ALL = {}  # id(report dict) -> every (key, value) of it, repeated keys included
FIGURES = []  # (name, value)


def check(name, ok, detail=""):
    RESULTS.append((name, bool(ok), detail))
    print(f"{'PASS' if ok else 'FAIL'}: {name}{(' - ' + detail) if detail else ''}", flush=True)
    return ok


def guest_journal(disk, workdir):
    """The appliance's own units' journal, read from the data partition of a stopped guest's disk
    (debugfs and journalctl on the host, nothing mounted): what failed and why, when the console only
    says that something did."""
    off, _ = partition(disk, "data")
    dest = tempfile.mkdtemp(prefix="journal-", dir=workdir)
    subprocess.run(["debugfs", "-R", f"rdump /log/journal {dest}", f"{disk}?offset={off}"],
                   capture_output=True, check=True)
    units = [a for u in ("m365-provision", "m365-enroll", "m365-sensor", "m365-health", "m365-update")
             for a in ("-u", f"{u}.service")]
    out = subprocess.run(["journalctl", "--no-pager", "-o", "short-monotonic", "-D",
                          os.path.join(dest, "journal"), *units], capture_output=True, text=True)
    shutil.rmtree(dest, ignore_errors=True)
    return (out.stdout + out.stderr).strip()


def explain_failure(workdir):
    """Prints what a failed scenario left behind: the guest's journal of each disk and the receiver's log."""
    for name in sorted(os.listdir(workdir)):
        path = os.path.join(workdir, name)
        try:
            if name.endswith(".raw") and "data" in sh("sfdisk", "-l", "-o", "Name", path):
                lines = guest_journal(path, workdir).splitlines()
                print(f"-- the guest journal of {name}: the enrolment's first lines (m365-enroll):")
                print("\n".join([l for l in lines if "m365-enroll" in l or "enroll:" in l][:40]))
                print(f"-- the guest journal of {name} (m365 units, last 150 lines):")
                print("\n".join(lines[-150:]))
            elif name == "rx.log":
                print("-- the receiver's log (last 60 lines):")
                print("\n".join(open(path, errors="replace").read().splitlines()[-60:]))
        except (OSError, subprocess.CalledProcessError, ValueError) as e:
            print(f"-- {name}: could not be read ({e})")
    sys.stdout.flush()


def sh(*args, **kw):
    return subprocess.run(args, check=True, text=True, capture_output=True, **kw).stdout


def partition(img, label):
    """(offset, size) in bytes of the GPT partition named label."""
    out = sh("bash", "-c", f'source {REPO}/image/lib.sh; gpt_partition_offset "$1" "$2"', "_", img, label)
    off, size = out.split()
    return int(off), int(size)


class Boot:
    """One QEMU run; collects the serial console and stops when told or when QEMU exits."""

    def __init__(self, arch, disk, workdir, timeout, extra=(), reboots=False, nic_extra=""):
        self.arch, self.disk, self.timeout = arch, disk, timeout
        self.lines = []
        self.log = open(os.path.join(workdir, f"serial-{int(time.time() * 1000)}.log"), "wb")
        fw = os.path.join(workdir, "vars.fd")
        if arch == "x86_64":
            shutil.copy("/usr/share/OVMF/OVMF_VARS_4M.fd", fw)
            cmd = ["qemu-system-x86_64", "-machine", "q35", "-cpu", "max",
                   "-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                   "-drive", f"if=pflash,format=raw,file={fw}"]
        else:
            shutil.copy("/usr/share/AAVMF/AAVMF_VARS.fd", fw)
            cmd = ["qemu-system-aarch64", "-machine", "virt", "-cpu", "cortex-a72",
                   "-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/AAVMF/AAVMF_CODE.fd",
                   "-drive", f"if=pflash,format=raw,file={fw}"]
        cmd += ["-accel", "tcg", "-m", "1024", "-smp", "2", *([] if reboots else ["-no-reboot"]),
                "-display", "none", "-monitor", "none", "-serial", "stdio",
                "-drive", f"file={disk},if=virtio,format=raw,cache=unsafe",
                "-nic", "user,restrict=on,model=virtio-net-pci" + nic_extra, *extra]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        for chunk in iter(lambda: self.proc.stdout.read1(4096), b""):
            self.log.write(chunk)
            self.log.flush()
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                line = re.sub(r"\x1b\[[0-9;=?]*[A-Za-z]", "", raw.decode("utf-8", "replace")).strip("\r ")
                self.lines.append((time.monotonic() - self.started, line))
        self.done.set()

    def wait_for(self, pattern, timeout=None, after=0.0):
        """Seconds since start when a console line (later than `after`) matches pattern; None if QEMU
        exited or `timeout` seconds (from now) ran out."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + (timeout or self.timeout)
        seen = 0
        while time.monotonic() < deadline:
            while seen < len(self.lines):
                t, line = self.lines[seen]
                seen += 1
                if t > after and rx.search(line):
                    return t
            if self.done.is_set() and seen >= len(self.lines):
                return None
            time.sleep(0.2)
        return None

    def report(self, after=0.0):
        """The key=value lines of the last complete boot report (printed later than `after`)."""
        text = [l for t, l in self.lines if t > after]
        try:
            end = max(i for i, l in enumerate(text) if "M365-REPORT-END" in l)
            begin = max(i for i, l in enumerate(text[:end]) if "M365-REPORT-BEGIN" in l)
        except ValueError:
            return {}
        rep, pairs = {}, []
        for l in text[begin + 1:end]:
            if "=" in l:
                k, v = l.split("=", 1)
                rep.setdefault(k.strip(), v.strip())
                pairs.append((k.strip(), v.strip()))
        REPORT_ALL[id(rep)] = pairs
        return rep

    def exited(self, timeout):
        try:
            self.proc.wait(timeout=timeout)
            return time.monotonic() - self.started
        except subprocess.TimeoutExpired:
            return None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.done.wait(5)
        self.log.close()

    def tail(self, n=25):
        return "\n".join(l for _, l in self.lines[-n:])


def fresh_disk(src, workdir, name="disk.raw"):
    dst = os.path.join(workdir, name)
    sh("cp", "--sparse=always", src, dst)
    return dst


SENSOR_TOML = """\
# tests/image: every endpoint is the guest's own loopback, where nothing listens.
state_dir = "/var/lib/m365-sensor"

[backend]
url = "https://127.0.0.1:9"
token_file = "/etc/m365-sensor/backend.token"
retry_max_secs = 5

[spool]
max_bytes = 268435456

[[tenant]]
name = "contoso"
tenant_id = "00000000-0000-0000-0000-000000000001"
client_id = "00000000-0000-0000-0000-000000000002"
client_secret_file = "/etc/m365-sensor/contoso.secret"
login_url = "https://127.0.0.1:9"
api_url = "https://127.0.0.1:9"
"""


def seed(disk, workdir):
    files = {"sensor.toml": SENSOR_TOML, "backend.token": "test-backend-token\n",
             "contoso.secret": "test-client-secret\n", "enroll.token": "test-enrolment-token\n"}
    for name, text in files.items():
        with open(os.path.join(workdir, name), "w") as f:
            f.write(text)
    sh(f"{REPO}/provision/seed", disk, "--backend", "https://127.0.0.1:9",
       "--token-file", os.path.join(workdir, "enroll.token"),
       "--config", os.path.join(workdir, "sensor.toml"),
       "--secret", os.path.join(workdir, "backend.token"),
       "--secret", os.path.join(workdir, "contoso.secret"),
       "--ntp", "127.0.0.1", "--hostname", "sensor-under-test")


def assert_running(rep, prefix):
    check(f"{prefix}: the agent reached its running state (systemctl is-active)", rep.get("agent_active") == "active",
          rep.get("agent_active", "no report"))
    check(f"{prefix}: the agent runs as m365-sensor, not root", rep.get("agent_user") == "m365-sensor" and
          rep.get("agent_uid", "0").split(",")[0] not in ("", "0"), f"{rep.get('agent_user')} uid {rep.get('agent_uid')}")
    zero = "0000000000000000"
    check(f"{prefix}: the agent has no capabilities (effective, permitted, bounding)",
          rep.get("agent_cap_eff") == zero and rep.get("agent_cap_prm") == zero and rep.get("agent_cap_bnd") == zero,
          f"eff={rep.get('agent_cap_eff')} prm={rep.get('agent_cap_prm')} bnd={rep.get('agent_cap_bnd')}")
    check(f"{prefix}: NoNewPrivs is set on the agent", rep.get("agent_no_new_privs") == "1")
    root = rep.get("root_mount", "").split("|")
    check(f"{prefix}: / is erofs on /dev/mapper/root (dm-verity), read-only",
          len(root) == 3 and root[0] == "/dev/mapper/root" and root[1] == "erofs" and root[2].startswith("ro,"),
          rep.get("root_mount"))
    check(f"{prefix}: /var is the writable data partition", rep.get("var_mount", "").startswith("/dev/") and
          "|ext4|rw," in rep.get("var_mount", ""), rep.get("var_mount"))
    check(f"{prefix}: no listening TCP port (ss -ltn)", rep.get("listening_tcp") == "0",
          f"{rep.get('listening_tcp')} listening")
    udp = [v for k, v in REPORT_ALL.get(id(rep), []) if k == "listening_udp_socket"]
    # Client sockets only: the DHCP clients' (68, 546) and, while it queries, the NTP client's (an unconnected
    # socket on an ephemeral port, which ss lists like a listener). Inbound is dropped by nftables anyway.
    def client_socket(u):
        port = u.split("|")[0].rsplit(":", 1)[-1]
        return port in ("68", "546") or (u.endswith("|systemd-timesyn") and port.isdigit() and int(port) >= 32768)
    check(f"{prefix}: no listening UDP socket, only the DHCP and NTP clients'",
          all(client_socket(u) for u in udp), " ".join(udp) or "none")
    check(f"{prefix}: nftables input policy is drop", rep.get("nft_input_policy") == "drop")
    check(f"{prefix}: root account locked", rep.get("root_locked") == "L", rep.get("root_locked"))
    check(f"{prefix}: time sync active", rep.get("timesync") == "active")


# ---- scenarios -----------------------------------------------------------------------------------------

def scenario_seed_boot(a, raw, workdir):
    disk = fresh_disk(raw, workdir)
    seed(disk, workdir)
    check("seed: provision/seed wrote the seed into the data partition", True)
    # The disk is 1 GiB larger than the image, as a flashed SSD or a resized VM disk is: the data partition
    # must grow into it at the first boot (systemd-repart, then x-systemd.growfs).
    _, data_size = partition(disk, "data")
    os.truncate(disk, os.path.getsize(disk) + (1 << 30))
    b = Boot(a.arch, disk, workdir, a.timeout)
    try:
        t_report = b.wait_for(r"M365-REPORT-END")
        if not check("seed-boot: the image booted and printed its report within the bound", t_report is not None,
                     f"{a.timeout}s bound; last console lines:\n{b.tail()}" if t_report is None else f"{t_report:.1f}s"):
            return
        rep = b.report()
        print(f"  boot timeline (s since kernel start): {rep.get('timeline')}", flush=True)
        t_active = rep.get("agent_active_after_boot_secs")
        FIGURES.append(("boot to report (s, QEMU start to report line)", f"{t_report:.1f}"))
        if t_active:
            FIGURES.append(("kernel start to agent active (s, guest clock)", t_active))
        assert_running(rep, "seed-boot")
        states = rep.get("agent_states", "")
        check("seed-boot: the agent's collectors report api_unreachable (it runs and tries its endpoints)",
              "state:api_unreachable" in states, states)
        check("seed-boot: the seed's configuration was applied (sensor.toml root:m365-sensor 640)",
              rep.get("config") == "root:m365-sensor:640", rep.get("config"))
        check("seed-boot: the seed was consumed (deleted)", rep.get("seed_left") == "no")
        var_size = int(rep.get("var_size_bytes") or 0)
        check("seed-boot: /var grew into the disk's extra GiB at the first boot (systemd-repart + growfs)",
              var_size > data_size + (1 << 29), f"/var {var_size} bytes, partition in the image {data_size} bytes")
        check("seed-boot: the seed's NTP servers are in force", rep.get("ntp_servers") == "127.0.0.1", rep.get("ntp_servers"))
        check("seed-boot: the enrolment ran with the seeded token (backend unreachable: it failed and keeps the token)",
              rep.get("enroll", "").startswith(("failed/", "activating/")) and "token_left=yes" in rep.get("enroll", ""),
              rep.get("enroll"))
        check("seed-boot: the health check marked slot A good", b.wait_for(r"M365-HEALTH: good slot=A", 5) is not None or
              rep.get("health", "").startswith("active/success"), rep.get("health"))
    finally:
        b.stop()


def scenario_verity(a, raw, workdir):
    # Host side: any flipped byte of the root image is caught by the hash tree.
    root_off, root_size = partition(raw, "root-a")
    ver_off, _ = partition(raw, "verity-a")
    rh = re.search(r"^root_hash: ([0-9a-f]{64})", open(os.path.join(a.out, "manifest.txt")).read(), re.M).group(1)
    disk = fresh_disk(raw, workdir)
    slot = os.path.join(a.out, "slot", "root.erofs")
    size = os.path.getsize(slot)
    with open(disk, "r+b") as f:
        pos = root_off + size // 2
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0xFF]))
    # veritysetup verify on the extracted partitions (it takes no data offset inside one file).
    part = os.path.join(workdir, "root-a.img")
    sh("dd", f"if={disk}", f"of={part}", "bs=1M", f"skip={root_off // 1048576}", f"count={root_size // 1048576}",
       "status=none")
    hashp = os.path.join(workdir, "verity-a.img")
    sh("dd", f"if={disk}", f"of={hashp}", "bs=1M", f"skip={ver_off // 1048576}", "count=16", "status=none")
    v = subprocess.run(["veritysetup", "verify", part, hashp, rh], capture_output=True, text=True)
    check("verity: one byte flipped in the middle of root-a fails `veritysetup verify`", v.returncode != 0,
          (v.stderr or v.stdout).strip().splitlines()[-1] if (v.stderr or v.stdout).strip() else "")
    os.remove(part)
    os.remove(hashp)

    # Boot: flip a byte the boot must read (the erofs superblock, offset 1024), expect a fail-closed stop.
    disk = fresh_disk(raw, workdir)
    with open(disk, "r+b") as f:
        f.seek(root_off + 1024 + 8)
        byte = f.read(1)
        f.seek(root_off + 1024 + 8)
        f.write(bytes([byte[0] ^ 0x01]))
    b = Boot(a.arch, disk, workdir, a.timeout)
    try:
        t = b.exited(a.timeout)
        text = "\n".join(l for _, l in b.lines)
        check("verity: with one byte of root-a flipped the boot fails closed (QEMU stops: panic=-1, -no-reboot)",
              t is not None and "M365-REPORT-BEGIN" not in text,
              f"stopped after {t:.1f}s" if t is not None else f"still running after {a.timeout}s:\n{b.tail()}")
        if t is not None:
            FIGURES.append(("verity fail-closed: QEMU start to stop (s)", f"{t:.1f}"))
        hits = [l for _, l in b.lines if re.search(r"verity.*(corrupt|fail|mismatch|refused)|Kernel panic", l)]
        check("verity: the console names the verity failure", bool(hits), " / ".join(hits[:3]) or b.tail(8))
    finally:
        b.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="x86_64", choices=["x86_64", "aarch64"])
    ap.add_argument("--target", help="default: x86_64-vm or aarch64-metal")
    ap.add_argument("--out", help="the image's output directory (default image/out/<arch>)")
    ap.add_argument("--timeout", type=int, default=300, help="bound of every boot, seconds (default 300)")
    ap.add_argument("--only", default="helper,flash,seed-boot,verity,bundle,update,rollback",
                    help="comma-separated scenarios: helper, flash, seed-boot, verity, bundle, update, rollback, "
                         "powerloss")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    a.target = a.target or DEFAULT_TARGET[a.arch]
    a.out = os.path.abspath(a.out or os.path.join(REPO, "image", "out", a.arch))
    raw = os.path.join(a.out, f"m365-sensor-{a.target}.raw")
    if not os.path.exists(raw) and set(s for s in a.only.split(",") if s) - {"helper"}:
        print(f"{raw} missing: run `make image ARCH={a.arch}` first", file=sys.stderr)
        return 2
    scenarios = {"seed-boot": scenario_seed_boot, "verity": scenario_verity}
    scenarios.update(EXTRA_SCENARIOS)
    workroot = tempfile.mkdtemp(prefix="m365-image-test-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    try:
        for name in [s for s in a.only.split(",") if s]:
            if name not in scenarios:
                print(f"unknown scenario {name}", file=sys.stderr)
                return 2
            workdir = os.path.join(workroot, name)
            os.makedirs(workdir)
            t = time.monotonic()
            print(f"== {name}", flush=True)
            failures = sum(1 for _, ok, _ in RESULTS if not ok)
            try:
                scenarios[name](a, raw, workdir)
            except Exception as e:  # a broken scenario is a failure, not a crash of the suite
                check(f"{name}: ran to the end", False, f"{type(e).__name__}: {e}")
            if sum(1 for _, ok, _ in RESULTS if not ok) > failures:
                explain_failure(workdir)
            print(f"== {name}: {time.monotonic() - t:.1f}s", flush=True)
            if not a.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        if not a.keep:
            shutil.rmtree(workroot, ignore_errors=True)
        else:
            print(f"work directory kept: {workroot}")
    if FIGURES:
        print("figures:")
        for k, v in FIGURES:
            print(f"  {k}: {v}")
    passed = sum(1 for _, ok, _ in RESULTS if ok)
    failed = len(RESULTS) - passed
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


# ---- updates (RAUC) ------------------------------------------------------------------------------------

VARIANTS = {}


def variant(a, name, env):
    """Builds (once per run) a newer image of the same target into image/out/<arch>-test-<name> and its
    signed bundle; returns (outdir, bundle path, image version)."""
    if name in VARIANTS:
        return VARIANTS[name]
    out = os.path.join(REPO, "image", "out", f"{a.arch}-test-{name}")
    t = time.monotonic()
    e = dict(os.environ, IMAGE_OUTPUTS="none", **env)
    subprocess.run([f"{REPO}/image/build.sh", a.target, out], check=True, env=e,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    bundle = subprocess.run([f"{REPO}/image/bundle.sh", out], check=True, env=e, text=True,
                            capture_output=True).stdout.strip().splitlines()[-1]
    version = re.search(r"^IMAGE_VERSION=(.*)$", open(os.path.join(out, "slot", "slot.env")).read(), re.M).group(1)
    FIGURES.append((f"test variant '{name}': build + bundle (s, cached root tree)", f"{time.monotonic() - t:.1f}"))
    VARIANTS[name] = (out, bundle, version)
    return VARIANTS[name]


def debugfs_put(disk, files):
    """Writes files into the data partition of disk: [(source, path under /var, uid, mode)]."""
    off, _ = partition(disk, "data")
    cmds = []
    for src, path, uid, mode in files:
        rel = path[len("/var"):]
        if src is None:
            cmds += [f"mkdir {rel}"]
            kind = "040"
        else:
            cmds += [f"write {src} {rel}"]
            kind = "0100"
        cmds += [f"sif {rel} mode {kind}{mode}", f"sif {rel} uid {uid}", f"sif {rel} gid {uid}"]
    script = os.path.join(os.path.dirname(disk), "debugfs.cmds")
    with open(script, "w") as f:
        f.write("\n".join(cmds) + "\n")
    out = subprocess.run(["debugfs", "-w", "-f", script, f"{disk}?offset={off}"], capture_output=True, text=True)
    if out.returncode != 0 or re.search(r"(?im)^\S.*: (error|could not|not found)", out.stderr):
        raise RuntimeError(f"debugfs: {out.stderr.strip()}")


def request_update(disk, workdir, bundle):
    """What the agent does for `install_update`: the bundle in <state>/update/, then the request file."""
    req = os.path.join(workdir, "update-requested")
    with open(req, "w") as f:
        f.write("bundle=/var/lib/m365-sensor/update/test.raucb\nid=test-update-1\nreboot=yes\n")
    debugfs_put(disk, [(None, "/var/lib/m365-sensor/update", 990, "700"),
                       (bundle, "/var/lib/m365-sensor/update/test.raucb", 990, "600"),
                       (req, "/var/lib/m365-sensor/update-requested", 990, "600")])


def scenario_bundle(a, raw, workdir):
    """Host side, the device's own checks (m365-update check with the image's keyring and release file).
    Uses the rollback scenario's newer bundle (its agent is broken, which these checks do not look at), so
    that the default set builds one variant only."""
    out, bundle, version = variant(a, "broken", {"M365_BROKEN_AGENT": "1"})
    helper = f"{REPO}/image/rootfs/usr/libexec/m365-sensor/m365-update"
    keyring = os.path.join(REPO, "image", "out", "keys", "signing.cert.pem")
    release = os.path.join(workdir, "image-release")

    switch = os.path.join(workdir, "allow-downgrade")  # beside image-release, as in the image

    def run_check(b, current, compatible=f"m365-sensor-{a.target}", floor="", downgrade=False):
        with open(release, "w") as f:
            f.write(f"IMAGE_VERSION={current}\nRAUC_COMPATIBLE={compatible}\nMIN_VERSION={floor}\n")
        # The helper's own directories in the work directory (it copies the bundle there before any check).
        env = dict(os.environ, M365_UPDATE_KEYRING=keyring, M365_IMAGE_RELEASE=release,
                   M365_UPDATE_WORK_DIR=os.path.join(workdir, "helper-work"),
                   M365_UPDATE_RUN_DIR=os.path.join(workdir, "helper-run"),
                   M365_UPDATE_PROVISION_DIR=os.path.join(workdir, "no-provision"))
        r = subprocess.run([helper, "check", b, *(["--allow-downgrade"] if downgrade else [])],
                           capture_output=True, text=True, env=env)
        return r.returncode, r.stdout.strip()

    rc, msg = run_check(bundle, "0.0.1+20000101000000")
    check("bundle: a newer bundle signed with the image's key verifies", rc == 0, msg)
    rc, msg = run_check(bundle, version + "1")
    check("bundle: an older bundle is refused (downgrade)", rc == 1 and "not newer" in msg, msg)
    rc, msg = run_check(bundle, version)
    check("bundle: the same version is refused", rc == 1, msg)
    rc, msg = run_check(bundle, version + "1", downgrade=True)
    check("bundle: --allow-downgrade without the local switch is refused", rc == 1 and "downgrade refused" in msg, msg)
    with open(switch, "w") as f:
        f.write("test\n")
    rc, msg = run_check(bundle, version + "1", downgrade=True)
    check("bundle: with the image's root-owned downgrade switch an older bundle verifies", rc == 0, msg)
    rc, msg = run_check(bundle, version + "1", floor=version + "0", downgrade=True)
    check("bundle: below the image's MIN_VERSION a bundle is refused, switch or not", rc == 1 and
          "below this image's floor" in msg, msg)
    os.remove(switch)
    rc, msg = run_check(bundle, "0.0.1", compatible="m365-sensor-other-target")
    check("bundle: a bundle for another target is refused (compatible)", rc == 1 and
          "this device is" in msg, msg)
    # S7: the same images signed with another key.
    keys = os.path.join(workdir, "other-keys")
    os.makedirs(keys)
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
       "-days", "30", "-subj", "/CN=not the m365-sensor signing key", "-keyout", f"{keys}/signing.key.pem",
       "-out", f"{keys}/signing.cert.pem")
    wrong_out = os.path.join(workdir, "wrong")
    os.makedirs(wrong_out)
    shutil.copytree(os.path.join(out, "slot"), os.path.join(wrong_out, "slot"), copy_function=os.link)
    wrong = subprocess.run([f"{REPO}/image/bundle.sh", wrong_out], check=True, text=True, capture_output=True,
                           env=dict(os.environ, RAUC_KEYS_DIR=keys)).stdout.strip().splitlines()[-1]
    rc, msg = run_check(wrong, "0.0.1")
    check("bundle: a bundle signed with the wrong key is refused (S7)", rc == 1 and "signature" in msg, msg)
    VARIANTS["wrong-key"] = wrong


def update_chain(a, raw, workdir, name, env, expect_slot_b_good):
    out, bundle, version = variant(a, name, env)
    disk = fresh_disk(raw, workdir)
    seed(disk, workdir)
    request_update(disk, workdir, bundle)
    b = Boot(a.arch, disk, workdir, a.timeout, reboots=True)
    tag = name
    try:
        t1 = b.wait_for(r"M365-HEALTH: good slot=A")
        if not check(f"{tag}: slot A booted and was marked good", t1 is not None, b.tail() if t1 is None else f"{t1:.1f}s"):
            return
        t2 = b.wait_for(r'm365-update: \{"ok":', after=t1)
        ok = t2 is not None and any('"ok":true' in l and "installed into slot B" in l for _, l in b.lines)
        if not check(f"{tag}: the agent's update request installed the bundle into the inactive slot B", ok,
                     b.tail() if not ok else f"{t2 - t1:.1f}s to install"):
            return
        FIGURES.append((f"{tag}: rauc install of the bundle under TCG (s)", f"{t2 - t1:.1f}"))
        t3 = b.wait_for(r"m365: booting slot B", after=t2)
        if not check(f"{tag}: after the reboot GRUB boots slot B", t3 is not None, b.tail() if t3 is None else ""):
            return
        if expect_slot_b_good:
            t4 = b.wait_for(r"M365-REPORT-END", after=t3)
            rep = b.report(after=t3)
            check(f"{tag}: slot B runs the new image and the agent", t4 is not None and rep.get("slot") == "B" and
                  rep.get("image") == version and rep.get("agent_active") == "active",
                  f"slot={rep.get('slot')} image={rep.get('image')} agent={rep.get('agent_active')}")
            check(f"{tag}: the health check marked slot B good (rauc status mark-good)",
                  b.wait_for(r"M365-HEALTH: good slot=B", 5, after=t3) is not None, rep.get("health"))
            if t4 is not None:
                FIGURES.append((f"{tag}: QEMU start to slot B's report (s)", f"{t4:.1f}"))
        else:
            t4 = b.wait_for(r"M365-HEALTH: bad slot=B", after=t3)
            check(f"{tag}: the health check finds slot B unhealthy (the agent does not come up)", t4 is not None,
                  b.tail() if t4 is None else "")
            if t4 is None:
                return
            t5 = b.wait_for(r"m365: booting slot A", after=t4)
            check(f"{tag}: the device reboots into slot A (rollback)", t5 is not None, b.tail() if t5 is None else "")
            t6 = b.wait_for(r"M365-REPORT-END", after=t5 or t4)
            rep = b.report(after=t5 or t4)
            check(f"{tag}: slot A runs again with the agent active and is marked good",
                  t6 is not None and rep.get("slot") == "A" and rep.get("agent_active") == "active" and
                  b.wait_for(r"M365-HEALTH: good slot=A", 5, after=t5 or t4) is not None,
                  f"slot={rep.get('slot')} agent={rep.get('agent_active')} health={rep.get('health')}")
            if t6 is not None:
                FIGURES.append((f"{tag}: QEMU start to the rolled-back slot A's report (s)", f"{t6:.1f}"))
    finally:
        b.stop()


def scenario_powerloss(a, raw, workdir):
    """R16: power lost while RAUC writes slot B: slot A boots, the update is reported interrupted."""
    out, bundle, version = variant(a, "good", {})
    disk = fresh_disk(raw, workdir)
    seed(disk, workdir)
    request_update(disk, workdir, bundle)
    b = Boot(a.arch, disk, workdir, a.timeout, reboots=True)
    try:
        t = b.wait_for(r"m365-update: installing")
        if not check("powerloss: the update started", t is not None, b.tail() if t is None else f"{t:.1f}s"):
            return
        time.sleep(3)
    finally:
        b.stop()  # the power cut: QEMU killed in the middle of `rauc install`
    b = Boot(a.arch, disk, workdir, a.timeout)
    try:
        t = b.wait_for(r"M365-REPORT-END")
        rep = b.report()
        check("powerloss: after the cut the device boots slot A with the agent active (R16)",
              t is not None and rep.get("slot") == "A" and rep.get("agent_active") == "active",
              b.tail() if t is None else f"slot={rep.get('slot')} agent={rep.get('agent_active')}")
        check("powerloss: the update is reported failed (interrupted)", rep.get("update_result") == "interrupted",
              rep.get("update_result"))
        states = rep.get("agent_states", "")
        check("powerloss: the spool is intact (the agent opened it: spool ok)", "state:ok" in states, states)
    finally:
        b.stop()


# ---- update through the backend ------------------------------------------------------------------------
# The guest reaches the test's receiver (tests/backend-receiver, on the host's loopback) at
# https://10.0.2.100:8443 and nothing else: QEMU's guestfwd runs FORWARDER for each connection, which joins
# it to the receiver's port. restrict=on stays: no other address leaves QEMU.
GUEST_BACKEND = "10.0.2.100"
FORWARDER = """\
import socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def up():
    while True:
        b = sys.stdin.buffer.raw.read(65536)
        if not b:
            break
        s.sendall(b)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while True:
    b = s.recv(65536)
    if not b:
        break
    sys.stdout.buffer.write(b)
    sys.stdout.buffer.flush()
"""


class Receiver:
    """The reference backend (tests/backend-receiver), on the host's loopback, with an enrolment token and
    a server certificate that also names the guest's address for it."""

    def __init__(self, workdir, token):
        import ssl
        binary = os.environ.get("RECEIVER_BIN", os.path.join(REPO, "target", "debug", "backend-receiver"))
        if not os.access(binary, os.X_OK):
            raise RuntimeError(f"{binary} missing: run `make build` (or set RECEIVER_BIN)")
        self.dir = os.path.join(workdir, "rx")
        os.makedirs(self.dir)
        self.proc = subprocess.Popen(
            [binary, "--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0", "--out-dir", self.dir,
             "--enroll-token", token, "--server-name", GUEST_BACKEND],
            stdout=open(os.path.join(workdir, "rx.log"), "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(self.dir, "control_url")):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the receiver did not start (rx.log)")
            time.sleep(0.2)
        read = lambda n: open(os.path.join(self.dir, n)).read().strip()
        self.url, self.control_url = read("url"), read("control_url")
        self.port = int(self.url.rsplit(":", 1)[1])
        self.ca = os.path.join(self.dir, "ca.pem")
        self.ssl = ssl.create_default_context(cafile=self.ca)

    def call(self, method, path, body=None, raw=None):
        import json
        import urllib.request
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.control_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=self.ssl, timeout=120) as r:
            text = r.read()
        return json.loads(text) if text else None

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def scenario_update(a, raw, workdir):
    """The whole chain of an update: the device enrols with the backend (seeded token), heartbeats, gets
    `install_update` (URL + SHA-256 of a newer signed bundle), downloads and hands it to m365-update, reports
    the result, reboots into slot B; B's health check also requires the backend to be reachable again (it
    was at install time) and marks B good."""
    import hashlib
    out, bundle, version = variant(a, "good", {})
    rx = Receiver(workdir, "image-enrolment-token")
    fwd = os.path.join(workdir, "forward.py")
    with open(fwd, "w") as f:
        f.write(FORWARDER)
    disk = fresh_disk(raw, workdir)
    toml = os.path.join(workdir, "sensor.toml")
    with open(toml, "w") as f:
        f.write(SENSOR_TOML.replace('url = "https://127.0.0.1:9"\ntoken_file = "/etc/m365-sensor/backend.token"',
                                    f'url = "https://{GUEST_BACKEND}:8443"\nca_file = "/etc/m365-sensor/backend-ca.pem"')
                + "\n[management]\nheartbeat_secs = 5\n")
    for name, text in {"contoso.secret": "test-client-secret\n", "enroll.token": "image-enrolment-token\n"}.items():
        with open(os.path.join(workdir, name), "w") as f:
            f.write(text)
    sh(f"{REPO}/provision/seed", disk, "--backend", f"https://{GUEST_BACKEND}:8443",
       "--token-file", os.path.join(workdir, "enroll.token"), "--config", toml, "--ca-file", rx.ca,
       "--secret", os.path.join(workdir, "contoso.secret"), "--ntp", "127.0.0.1")
    plant_hostile_agent_files(disk, workdir)
    # The backend's downgrade: the running image's own bundle (not newer) signed with the right key.
    same = subprocess.run([f"{REPO}/image/bundle.sh", a.out], check=True, text=True,
                          capture_output=True).stdout.strip().splitlines()[-1]
    b = Boot(a.arch, disk, workdir, a.timeout, reboots=True,
             nic_extra=f",guestfwd=tcp:{GUEST_BACKEND}:8443-cmd:python3 {fwd} {rx.port}")
    try:
        t1 = b.wait_for(r"M365-HEALTH: good slot=A")
        if not check("update: slot A booted and was marked good", t1 is not None, b.tail() if t1 is None else f"{t1:.1f}s"):
            return
        enrolled = hb = None
        deadline = time.monotonic() + a.timeout
        while time.monotonic() < deadline and not (enrolled and hb):
            enrolled = rx.call("GET", "/_rx/enrollments")["issued"]
            hb = rx.call("GET", "/_rx/heartbeats")
            time.sleep(2)
        if not check("update: the device enrolled with the seeded token and heartbeats over mutual TLS",
                     bool(enrolled) and bool(hb), f"{len(enrolled or [])} enrolment(s), {len(hb or [])} heartbeat(s)"):
            return
        b.wait_for(r"M365-REPORT-END")
        enroll = b.report().get("enroll", "")
        check("update: m365-enroll.service succeeded and wiped the token (no step after the enrolment failed)",
              enroll.startswith("inactive/success") and "token_left=no" in enroll, enroll)
        t_req = b.wait_for(r'm365-update: \{"ok":false.*update-requested: refused: a symbolic link', 5)
        check("update: the root helper refused the agent's request that was a symlink to a root file",
              t_req is not None, f"{t_req:.1f}s" if t_req is not None else "no refusal on the console")
        # The backend asks for a downgrade: refused by the agent (the flag) and by the helper (the version).
        d = open(same, "rb").read()
        rx.call("PUT", "/_rx/files/same.raucb", raw=d)
        url = f"https://{GUEST_BACKEND}:8443/v1/files/same.raucb"
        flag = rx.call("POST", "/_rx/commands", {"kind": "install_update", "args": {
            "url": url, "sha256": hashlib.sha256(d).hexdigest(), "allow_downgrade": True}})
        old = rx.call("POST", "/_rx/commands", {"kind": "install_update", "args": {
            "url": url, "sha256": hashlib.sha256(d).hexdigest()}})
        got = {}
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and len(got) < 2:
            for c in rx.call("GET", "/_rx/commands"):
                if c["id"] in (flag["id"], old["id"]) and c.get("results"):
                    got[c["id"]] = c["results"][0]
            time.sleep(2)
        r1, r2 = got.get(flag["id"], {}), got.get(old["id"], {})
        check("update: install_update with allow_downgrade is refused by the agent, naming the local switch",
              r1.get("ok") is False and "only by the local switch" in r1.get("message", ""), str(r1))
        check("update: the running image's own bundle is refused by the real helper (not newer: downgrade refused)",
              r2.get("ok") is False and "downgrade refused" in r2.get("message", ""), str(r2))
        data = open(bundle, "rb").read()
        sha = hashlib.sha256(data).hexdigest()
        rx.call("PUT", "/_rx/files/update.raucb", raw=data)
        t2 = time.monotonic() - b.started
        cmd = rx.call("POST", "/_rx/commands", {"kind": "install_update", "args": {
            "url": f"https://{GUEST_BACKEND}:8443/v1/files/update.raucb", "sha256": sha}})
        result = None
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not result:
            c = next((c for c in rx.call("GET", "/_rx/commands") if c["id"] == cmd["id"]), {})
            result = (c.get("results") or [None])[0]
            time.sleep(2)
        ok = bool(result) and result.get("ok") is True and "installed into slot B" in result.get("message", "")
        if not check("update: install_update downloaded and verified the bundle, m365-update installed it into "
                     "slot B, and the result reached the backend before the reboot", ok, str(result) + ("" if ok else "\n" + b.tail())):
            return
        FIGURES.append(("update: install_update command to its result, download + rauc install under TCG (s)",
                        f"{time.monotonic() - b.started - t2:.1f}"))
        t3 = b.wait_for(r"m365: booting slot B", after=t2)
        if not check("update: the agent's reboot request boots slot B", t3 is not None, b.tail() if t3 is None else ""):
            return
        t4 = b.wait_for(r"M365-HEALTH: good slot=B", after=t3)
        b.wait_for(r"M365-REPORT-END", after=t3)
        rep = b.report(after=t3)
        check("update: slot B runs the new image with the agent active", rep.get("slot") == "B" and
              rep.get("image") == version and rep.get("agent_active") == "active",
              f"slot={rep.get('slot')} image={rep.get('image')} agent={rep.get('agent_active')}")
        check("update: the enrolment token was wiped once the device was enrolled",
              "token_left=no" in rep.get("enroll", ""), rep.get("enroll"))
        judged = b.wait_for(r"m365-health: .*backend.* ok", 5, after=t3)
        check("update: slot B's health check required the backend reachable again and marked it good",
              t4 is not None and judged is not None, b.tail() if t4 is None or judged is None else f"{t4:.1f}s")
        n = len(rx.call("GET", "/_rx/heartbeats") or [])
        time.sleep(12)
        check("update: heartbeats continue from slot B", len(rx.call("GET", "/_rx/heartbeats") or []) > n)
        if t4 is not None:
            FIGURES.append(("update: QEMU start to slot B marked good (s)", f"{t4:.1f}"))
    finally:
        b.stop()
        rx.stop()
    check_canary(disk, workdir, "update")


CANARY = "/var/lib/m365-provision/canary"
CANARY_TEXT = "root's file: the agent must never get it written, owned or read\n"


def plant_hostile_agent_files(disk, workdir):
    """What a compromised agent user plants in its own directory before the helper runs: symlinks where
    root once wrote its result, and a request that is a symlink to a root-owned file (the canary)."""
    canary = os.path.join(workdir, "canary")
    with open(canary, "w") as f:
        f.write(CANARY_TEXT)
    debugfs_put(disk, [(canary, CANARY, 0, "600")])
    off, _ = partition(disk, "data")
    cmds = []
    for name in ("update-result.json", "update-result.json.tmp", "update-requested"):
        rel = f"/lib/m365-sensor/{name}"
        cmds += [f"symlink {rel} {CANARY}", f"sif {rel} uid 990", f"sif {rel} gid 990"]
    script = os.path.join(workdir, "symlinks.cmds")
    with open(script, "w") as f:
        f.write("\n".join(cmds) + "\n")
    out = subprocess.run(["debugfs", "-w", "-f", script, f"{disk}?offset={off}"], capture_output=True, text=True)
    if out.returncode != 0 or re.search(r"(?im)^\S.*: (error|could not|not found)", out.stderr):
        raise RuntimeError(f"debugfs: {out.stderr.strip()}")


def check_canary(disk, workdir, tag):
    """After the guest stopped: the canary is root's, 0600, its content unchanged."""
    off, _ = partition(disk, "data")
    rel = CANARY[len("/var"):]
    text = subprocess.run(["debugfs", "-R", f"cat {rel}", f"{disk}?offset={off}"], capture_output=True,
                          text=True).stdout
    st = subprocess.run(["debugfs", "-R", f"stat {rel}", f"{disk}?offset={off}"], capture_output=True,
                        text=True).stdout
    m = re.search(r"Mode:\s+(\d+).*?User:\s+(\d+)", st, re.S)
    check(f"{tag}: the root file the agent's symlinks pointed at is untouched (content, owner root, 0600)",
          text == CANARY_TEXT and m is not None and m.group(2) == "0" and m.group(1).endswith("600"),
          f"content={text!r} stat={m.groups() if m else st[:200]}")


def scenario_rollback(a, raw, workdir):
    update_chain(a, raw, workdir, "broken", {"M365_BROKEN_AGENT": "1"}, False)


# ---- provision/flash -----------------------------------------------------------------------------------

def scenario_flash(a, raw_image, workdir):
    flash = f"{REPO}/provision/flash"
    target = os.path.join(workdir, "disk.img")
    # flash is image-agnostic: a small GPT disk with data in it keeps the checksums fast. seed uses the
    # real image below.
    raw = os.path.join(workdir, "small.raw")
    with open(raw, "wb") as f:
        f.truncate(64 * 1048576)
        f.seek(5 * 1048576)
        f.write(os.urandom(3 * 1048576))
    subprocess.run(["sfdisk", "--quiet", raw], input="label: gpt\nstart=2048, size=8192, name=\"esp\"\n", text=True, check=True)
    with open(raw + ".sha256", "w") as f:
        f.write(sh("sha256sum", raw).split()[0] + "  small.raw\n")
    r = subprocess.run([flash, raw, target], capture_output=True, text=True)
    check("flash: writes the image to a file and verifies the read-back", r.returncode == 0 and
          "verified" in r.stdout, (r.stdout + r.stderr).strip().splitlines()[-1])
    if r.returncode == 0:
        check("flash: the written file is the image, byte for byte",
              sh("sha256sum", target).split()[0] == open(raw + ".sha256").read().split()[0])
    r = subprocess.run([flash, raw, target], capture_output=True, text=True)
    check("flash: refuses to overwrite an existing file without --yes", r.returncode == 1, r.stderr.strip())
    # A copy of the image with one byte changed no longer matches the SHA-256 file.
    bad = os.path.join(workdir, "bad.raw")
    sh("cp", "--sparse=always", raw, bad)
    shutil.copy(raw + ".sha256", bad + ".sha256")
    with open(bad, "r+b") as f:
        f.seek(4 * 1048576 + 17)
        c = f.read(1)
        f.seek(4 * 1048576 + 17)
        f.write(bytes([c[0] ^ 1]))
    with open(bad + ".sha256", "w") as f:
        f.write(open(raw + ".sha256").read().split()[0] + "  bad.raw\n")
    r = subprocess.run([flash, "--yes", bad, os.path.join(workdir, "x.img")], capture_output=True, text=True)
    check("flash: refuses an image that does not match its SHA-256 file", r.returncode == 1 and
          not os.path.exists(os.path.join(workdir, "x.img")), r.stderr.strip())
    os.remove(bad + ".sha256")
    r = subprocess.run([flash, "--yes", bad, os.path.join(workdir, "x.img")], capture_output=True, text=True)
    check("flash: refuses an image without a SHA-256 file", r.returncode == 1, r.stderr.strip())
    root = sh("findmnt", "-n", "-o", "SOURCE", "/").strip()
    if os.path.exists(root) and os.stat(root).st_mode & 0o170000 == 0o060000:
        r = subprocess.run([flash, "--check-only", "--yes", raw, root], capture_output=True, text=True)
        check("flash: refuses the disk holding / (checked with --check-only: nothing is written)",
              r.returncode == 1 and "root" in r.stderr, r.stderr.strip())
    r = subprocess.run([flash, raw, raw], capture_output=True, text=True)
    check("flash: refuses to write the image onto itself", r.returncode == 1, r.stderr.strip())
    # seed refuses a second seed and bad values
    raw = raw_image
    disk = fresh_disk(raw, workdir, "seeded.raw")
    r1 = subprocess.run([f"{REPO}/provision/seed", disk, "--backend", "https://b.example"], capture_output=True, text=True)
    r2 = subprocess.run([f"{REPO}/provision/seed", disk, "--backend", "https://b.example"], capture_output=True, text=True)
    check("seed: writes a seed, refuses a second one on the same image", r1.returncode == 0 and r2.returncode != 0,
          (r2.stderr or r1.stderr).strip())
    r = subprocess.run([f"{REPO}/provision/seed", fresh_disk(raw, workdir, "s2.raw"), "--backend",
                        'https://b.example/"x'], capture_output=True, text=True)
    check("seed: refuses a value with a quote", r.returncode != 0, r.stderr.strip())
    r = subprocess.run([f"{REPO}/provision/seed", fresh_disk(raw, workdir, "s3.raw"), "--backend",
                        "http://b.example"], capture_output=True, text=True)
    check("seed: refuses a non-https backend", r.returncode != 0, r.stderr.strip())


def scenario_helper(a, raw, workdir):
    """The root update helper on the host against a hostile agent user (tests/image/helper_checks.py)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import helper_checks
    helper_checks.run(check, workdir)


EXTRA_SCENARIOS = {"helper": scenario_helper, "flash": scenario_flash, "bundle": scenario_bundle,
                   "update": scenario_update, "rollback": scenario_rollback, "powerloss": scenario_powerloss}

if __name__ == "__main__":
    sys.exit(main())
