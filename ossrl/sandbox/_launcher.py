"""Between the host and the sandboxed program: namespaces, mounts, limits, privilege drop, reaping.

Not imported by ossrl: `runner.py` executes it as `python -I -S _launcher.py CONFIG_JSON` (stdlib only, since
-I -S sees no site-packages). It runs with the caller's privileges (root on CI) and never runs user code itself.

Process tree:  launcher (host pid ns, new mount/net/ipc ns)
                 └─ init (pid 1 of a new pid ns: mounts, then reaps; its exit kills everything left in the ns)
                      └─ worker (rlimits, unprivileged uid, no_new_privs) --exec--> python bootstrap -> user code
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
import stat
import sys

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 1
SYS_MOUNT_SETATTR = 442  # same number on every architecture (unified syscall table since 5.x)
_MNT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}

libc = ctypes.CDLL(None, use_errno=True)


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
    n = ctypes.c_long  # variadic syscall(): pass every integer at full width
    ret = libc.syscall(
        n(SYS_MOUNT_SETATTR), n(AT_FDCWD), _b(path), n(flags), ctypes.byref(attr), n(ctypes.sizeof(attr))
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
    wanted = {"mntns": CLONE_NEWNS, "pidns": CLONE_NEWPID, "netns": CLONE_NEWNET, "ipcns": CLONE_NEWIPC}
    if os.geteuid() != 0:
        # Unprivileged: a user namespace grants the capabilities to create the others (if the OS allows it).
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


# ---------------------------------------------------------------- mounts (init, inside the new mount ns)


def _traversable(path: str, uid: int, gid: int) -> bool:
    st = os.stat(path)
    mode = st.st_mode
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(mode & stat.S_IXGRP)
    return bool(mode & stat.S_IXOTH)


def _blocked_ancestor(path: str, uid: int, gid: int) -> str | None:
    """The top-most directory on the way to `path` that `uid` may not enter (e.g. /root, mode 700)."""
    cur = "/"
    for part in path.strip("/").split("/"):
        cur = os.path.join(cur, part)
        if not _traversable(cur, uid, gid):
            return cur
    return None


def expose_paths(paths: list[str], uid: int, gid: int) -> list[str]:
    """Make the interpreter (and our temp dir) reachable for `uid` without opening anything else up.

    When Python lives under a private directory (pyenv in /root, mode 700), cover that directory with an empty
    tmpfs and bind-mount back only the needed subtrees. Directories are created only inside our fresh tmpfs.
    """
    paths = sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)})
    paths = [p for p in paths if not any(p != q and p.startswith(q + "/") for q in paths)]  # ancestors cover them
    todo = [(p, a) for p in paths if (a := _blocked_ancestor(p, uid, gid)) is not None and a != "/"]
    fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p, _ in todo}  # before anything gets covered
    covered: list[str] = []
    for p, top in todo:
        if not any(top == c or top.startswith(c + "/") for c in covered):
            mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
            covered.append(top)
        os.makedirs(p, mode=0o755, exist_ok=True)
        mount(f"/proc/self/fd/{fds[p]}", p, None, MS_BIND | MS_REC)
        os.close(fds[p])
    return covered


def _copy_tree(src: str, dst: str, uid: int, gid: int) -> None:
    for name in os.listdir(src):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s) and not os.path.islink(s):
            os.mkdir(d, 0o755)
            _copy_tree(s, d, uid, gid)
        else:
            shutil.copy2(s, d, follow_symlinks=False)
        os.lchown(d, uid, gid)


def setup_workdir(work: str, uid: int, gid: int, disk_mb: int) -> str:
    """Put the working directory on a size-capped tmpfs (bounds disk use); copy the caller's files in."""
    src_fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        mount(
            "tmpfs",
            work,
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            f"size={disk_mb}m,nr_inodes=65536,mode=0700,uid={uid},gid={gid}",
        )
    except OSError:
        mount(work, work, None, MS_BIND)  # its own mount, so it can stay writable when the rest turns read-only
        os.close(src_fd)
        return "bind"
    _copy_tree(f"/proc/self/fd/{src_fd}", work, uid, gid)
    os.close(src_fd)
    return "tmpfs"


def _remount_all_readonly(keep: set[str]) -> None:
    """Kernels before 5.12 lack mount_setattr: remount each mount read-only, keeping its other flags."""
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f]
    for row in rows:
        target = row[4].encode().decode("unicode_escape")
        if target in keep:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in row[5].split(","):
            flags |= _MNT_FLAGS.get(opt, 0)
        try:
            mount(None, target, None, flags)
        except OSError:
            if target == "/":
                raise


def setup_mounts(cfg: dict, pidns: bool, status: Status) -> list[str]:
    """Returns what held. A step that fails is reported and skipped; the bootstrap's guards cover the gap."""
    uid, gid, work = cfg["uid"], cfg["gid"], cfg["workdir"]
    done: list[str] = []
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount may propagate back to the host
    if expose_paths(cfg["expose"], uid, gid):
        done.append("expose")
    done.append("work_" + setup_workdir(work, uid, gid, cfg["disk_mb"]))
    if pidns:
        try:  # a /proc of our own pid ns: host processes (and their cmdlines) become invisible
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            done.append("proc")
        except OSError as e:
            status.send(warning=f"private /proc: {e}")
    try:
        try:
            mount_setattr("/", recursive=True, set_=MOUNT_ATTR_RDONLY)
            mount_setattr(work, recursive=False, clr=MOUNT_ATTR_RDONLY)
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EINVAL):
                raise
            _remount_all_readonly({work})
        done.append("rofs")
    except OSError as e:
        status.send(warning=f"read-only root: {e}")
    try:  # multiprocessing needs a writable /dev/shm; give it a small private one
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,nr_inodes=4096,mode=1777")
    except OSError:
        pass
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


def exec_worker(cfg: dict, status: Status) -> None:
    try:
        os.set_inheritable(status.fd, False)  # closed by exec: user code cannot forge the status
        os.closerange(3, status.fd)
        os.closerange(status.fd + 1, 1 << 16)
        lim = cfg["limits"]
        for res, value in (
            (resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1)),
            (resource.RLIMIT_AS, (lim["as_bytes"],) * 2),
            (resource.RLIMIT_FSIZE, (lim["fsize_bytes"],) * 2),
            (resource.RLIMIT_NPROC, (lim["nproc"],) * 2),
            (resource.RLIMIT_NOFILE, (lim["nofile"],) * 2),
            (resource.RLIMIT_CORE, (0, 0)),
        ):
            resource.setrlimit(res, value)
        if cfg["drop_privileges"]:
            os.setgroups([])
            os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])  # RLIMIT_NPROC now counts, and root files are off limits
        prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries (su, mount, ...) gain nothing
        os.chdir(cfg["workdir"])
        os.umask(0o022)
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except BaseException as e:  # any failure here is a setup failure the host must see
        status.send(error=f"worker setup failed: {type(e).__name__}: {e}")
    os._exit(127)


def run_init(cfg: dict, namespaces: list[str], status: Status) -> int:
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # host killed the launcher -> we die -> the pid ns dies with us
    # Python's SIGINT handler would let a same-uid program (user-namespace case) interrupt us; as pid 1 of a pid ns
    # the kernel drops default-action signals sent from inside it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if "pidns" not in namespaces:
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans come to us (not the host's init), so we can reap them
    isolation = list(namespaces)
    if "mntns" in namespaces:
        isolation += setup_mounts(cfg, "pidns" in namespaces, status)
    if cfg["drop_privileges"]:
        isolation.append("uid")
    status.send(isolation=isolation)
    cfg["argv"].append(",".join(isolation))  # the bootstrap installs guards for whatever did not hold
    worker = os.fork()
    if worker == 0:
        exec_worker(cfg, status)
    while True:  # as pid 1 we also inherit orphans: reap them until the worker is done
        pid, wstatus, usage = os.wait4(-1, 0)
        if pid == worker:
            break
    cpu = usage.ru_utime + usage.ru_stime
    if os.WIFSIGNALED(wstatus):
        status.send(signal=os.WTERMSIG(wstatus), cpu_s=cpu)
    else:
        status.send(exit=os.WEXITSTATUS(wstatus), cpu_s=cpu)
    if "pidns" not in namespaces and cfg["drop_privileges"]:
        kill_uid(cfg["uid"])  # no pid ns to tear down: kill stragglers by their (run-private) uid
        while True:  # and reap them: as subreaper we inherited them all, and all of them just got SIGKILL
            try:
                os.wait()
            except ChildProcessError:
                break
    return 0  # as pid 1, exiting SIGKILLs whatever is still running in the namespace


def main() -> int:
    cfg = json.loads(sys.argv[1])
    if "kill_uid" in cfg:  # the host's cleanup after a timeout when there was no pid namespace
        kill_uid(cfg["kill_uid"])
        return 0
    status = Status(cfg["status_fd"])
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
        os.waitpid(child, 0)
    except BaseException as e:
        status.send(error=f"sandbox launcher failed: {type(e).__name__}: {e}")
        return 70
    return 0


if __name__ == "__main__":
    sys.exit(main())
