"""Between the host and the sandboxed program: namespaces, a private root, limits, privilege drop, confinement.

Not imported by ossrl: `runner.py` executes it as `python -I -S _launcher.py CONFIG_JSON` (stdlib only, since
-I -S sees no site-packages). It runs with the caller's privileges (root on CI) and never runs user code itself.

Process tree:  launcher (host pid ns; new mount/net/ipc/uts ns, or a user ns holding them when not root)
                 └─ init (pid 1 of a new pid ns: builds the root, then reaps; its exit kills everything in the ns)
                      └─ worker (joins the run's cgroup, rlimits, unprivileged uid, no groups, fresh session keyring,
                                 no_new_privs, Landlock, seccomp) --exec--> python bootstrap -> user code
The root the worker sees (pivot_root): a tmpfs holding the Python runtime (read-only binds), a made-up /etc, /dev
with null/zero/urandom and a private /dev/shm, a /proc of the new pid ns, and the work dir (a size-capped tmpfs).
Everything the host needs to know goes through the status pipe as JSON lines; stdout/stderr belong to the user.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import shutil
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves out the script's dir; _confine is ours
import _confine  # noqa: E402

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x04000000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 1, 2
SYS_MOUNT_SETATTR = 442  # same number on every architecture (unified syscall table since 5.x)
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
DEVICES = ("null", "zero", "urandom")

libc = ctypes.CDLL(None, use_errno=True)
_n = ctypes.c_long  # variadic syscall(): pass every integer at full width


class _MountAttr(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(libc.mount(_b(src), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)), f"mount {target}")


def mount_setattr(path: str, recursive: bool, set_: int = 0, clr: int = 0) -> None:
    attr = _MountAttr(set_, clr, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    ret = libc.syscall(
        _n(SYS_MOUNT_SETATTR), _n(AT_FDCWD), _b(path), _n(flags), ctypes.byref(attr), _n(ctypes.sizeof(attr))
    )
    _check(ret, f"mount_setattr {path}")


def prctl(option: int, arg: int) -> None:
    ul = ctypes.c_ulong
    _check(libc.prctl(ctypes.c_int(option), ul(arg), ul(0), ul(0), ul(0)), f"prctl {option}")


class Status:
    """JSON lines to the host over an fd the user's code never holds (it is close-on-exec in the worker)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, **msg: object) -> None:
        try:
            os.write(self.fd, (json.dumps(msg) + "\n").encode())
        except OSError:
            pass


# ---------------------------------------------------------------- namespaces (launcher)


def unshare_namespaces(cfg: dict) -> list[str]:
    """Try all namespaces at once, then one by one, so we know exactly which ones hold."""
    if not cfg["namespaces"]:
        return []
    wanted = {
        "mntns": CLONE_NEWNS,
        "pidns": CLONE_NEWPID,
        "netns": CLONE_NEWNET,
        "ipcns": CLONE_NEWIPC,
        "utsns": CLONE_NEWUTS,
    }
    if os.geteuid() != 0:
        # Unprivileged: a user namespace grants the capabilities to create the others (if the OS allows it).
        # Supplementary groups stay (an unprivileged user must write "deny" to setgroups before its gid_map).
        if "userns" in cfg["disable"]:
            return []
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(CLONE_NEWUSER | sum(wanted.values())) == 0:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
            return ["userns", *wanted]
        return []
    if libc.unshare(sum(wanted.values())) == 0:
        return list(wanted)
    return [name for name, flag in wanted.items() if libc.unshare(flag) == 0]


# ---------------------------------------------------------------- the private root (init, in the new mount ns)


def graft(path: str, new: str, dev: int) -> None:
    """Make `path` resolve under `new` as it does on the host: directories on the way are created on our tmpfs
    (`dev`), symlinks copied, the last component bind-mounted. Nothing is ever created inside a bind mount."""
    parts = [p for p in path.split("/") if p]
    cur, hops = "/", 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            cur = os.path.dirname(cur)
            continue
        host = os.path.join(cur, part)
        inner = new + host
        if os.path.lexists(inner) and not os.path.islink(inner) and os.lstat(inner).st_dev != dev:
            return  # inside something bound already
        if os.path.islink(host):
            target = os.readlink(host)
            if not os.path.lexists(inner):
                os.symlink(target, inner)
            hops += 1
            if hops > 40:
                raise OSError(errno.ELOOP, f"graft {path}")
            if target.startswith("/"):
                cur = "/"
            parts = [p for p in target.split("/") if p] + parts
            continue
        if not os.path.exists(host):
            return
        if not parts:
            if not os.path.lexists(inner):
                if os.path.isdir(host):
                    os.mkdir(inner, 0o755)
                else:
                    os.close(os.open(inner, os.O_CREAT | os.O_WRONLY, 0o644))
            mount(host, inner, None, MS_BIND | MS_REC)
            return
        if not os.path.lexists(inner):
            os.mkdir(inner, 0o755)
        cur = host


def _mkdirs(new: str, path: str, mode: int = 0o755) -> str:
    inner = new
    for part in path.strip("/").split("/"):
        inner = os.path.join(inner, part)
        if not os.path.lexists(inner):
            os.mkdir(inner, mode)
    return inner


def _copy_tree(src: str, dst: str, uid: int, gid: int) -> None:
    for name in os.listdir(src):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s) and not os.path.islink(s):
            os.mkdir(d, 0o755)
            _copy_tree(s, d, uid, gid)
        else:
            shutil.copy2(s, d, follow_symlinks=False)
        os.lchown(d, uid, gid)


def _write(path: str, text: str, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _make_etc(new: str, cfg: dict) -> None:
    etc = _mkdirs(new, "/etc")
    uid, gid, home = cfg["uid"], cfg["gid"], cfg["workdir"]
    users = "root:x:0:0:root:/:/usr/sbin/nologin\n" + (f"sandbox:x:{uid}:{gid}:sandbox:{home}:/bin/sh\n" if uid else "")
    groups = "root:x:0:\n" + (f"sandbox:x:{gid}:\n" if gid else "")
    for name, text in (
        ("passwd", users),
        ("group", groups),
        ("hostname", "sandbox\n"),
        ("hosts", "127.0.0.1 localhost sandbox\n::1 localhost\n"),
        ("nsswitch.conf", "passwd: files\ngroup: files\nhosts: files\n"),
    ):
        _write(os.path.join(etc, name), text)
    for name in ("ld.so.cache", "localtime"):  # faster library lookup; local time
        if os.path.isfile(f"/etc/{name}"):
            shutil.copyfile(f"/etc/{name}", os.path.join(etc, name))


def _make_dev(new: str) -> None:
    dev = _mkdirs(new, "/dev")
    for name in DEVICES:
        node = os.path.join(dev, name)
        os.close(os.open(node, os.O_CREAT | os.O_WRONLY, 0o666))
        mount(f"/dev/{name}", node, None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "fd/0"), ("stdout", "fd/1"), ("stderr", "fd/2")):
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    mount("tmpfs", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,nr_inodes=4096,mode=1777")


def _readonly(keep: list[str], mounts: list[str]) -> None:
    """Everything read-only and nosuid but `keep`. Kernels before 5.12 lack mount_setattr: remount one by one."""
    try:
        mount_setattr("/", recursive=True, set_=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
        for path in keep:
            mount_setattr(path, recursive=False, clr=MOUNT_ATTR_RDONLY)
        return
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
    for target in ["/", *mounts]:
        if target not in keep:
            try:
                mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
            except OSError:
                if target == "/":
                    raise


def build_root(cfg: dict, pidns: bool) -> list[str]:
    """Build the new root on a tmpfs at cfg['newroot'] and pivot into it. Raises when it cannot be done."""
    uid, gid, work, new = cfg["uid"], cfg["gid"], cfg["workdir"], cfg["newroot"]
    done = ["pivot_root"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount may propagate back to the host
    size_mb = 16 + (os.path.getsize(cfg["main_py"]) >> 20)  # mount points, /etc, the program
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,nr_inodes=16384,mode=0755")
    dev = os.stat(new).st_dev
    for path in cfg["runtime"]:
        graft(path, new, dev)
    _make_etc(new, cfg)
    _make_dev(new)
    mounts = [f"/dev/{name}" for name in DEVICES]
    if pidns:  # a /proc of our own pid ns: host processes (and their cmdlines, environments) do not exist
        mount("proc", _mkdirs(new, "/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        done.append("proc")
        mounts.append("/proc")
    inner_work = _mkdirs(new, work)
    opts = f"size={cfg['disk_mb']}m,nr_inodes=65536,mode=0700,uid={uid},gid={gid}"
    mount("tmpfs", inner_work, "tmpfs", MS_NOSUID | MS_NODEV, opts)
    _copy_tree(work, inner_work, uid, gid)
    main_py = new + cfg["main_py"]
    shutil.copyfile(cfg["main_py"], main_py)
    os.chown(main_py, uid, gid)
    os.chmod(main_py, 0o400)
    os.chdir(new)
    _check(libc.syscall(_n(SYS_PIVOT_ROOT[_confine.arch()]), b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "umount old root")  # the host's tree is gone from this namespace
    os.chdir("/")
    _readonly([work, "/dev/shm"], [*mounts, work, "/dev/shm"])
    return done


# ---------------------------------------------------------------- worker: the last step before user code


def kill_uid(uid: int) -> None:
    """kill(-1) as `uid` signals every process of that uid (and nothing else): catches double-forked daemons."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            for _ in range(3):
                os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        os._exit(0)
    os.waitpid(pid, 0)


def _children() -> list[int]:
    out = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return out


def kill_descendants() -> None:
    """As a child subreaper every orphan of the run comes to us: kill and reap until none is left."""
    while True:
        for pid in _children():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.wait()
        except ChildProcessError:
            return


def missing_protections(cfg: dict, active: list[str]) -> list[str]:
    have = set(active)
    missing = [p for p in cfg["required"] if p not in have]
    if not have & {"uid", "userns"}:
        missing.append("uid")  # a uid of its own (root) or a user namespace (not root)
    return missing


def exec_worker(cfg: dict, status: Status, active: list[str], cgroup_fds: list[int]) -> None:
    try:
        disable = set(cfg["disable"])
        keep = sorted({status.fd, *cgroup_fds})
        lo = 3
        for fd in keep:
            os.closerange(lo, fd)
            lo = fd + 1
        os.closerange(lo, 1 << 16)
        os.set_inheritable(status.fd, False)  # closed by exec: user code cannot forge the status
        if cgroup_fds:
            for fd in cgroup_fds:
                os.write(fd, b"0")  # "0": this process (whatever its pid is in here)
                os.close(fd)
            active.append("cgroup")
        lim = cfg["limits"]
        for res, value in (
            (resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1)),
            (resource.RLIMIT_AS, (lim["as_bytes"],) * 2),
            (resource.RLIMIT_FSIZE, (lim["fsize_bytes"],) * 2),
            (resource.RLIMIT_NPROC, (lim["nproc"],) * 2),
            (resource.RLIMIT_NOFILE, (lim["nofile"],) * 2),
            (resource.RLIMIT_CORE, (0, 0)),
            (resource.RLIMIT_RTPRIO, (0, 0)),  # no real-time scheduling: a SCHED_FIFO spin would starve a core
            (resource.RLIMIT_NICE, (0, 0)),
        ):
            resource.setrlimit(res, value)
        active.append("rlimits")
        if cfg["drop_privileges"]:
            os.setgroups([])
            os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])  # RLIMIT_NPROC now counts, and root files are off limits
            active += ["uid", "groups"]
        if "keyring" not in disable and _confine.apply_keyring():
            active.append("keyring")  # after the uid change: the new keyring belongs to the run's uid
        prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries (su, mount, ...) gain nothing
        active.append("nnp")
        pivoted = "pivot_root" in active
        work = cfg["workdir"]
        if "landlock" not in disable:
            if pivoted:
                read, write = ["/"], [work, "/dev/shm", *(f"/dev/{d}" for d in DEVICES)]
            else:
                read, write = cfg["landlock_read"], [work, *(f"/dev/{d}" for d in DEVICES)]
            active += _confine.apply_landlock(read, write)
        os.chdir(work)
        os.umask(0o022)
        # AF_UNIX only where no host socket is reachable: no host path (pivot_root), no abstract name (netns).
        allow_unix = pivoted and "netns" in active
        if "seccomp" not in disable and _confine.apply_seccomp(allow_unix):
            active.append("seccomp")  # last: from here on mount, keyctl, ptrace, ... are gone, for us as well
        missing = missing_protections(cfg, active)
        status.send(isolation=active, missing=missing)
        if missing and not cfg["allow_unisolated"]:
            status.send(refused=missing)
            os._exit(126)
        argv = [*cfg["argv"], ",".join(active)]  # the bootstrap installs guards for whatever did not hold
        os.execve(argv[0], argv, cfg["env"])
    except BaseException as e:  # any failure here is a setup failure the host must see
        status.send(error=f"worker setup failed: {type(e).__name__}: {e}")
    os._exit(127)


def run_init(cfg: dict, namespaces: list[str], status: Status) -> int:
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # host killed the launcher -> we die -> the pid ns dies with us
    # Python's SIGINT handler would let a same-uid program (user-namespace case) interrupt us; as pid 1 of a pid ns
    # the kernel drops default-action signals sent from inside it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # Not dumpable: a program of the same uid (user-namespace case) can neither ptrace us nor open /proc/1/fd/*
    # (the status pipe). The worker is dumpable again after its exec.
    prctl(PR_SET_DUMPABLE, 0)
    pidns = "pidns" in namespaces
    if not pidns:
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans come to us (not the host's init), so we can kill them at the end

        def on_term(signum: int, frame: object) -> None:  # the host's "time is up" when there is no pid ns
            kill_descendants()
            os._exit(0)

        signal.signal(signal.SIGTERM, on_term)
    active = list(namespaces)
    cgroup_fds = []
    for path in cfg["cgroup_procs"]:  # opened now: /sys is not in the root the worker will see
        cgroup_fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
    if "utsns" in namespaces:
        try:
            name = cfg["hostname"].encode()
            _check(libc.sethostname(name, len(name)), "sethostname")
        except OSError as e:
            status.send(warning=f"hostname: {e}")
    if "mntns" in namespaces and "pivot_root" not in cfg["disable"]:
        try:
            active += build_root(cfg, pidns)
        except OSError as e:
            status.send(warning=f"private root: {e}")
    status.send(isolation=active)
    worker = os.fork()
    if worker == 0:
        exec_worker(cfg, status, active, cgroup_fds)
    for fd in cgroup_fds:
        os.close(fd)
    while True:  # as pid 1 (or subreaper) we also inherit orphans: reap them until the worker is done
        pid, wstatus, usage = os.wait4(-1, 0)
        if pid == worker:
            break
    cpu = usage.ru_utime + usage.ru_stime
    if os.WIFSIGNALED(wstatus):
        status.send(signal=os.WTERMSIG(wstatus), cpu_s=cpu)
    else:
        status.send(exit=os.WEXITSTATUS(wstatus), cpu_s=cpu)
    if not pidns:
        if cfg["drop_privileges"]:
            kill_uid(cfg["uid"])  # no pid ns to tear down: kill stragglers by their (run-private) uid
        kill_descendants()
    return 0  # as pid 1, exiting SIGKILLs whatever is still running in the namespace


def main() -> int:
    cfg = json.loads(sys.argv[1])
    if "kill_uid" in cfg:  # the host's cleanup after a timeout when there was no pid namespace
        kill_uid(cfg["kill_uid"])
        return 0
    status = Status(cfg["status_fd"])
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the host process died: so do we (and init, and the pid ns)
    if os.getppid() != cfg["host_pid"]:
        return 70  # it died before the line above
    try:
        namespaces = unshare_namespaces(cfg)
        child = os.fork()  # the first child after unshare(CLONE_NEWPID) is pid 1 of the new namespace
        if child == 0:
            try:
                code = run_init(cfg, namespaces, status)
            except BaseException as e:
                status.send(error=f"sandbox init failed: {type(e).__name__}: {e}")
                code = 70
            os._exit(code)
        # The host's "time is up" (SIGTERM) goes to init, which kills the run's processes when there is no pid ns.
        signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(child, signal.SIGTERM))
        os.waitpid(child, 0)
    except BaseException as e:
        status.send(error=f"sandbox launcher failed: {type(e).__name__}: {e}")
        return 70
    return 0


if __name__ == "__main__":
    sys.exit(main())
