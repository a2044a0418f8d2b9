"""Confinement of one process, applied last before exec: seccomp filter, Landlock, fresh session keyring.

Stdlib only (the launcher runs as `python -I -S`). Each `apply_*` returns whether it held; none raises for a
feature the kernel lacks, so the caller can report exactly what is active.

Why our own BPF and not libseccomp: the launcher cannot import site-packages (-I -S), the filter is a short
deny list with three argument checks, and every number in it is checked against the kernel headers by a test.
The filter allows by default and denies the kernel surfaces sandboxed code has no use for (a full allow list would
break model-written programs on every new glibc or library); the namespaces, the read-only tree and the uid do the
isolating, the filter takes away the ways around them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import struct

libc = ctypes.CDLL(None, use_errno=True)
_n = ctypes.c_long  # variadic syscall(): every integer at full width

# ---------------------------------------------------------------- syscall numbers (checked in tests against headers)

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# name: (x86_64, aarch64 = asm-generic). None: the call does not exist there.
SYSCALLS: dict[str, tuple[int | None, int | None]] = {
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "unshare": (272, 97),
    "setns": (308, 268),
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "pidfd_getfd": (438, 438),
    "process_madvise": (440, 440),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "fanotify_init": (300, 262),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "reboot": (169, 142),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "acct": (163, 89),
    "sethostname": (170, 161),
    "setdomainname": (171, 162),
    "syslog": (103, 116),
    "vhangup": (153, 58),
    "settimeofday": (164, 170),
    "clock_settime": (227, 112),
    "clock_adjtime": (305, 266),
    "adjtimex": (159, 171),
    "name_to_handle_at": (303, 264),
    "open_by_handle_at": (304, 265),
    "lookup_dcookie": (212, 18),
    "quotactl": (179, 60),
    "quotactl_fd": (443, 443),
    "nfsservctl": (180, 42),
    "iopl": (172, None),
    "ioperm": (173, None),
    "modify_ldt": (154, None),
    "uselib": (134, None),
    "_sysctl": (156, None),
    "create_module": (174, None),
    "get_kernel_syms": (177, None),
    "query_module": (178, None),
    # inspected, not denied outright
    "socket": (41, 198),
    "clone": (56, 220),
    "clone3": (435, 435),
    "ioctl": (16, 29),
    # used by the launcher / the keyring and Landlock helpers
    "landlock_create_ruleset": (444, 444),
    "landlock_add_rule": (445, 445),
    "landlock_restrict_self": (446, 446),
}
INSPECTED = {"socket", "clone", "clone3", "ioctl", "landlock_create_ruleset", "landlock_add_rule"}
INSPECTED |= {"landlock_restrict_self"}
DENIED = [name for name in SYSCALLS if name not in INSPECTED]  # -> EPERM

AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
CLONE_NS_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
X32_SYSCALL_BIT = 0x40000000


def arch() -> str | None:
    machine = platform.machine()
    return machine if machine in AUDIT_ARCH else None


def nr(name: str, machine: str | None = None) -> int | None:
    machine = machine or arch()
    if machine is None:
        return None
    return SYSCALLS[name][0 if machine == "x86_64" else 1]


# ---------------------------------------------------------------- seccomp (classic BPF)

SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_NR, _ARCH, _ARG0, _ARG1 = 0, 4, 16, 24  # offsets in struct seccomp_data (args: low 32 bits, little endian)
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


class _Asm:
    """A few-line assembler: jump targets by label, resolved to the forward offsets classic BPF wants."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int | str, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int, jt: int | str = 0, jf: int | str = 0) -> None:
        self.code.append((code, jt, jf, k & 0xFFFFFFFF))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> bytes:
        out = []
        for i, (code, jt, jf, k) in enumerate(self.code):
            jt, jf = (self.labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf))
            if not (0 <= jt < 256 and 0 <= jf < 256):
                raise ValueError("seccomp program: jump out of range")
            out.append(struct.pack("<HBBI", code, jt, jf, k))
        return b"".join(out)


def seccomp_program(machine: str, allow_unix: bool) -> bytes:
    def n(name: str) -> int | None:
        return nr(name, machine)

    a = _Asm()
    a.op(_LD_W_ABS, _ARCH)
    a.op(_JEQ, AUDIT_ARCH[machine], 0, "kill")  # any other ABI (i386 via int 0x80): numbers mean other calls
    a.op(_LD_W_ABS, _NR)
    if machine == "x86_64":
        a.op(_JGE, X32_SYSCALL_BIT, "enosys", 0)
    a.op(_JEQ, n("socket"), "socket", 0)
    a.op(_JEQ, n("clone"), "clone", 0)
    a.op(_JEQ, n("ioctl"), "ioctl", 0)
    a.op(_JEQ, n("clone3"), "enosys", 0)  # flags sit in memory we cannot inspect; glibc falls back to clone
    for name in DENIED:
        if (num := n(name)) is not None:
            a.op(_JEQ, num, "eperm", 0)
    a.op(_RET, SECCOMP_RET_ALLOW)
    a.label("socket")  # address families: IP (dead ends in the empty network namespace), UNIX where harmless
    a.op(_LD_W_ABS, _ARG0)
    a.op(_JEQ, AF_INET, "allow", 0)
    a.op(_JEQ, AF_INET6, "allow", 0)
    if allow_unix:
        a.op(_JEQ, AF_UNIX, "allow", 0)
    a.op(_RET, SECCOMP_RET_ERRNO | errno.EPERM)
    a.label("clone")
    a.op(_LD_W_ABS, _ARG0)
    a.op(_JSET, CLONE_NS_FLAGS, "eperm", "allow")
    a.label("ioctl")
    a.op(_LD_W_ABS, _ARG1)
    a.op(_JEQ, TIOCSTI, "eperm", 0)
    a.op(_JEQ, TIOCLINUX, "eperm", "allow")
    a.label("allow")
    a.op(_RET, SECCOMP_RET_ALLOW)
    a.label("eperm")
    a.op(_RET, SECCOMP_RET_ERRNO | errno.EPERM)
    a.label("enosys")
    a.op(_RET, SECCOMP_RET_ERRNO | errno.ENOSYS)
    a.label("kill")
    a.op(_RET, SECCOMP_RET_KILL_PROCESS)
    return a.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def apply_seccomp(allow_unix: bool) -> bool:
    """Install the filter on this (single-threaded) process; needs no_new_privs or CAP_SYS_ADMIN."""
    machine = arch()
    if machine is None:
        return False
    prog = seccomp_program(machine, allow_unix)
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.addressof(buf))
    ul = ctypes.c_ulong
    ret = libc.prctl(ctypes.c_int(PR_SET_SECCOMP), ul(SECCOMP_MODE_FILTER), ctypes.byref(fprog), ul(0), ul(0))
    return ret == 0


# ---------------------------------------------------------------- keyring

KEYCTL_JOIN_SESSION_KEYRING = 1


def apply_keyring() -> bool:
    """A new anonymous session keyring: the parent's session keys are no longer possessed (so not readable)."""
    num = nr("keyctl")
    return num is not None and libc.syscall(_n(num), _n(KEYCTL_JOIN_SESSION_KEYRING), None) > 0


# ---------------------------------------------------------------- Landlock

LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_TRUNCATE, FS_IOCTL_DEV = 1 << 14, 1 << 15
FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
READ_RIGHTS = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    num = nr("landlock_create_ruleset")
    if num is None:
        return 0
    return max(0, libc.syscall(_n(num), None, _n(0), _n(LANDLOCK_CREATE_RULESET_VERSION)))


def apply_landlock(read: list[str], write: list[str]) -> list[str]:
    """Reads (and exec) beneath `read`, everything beneath `write`, no other path; where the kernel can: no TCP,
    no signals and no abstract unix sockets out of this process tree. Returns what held ([] = nothing)."""
    abi = landlock_abi()
    if abi < 1:
        return []
    handled_fs = FS_BY_ABI[max(k for k in FS_BY_ABI if k <= abi)]
    attr = _RulesetAttr(handled_fs, 0, 0)
    held = ["landlock"]
    if abi >= 4:
        attr.net = NET_BIND_TCP | NET_CONNECT_TCP
        held.append("landlock_net")
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        held.append("landlock_scope")
    size = ctypes.sizeof(attr) if abi >= 6 else (16 if abi >= 4 else 8)
    fd = libc.syscall(_n(nr("landlock_create_ruleset")), ctypes.byref(attr), _n(size), _n(0))
    if fd < 0:
        return []
    try:
        for paths, rights in ((read, READ_RIGHTS), (write, handled_fs)):
            for path in paths:
                try:
                    pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    is_dir = stat.S_ISDIR(os.fstat(pfd).st_mode)
                    allowed = (rights if is_dir else rights & FILE_RIGHTS) & handled_fs
                    rule = _PathBeneath(allowed, pfd)
                    num = nr("landlock_add_rule")
                    if libc.syscall(_n(num), _n(fd), _n(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule), _n(0)):
                        return []
                finally:
                    os.close(pfd)
        if libc.syscall(_n(nr("landlock_restrict_self")), _n(fd), _n(0)) != 0:
            return []
    finally:
        os.close(fd)
    return held
