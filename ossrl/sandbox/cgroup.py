"""One cgroup per run (host side): a memory limit and a process limit for the run's WHOLE process tree.

rlimits are per process (six children of a memory_mb=1024 run held 4.8 GB); a cgroup counts the tree together,
and it lists every process of the run, so the host can check that nothing outlived the run and kill what did.
cgroup v2 when our own cgroup delegates memory and pids to its children, else cgroup v1 (memory + pids
hierarchies). The group is made under our own cgroup, `ossrl-sbx-<pid>-<random>`, and removed after the run.
The worker joins it itself (it writes "0" into the cgroup.procs files opened for it), so only user code is counted.
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import time
from dataclasses import dataclass
from functools import cache

PREFIX = "ossrl-sbx-"


def _unescape(path: str) -> str:
    return path.encode().decode("unicode_escape")


@cache
def _hierarchies() -> dict[str, str]:
    """{'v2' | 'memory' | 'pids': the directory of OUR cgroup in that hierarchy}."""
    mounts: dict[str, tuple[str, str]] = {}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rfields = left.split(), right.split()
                fstype, opts = rfields[0], rfields[2] if len(rfields) > 2 else ""
                root, point = _unescape(fields[3]), _unescape(fields[4])
                if fstype == "cgroup2":
                    mounts.setdefault("v2", (point, root))
                elif fstype == "cgroup":
                    for ctrl in opts.split(","):
                        if ctrl in ("memory", "pids"):
                            mounts.setdefault(ctrl, (point, root))
        own: dict[str, str] = {}
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                for ctrl in ctrls.split(",") if ctrls else ["v2"]:
                    own[ctrl] = path
    except OSError:
        return {}
    out = {}
    for key, (point, root) in mounts.items():
        path = own.get(key)
        if path is None:
            continue
        rel = path[len(root) :] if root != "/" and path.startswith(root) else path
        out[key] = os.path.join(point, rel.lstrip("/"))
    return out


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _sweep(parent: str) -> None:
    """Remove empty run groups that a killed host process left behind (their owner pid is gone)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if name.startswith(PREFIX):
            owner = name[len(PREFIX) :].split("-")[0]
            if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
                try:
                    os.rmdir(os.path.join(parent, name))
                except OSError:
                    pass


_swept: set[str] = set()


@dataclass
class RunCgroup:
    version: int
    dirs: list[str]  # v2: [the group]; v1: [memory group, pids group]

    @classmethod
    def create(cls, memory_bytes: int, max_tasks: int) -> tuple[RunCgroup | None, str]:
        """(the group, "") or (None, why there is none)."""
        hier = _hierarchies()
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        why = "no cgroup hierarchy with memory and pids"
        if "v2" in hier:
            parent = hier["v2"]
            try:
                enabled = _read(os.path.join(parent, "cgroup.subtree_control")).split()
                if not {"memory", "pids"} <= set(enabled):
                    _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +pids")
                return cls._make(2, [os.path.join(parent, name)], memory_bytes, max_tasks), ""
            except OSError as e:
                why = (
                    f"cgroup v2 at {parent}: {e.strerror or e} (run the trainer in a cgroup whose children may get "
                    "memory and pids: a delegated one, e.g. systemd-run --scope -p Delegate=yes, or a container with "
                    "a writable /sys/fs/cgroup and its processes moved into a leaf)"
                )
        if "memory" in hier and "pids" in hier:
            dirs = [os.path.join(hier["memory"], name), os.path.join(hier["pids"], name)]
            try:
                return cls._make(1, dirs, memory_bytes, max_tasks), ""
            except OSError as e:
                why = f"cgroup v1 at {hier['memory']}, {hier['pids']}: {e.strerror or e}"
        return None, why

    @classmethod
    def _make(cls, version: int, dirs: list[str], memory_bytes: int, max_tasks: int) -> RunCgroup:
        for d in dirs:
            parent = os.path.dirname(d)
            if parent not in _swept:
                _swept.add(parent)
                _sweep(parent)
        made: list[str] = []
        try:
            for d in dirs:
                os.mkdir(d, 0o755)
                made.append(d)
            if version == 2:
                (d,) = dirs
                _write(f"{d}/memory.max", str(memory_bytes))
                if os.path.exists(f"{d}/memory.swap.max"):
                    _write(f"{d}/memory.swap.max", "0")
                _write(f"{d}/pids.max", str(max_tasks))
            else:
                mem, pids = dirs
                _write(f"{mem}/memory.limit_in_bytes", str(memory_bytes))
                if os.path.exists(f"{mem}/memory.memsw.limit_in_bytes"):  # swap accounting on: RAM + swap
                    _write(f"{mem}/memory.memsw.limit_in_bytes", str(memory_bytes))
                else:
                    try:
                        _write(f"{mem}/memory.swappiness", "0")
                    except OSError:
                        pass
                _write(f"{pids}/pids.max", str(max_tasks))
        except OSError:
            for d in reversed(made):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
            raise
        return cls(version, dirs)

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def pids(self) -> set[int]:
        out: set[int] = set()
        for path in self.procs_files:
            try:
                out |= {int(p) for p in _read(path).split()}
            except (OSError, ValueError):
                pass
        return out

    def oom_kills(self) -> int:
        path = f"{self.dirs[0]}/memory.events" if self.version == 2 else f"{self.dirs[0]}/memory.oom_control"
        try:
            for line in _read(path).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def _kill_members(self) -> None:
        if self.version == 2 and os.path.exists(f"{self.dirs[0]}/cgroup.kill"):
            try:
                _write(f"{self.dirs[0]}/cgroup.kill", "1")
                return
            except OSError:
                pass
        for pid in self.pids():
            try:  # a pidfd pins the process: check it is still ours before the signal (no pid-reuse race)
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if f"/{os.path.basename(self.dirs[-1])}" in _read(f"/proc/{pid}/cgroup"):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(fd)

    def close(self, timeout_s: float = 5.0) -> tuple[int, list[str]]:
        """Kill whatever is still in the group and remove it: (how many processes had to be killed, the
        directories that could not be removed, with why)."""
        leftover = len(self.pids())
        deadline = time.monotonic() + timeout_s
        remaining, failed = list(self.dirs), []
        while remaining:
            if self.pids():
                self._kill_members()
            for d in list(remaining):
                try:
                    os.rmdir(d)
                    remaining.remove(d)
                except FileNotFoundError:
                    remaining.remove(d)
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        remaining.remove(d)
                        failed.append(f"{d}: {e.strerror}")
            if remaining:
                time.sleep(0.01)
        return leftover, failed
