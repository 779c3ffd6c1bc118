"""The root update helper (image/rootfs/usr/libexec/m365-sensor/m365-update) on the host, as root, against a
hostile agent user: the `helper` scenario of tests/image/run.py (no image, no QEMU: seconds).

The helper runs in a scratch root (its directories moved there with its M365_UPDATE_* variables). The
agent is played by an unprivileged user (`nobody`): every file of the agent's directory is planted by that
user (symlinks to root's files, FIFOs, hard links, hostile ids, swapped bundles). RAUC, `systemctl` and
`m365-sensor` are stand-ins on PATH that record what they were given (RAUC's own signature checks are the
`bundle` scenario's, on real bundles). After each attack the whole scratch tree is compared with its state
before: nothing outside the helper's own root-owned directories may change, except the request the agent
wrote (consumed) and the result."""

import hashlib
import os
import pwd
import shutil
import stat
import subprocess

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
HELPER = os.environ.get("M365_TEST_HELPER") or os.path.join(REPO, "image", "rootfs", "usr", "libexec", "m365-sensor",
                                                             "m365-update")

FAKE_RAUC = """#!/bin/sh
# Stand-in for RAUC: a "bundle" is a text file with version= and compatible= lines.
log=$FAKE_LOG
case "$*" in
  *" info "*)
    b=$(eval echo \\${$#})
    echo "info $b" >> "$log"
    grep -q '^signed=yes$' "$b" || { echo "signature verification failed" >&2; exit 1; }
    echo "RAUC_MF_VERSION='$(sed -n 's/^version=//p' "$b")'"
    echo "RAUC_MF_COMPATIBLE='$(sed -n 's/^compatible=//p' "$b")'"
    # A racing agent rewrites its own bundle right after the check (time of check / time of use).
    [ -n "${FAKE_SWAP:-}" ] && setpriv --reuid=65534 --regid=65534 --clear-groups sh -c \
        "printf 'version=9.9.9\\ncompatible=m365-sensor-test\\nsigned=no\\nevil=yes\\n' > '$FAKE_SWAP'"
    exit 0 ;;
  install*)
    echo "install $2 $(tr '\\n' ' ' < "$2")" >> "$log"
    exit 0 ;;
esac
echo "fake rauc: $*" >&2; exit 2
"""
FAKE_SYSTEMCTL = "#!/bin/sh\necho \"systemctl $*\" >> \"$FAKE_LOG\"\n"


class Rig:
    def __init__(self, workdir):
        self.root = os.path.join(workdir, "helper-root")
        os.makedirs(self.root)
        # The agent user must reach its directory: the run's work directories (0700 from mkdtemp) open up.
        for d in (os.path.dirname(workdir), workdir):
            os.chmod(d, 0o755)
        os.chmod(self.root, 0o755)
        self.agent = pwd.getpwnam("nobody")
        self.state = self.path("var/lib/m365-sensor")
        self.work = self.path("var/lib/m365-update")
        self.run = self.path("run/m365-update")
        self.provision = self.path("var/lib/m365-provision")
        self.usr = self.path("usr/lib/m365-sensor")
        self.bin = self.path("fakebin")
        self.log = self.path("fake.log")
        for d in (self.provision, self.usr, self.bin, os.path.dirname(self.work), os.path.dirname(self.run)):
            os.makedirs(d, exist_ok=True)
        os.chmod(self.provision, 0o700)
        os.makedirs(self.state)
        os.chown(self.state, self.agent.pw_uid, self.agent.pw_gid)
        os.chmod(self.state, 0o700)
        # Root's secrets the agent would like to read or overwrite.
        self.canary = os.path.join(self.provision, "seed.conf")
        self.secret = self.path("etc-secret")
        for f, text in ((self.canary, "BACKEND_URL=https://b.example\n"), (self.secret, "root-only-secret\n")):
            with open(f, "w") as fh:
                fh.write(text)
            os.chmod(f, 0o600)
        self.release = os.path.join(self.usr, "image-release")
        self.set_release("0.2.0+20260101000000", "")
        for name, text in (("rauc", FAKE_RAUC), ("systemctl", FAKE_SYSTEMCTL)):
            with open(os.path.join(self.bin, name), "w") as fh:
                fh.write(text)
            os.chmod(os.path.join(self.bin, name), 0o755)
        self.as_agent("mkdir", "-p", os.path.join(self.state, "update"))

    def path(self, rel):
        return os.path.join(self.root, rel)

    def set_release(self, version, floor):
        with open(self.release, "w") as f:
            f.write(f"IMAGE_VERSION={version}\nRAUC_COMPATIBLE=m365-sensor-test\nMIN_VERSION={floor}\n")

    def as_agent(self, *cmd, data=None):
        return subprocess.run(["setpriv", f"--reuid={self.agent.pw_uid}", f"--regid={self.agent.pw_gid}",
                               "--clear-groups", *cmd], input=data, capture_output=True, text=True, check=True)

    def agent_write(self, rel, text):
        self.as_agent("sh", "-c", 'umask 077; cat > "$1"', "_", os.path.join(self.state, rel), data=text)

    def bundle(self, name="c1", version="0.3.0+20260201000000", signed=True):
        self.agent_write(f"update/{name}.raucb",
                         f"version={version}\ncompatible=m365-sensor-test\nsigned={'yes' if signed else 'no'}\n")
        return os.path.join(self.state, "update", f"{name}.raucb")

    def request(self, text):
        self.agent_write("update-requested", text)

    def helper(self, *args, env=None, timeout=60):
        e = dict(os.environ, PATH=f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}", FAKE_LOG=self.log,
                 M365_UPDATE_STATE_DIR=self.state, M365_UPDATE_WORK_DIR=self.work, M365_UPDATE_RUN_DIR=self.run,
                 M365_UPDATE_PROVISION_DIR=self.provision, M365_IMAGE_RELEASE=self.release,
                 M365_UPDATE_AGENT_USER="nobody", M365_UPDATE_KEYRING="/dev/null",
                 M365_UPDATE_BACKEND_MARK=self.path("backend-mark"), **(env or {}))
        if os.path.exists(self.log):
            os.remove(self.log)
        r = subprocess.run([HELPER, *args], capture_output=True, text=True, env=e, timeout=timeout)
        return r.returncode, r.stdout.strip(), r.stderr.strip()

    def result(self):
        p = os.path.join(self.run, "result.json")
        return open(p).read().strip() if os.path.exists(p) else ""

    def fake_log(self):
        return open(self.log).read() if os.path.exists(self.log) else ""

    def snapshot(self):
        """Every path of the scratch tree but the helper's own directories: type, owner, mode, content."""
        snap = {}
        for d, dirs, files in os.walk(self.root):
            for n in dirs + files:
                p = os.path.join(d, n)
                rel = os.path.relpath(p, self.root)
                if rel.startswith(("var/lib/m365-update", "run/m365-update", "fake")) or rel == "backend-mark":
                    continue
                st = os.lstat(p)
                body = ""
                if stat.S_ISREG(st.st_mode):
                    body = hashlib.sha256(open(p, "rb").read()).hexdigest()
                elif stat.S_ISLNK(st.st_mode):
                    body = "-> " + os.readlink(p)
                snap[rel] = (stat.S_IFMT(st.st_mode), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), body)
        return snap


def changed(before, after, allowed):
    """Paths that differ between two snapshots, less the allowed ones."""
    keys = set(before) | set(after)
    return sorted(k for k in keys if before.get(k) != after.get(k) and k not in allowed)


def run(check, workdir):
    if os.geteuid() != 0:
        check("helper: runs as root (it plays root and an unprivileged agent)", False, "not root")
        return
    for tool in ("setpriv", "perl"):
        if not shutil.which(tool):
            check(f"helper: {tool} on the host", False, "missing")
            return
    r = Rig(workdir)
    REQ = "var/lib/m365-sensor/update-requested"
    bundle_ok = f"bundle={r.state}/update/c1.raucb\nid=cmd-1\nreboot=no\n"

    # 1. A plain request installs the ROOT-OWNED COPY, not the agent's file; the agent swaps its bundle
    #    right after the check, and what RAUC installs is still what was checked.
    r.bundle()
    r.request(bundle_ok)
    before = r.snapshot()
    rc, out, err = r.helper("request", os.path.join(r.state, "update-requested"),
                            env={"FAKE_SWAP": os.path.join(r.state, "update", "c1.raucb")})
    log = r.fake_log()
    res = r.result()
    check("helper: a valid request installs the bundle (result in the root-owned /run directory)",
          rc == 0 and '"code":"installed"' in res and '"id":"cmd-1"' in res, f"rc={rc} {res} {err[-300:]}")
    installed = [l for l in log.splitlines() if l.startswith("install ")]
    check("helper: RAUC checks and installs the root-owned copy, never the agent's path (TOCTOU)",
          installed and installed[0].split()[1].startswith(r.work) and "evil=yes" not in installed[0] and
          all(r.state not in l for l in log.splitlines()), log.strip())
    st = os.stat(os.path.join(r.run, "result.json"))
    check("helper: the result is root's (0644) in a root-owned 0755 directory",
          st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o644 and os.stat(r.run).st_uid == 0 and
          stat.S_IMODE(os.stat(r.run).st_mode) == 0o755, oct(st.st_mode))
    diff = changed(before, r.snapshot(), {REQ, "var/lib/m365-sensor/update/c1.raucb"})
    check("helper: nothing outside its own directories changed (the request consumed)", not diff and
          not os.path.exists(os.path.join(r.root, REQ)), " ".join(diff))
    check("helper: no copy is left in the work directory", not os.path.exists(os.path.join(r.work, "bundle.raucb")))

    # 2. The old attack: symlinks in the agent's directory where root used to write its result.
    r.bundle()
    for name in ("update-result.json", "update-result.json.tmp"):
        r.as_agent("ln", "-sf", r.canary, os.path.join(r.state, name))
    r.request(bundle_ok)
    before = r.snapshot()
    rc, out, err = r.helper("request", os.path.join(r.state, "update-requested"))
    diff = changed(before, r.snapshot(), {REQ})
    check("helper: symlinks planted where root once wrote its result lead nowhere (the seed is untouched)",
          rc == 0 and not diff and open(r.canary).read() == "BACKEND_URL=https://b.example\n" and
          os.stat(r.canary).st_uid == 0, f"rc={rc} changed: {' '.join(diff)}")

    # 3. The request itself is hostile: a symlink to a root secret, a FIFO, a hard link, root's own file.
    def refused_request(plant, label, expect):
        plant()
        before = r.snapshot()
        try:
            rc, out, err = r.helper("request", os.path.join(r.state, "update-requested"), timeout=20)
        except subprocess.TimeoutExpired:
            check(f"helper: {label}", False, "the helper hung")
            return
        res = r.result()
        diff = changed(before, r.snapshot(), {REQ})
        check(f"helper: {label}", rc == 1 and '"code":"refused"' in res and expect in res and
              "root-only-secret" not in res + out + err and not diff and "install" not in r.fake_log() and
              not os.path.lexists(os.path.join(r.root, REQ)),
              f"rc={rc} {res} changed: {' '.join(diff)}")

    refused_request(lambda: r.as_agent("ln", "-s", r.secret, os.path.join(r.state, "update-requested")),
                    "a request that is a symlink to a root file is refused, never read", "a symbolic link")
    refused_request(lambda: r.as_agent("mkfifo", os.path.join(r.state, "update-requested")),
                    "a request that is a FIFO is refused without blocking", "not a regular file")

    def hardlink():
        r.agent_write("other", bundle_ok)
        r.as_agent("ln", os.path.join(r.state, "other"), os.path.join(r.state, "update-requested"))
    refused_request(hardlink, "a request with a second hard link is refused", "hard links")

    def root_owned():
        with open(os.path.join(r.state, "update-requested"), "w") as f:
            f.write(bundle_ok)
    refused_request(root_owned, "a request not owned by the agent user is refused", "not the agent's")

    # 4. Injection: a command id with a newline added `reboot=yes`; unknown keys; bytes outside ASCII.
    r.bundle()
    for text, label, expect in (
            (f"bundle={r.state}/update/c1.raucb\nid=x\nreboot=yes\nreboot=no\n",
             "an id with an injected newline (reboot=yes twice) refuses the whole request", "line 4: key reboot given twice"),
            (f"bundle={r.state}/update/c1.raucb\nid=x\nallow_downgrade=yes\n",
             "allow_downgrade in a request is refused (only the local switch allows a downgrade)", "line 3: allow_downgrade"),
            (f"bundle={r.state}/update/c1.raucb\nid=x\nshell=$(reboot)\n",
             "an unknown key refuses the whole request, naming the line", "line 3: unknown key shell"),
            (f"bundle={r.state}/update/c1.raucb\nid=x y\n", "an id outside the safe set is refused", "line 2: id must be"),
            (f"bundle={r.state}/update/c1.raucb\nid=\u00e9\n", "a byte outside printable ASCII refuses the request",
             "printable ASCII"),
            (f"bundle={r.state}/update/../../../etc-secret\n", "a bundle path leaving update/ is refused",
             "line 1: bundle must be"),
            (f"id=x\n", "a request without a bundle is refused", "no bundle= line")):
        refused_request(lambda: r.request(text), label, expect)
    check("helper: no refused request rebooted the host", "systemctl" not in r.fake_log())

    # 5. The bundle is hostile: a symlink, the update directory a symlink, larger than the cap.
    def bundle_symlink():
        r.as_agent("ln", "-sf", r.secret, os.path.join(r.state, "update", "c1.raucb"))
        r.request(bundle_ok)
    refused_request(bundle_symlink, "a bundle that is a symlink is refused, never copied", "a symbolic link")

    def dir_symlink():
        r.as_agent("rm", "-rf", os.path.join(r.state, "update"))
        elsewhere = os.path.join(r.state, "elsewhere")
        r.as_agent("mkdir", "-p", elsewhere)
        r.agent_write("elsewhere/c1.raucb", "version=0.3.0\ncompatible=m365-sensor-test\nsigned=yes\n")
        r.as_agent("ln", "-s", elsewhere, os.path.join(r.state, "update"))
        r.request(bundle_ok)
    refused_request(dir_symlink, "an update/ directory that is a symlink is refused", "update: refused: a symbolic link")
    r.as_agent("rm", "-rf", os.path.join(r.state, "update"), os.path.join(r.state, "elsewhere"))
    r.as_agent("mkdir", os.path.join(r.state, "update"))

    r.bundle()
    r.request(bundle_ok)
    rc, out, err = r.helper("request", os.path.join(r.state, "update-requested"),
                            env={"M365_UPDATE_MAX_BUNDLE_BYTES": "16"})
    check("helper: a bundle over the size cap is refused before it is copied",
          rc == 1 and "more than the cap of 16" in r.result() and not os.path.exists(os.path.join(r.work, "bundle.raucb")),
          r.result())

    # 6. Downgrades: never by request alone; by the local switch only if root owns it; never below the floor.
    def install(version, label, want_rc, expect):
        r.bundle(version=version)
        r.request(bundle_ok)
        rc, out, err = r.helper("request", os.path.join(r.state, "update-requested"))
        check(f"helper: {label}", rc == want_rc and expect in r.result(), f"rc={rc} {r.result()}")

    install("0.1.0+20250101000000", "an older bundle is refused (no downgrade switch)", 1, "downgrade refused")
    install("0.2.0+20260101000000", "the running version itself is refused", 1, "not newer")
    switch = os.path.join(r.provision, "allow-downgrade")
    with open(switch, "w") as f:
        f.write("yes\n")
    os.chown(switch, r.agent.pw_uid, r.agent.pw_gid)
    install("0.1.0+20250101000000", "a downgrade switch not owned by root counts for nothing", 1, "downgrade refused")
    os.chown(switch, 0, 0)
    install("0.1.0+20250101000000", "with the root-owned local switch an older bundle installs", 0, '"code":"installed"')
    r.set_release("0.2.0+20260101000000", "0.1.5")
    install("0.1.0+20250101000000", "below the image's MIN_VERSION nothing installs, switch or not", 1,
            "below this image's floor MIN_VERSION=0.1.5")
    install("0.1.5", "the floor itself may install (with the switch)", 0, '"code":"installed"')
    os.remove(switch)
    r.bundle(signed=False)
    r.request(bundle_ok)
    rc, out, err = r.helper("request", os.path.join(r.state, "update-requested"))
    check("helper: an unsigned bundle is refused by RAUC's check", rc == 1 and "signature" in r.result(), r.result())

    # 7. A power cut during the install: the next boot reports it interrupted, from root's own files.
    os.makedirs(r.work, exist_ok=True)
    with open(os.path.join(r.work, "in-progress"), "w") as f:
        f.write("id=cmd-9\nversion=0.3.0\n")
    r.as_agent("ln", "-sf", r.canary, os.path.join(r.state, "update-result.json"))
    before = r.snapshot()
    rc, out, err = r.helper("recover")
    check("helper: recover reports an interrupted install in /run, touching nothing of the agent's",
          '"code":"interrupted"' in r.result() and '"id":"cmd-9"' in r.result() and
          not changed(before, r.snapshot(), set()) and not os.path.exists(os.path.join(r.work, "in-progress")),
          r.result())

    # 8. A request that cannot be removed (here: in a directory the agent user cannot write) is never
    #    installed: the path unit would fire again and install it again.
    stuck = r.path("stuck")
    os.makedirs(stuck)
    os.chmod(stuck, 0o755)
    with open(os.path.join(stuck, "update-requested"), "w") as f:
        f.write(bundle_ok)
    os.chown(os.path.join(stuck, "update-requested"), r.agent.pw_uid, r.agent.pw_gid)
    r.bundle()
    rc, out, err = r.helper("request", os.path.join(stuck, "update-requested"))
    check("helper: a request that cannot be removed is not installed (no install at every trigger)",
          rc == 2 and "could not be removed" in r.result() and "install " not in r.fake_log(),
          f"rc={rc} {r.result()} {r.fake_log()}")

    # 9. reboot=yes is honoured only for a valid request that installed.
    r.bundle()
    r.request(bundle_ok.replace("reboot=no", "reboot=yes"))
    rc, out, err = r.helper("request", os.path.join(r.state, "update-requested"))
    check("helper: reboot=yes in a valid request reboots after the install", rc == 0 and
          "systemctl --no-block reboot" in r.fake_log(), r.fake_log())
