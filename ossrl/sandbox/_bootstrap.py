"""First code in the sandboxed interpreter: compile and run the user's program, report how it ended.

Passed as `python -I -c <this source> MAIN_PY WORKDIR ISOLATION`, already unprivileged. The exit code carries the
outcome (the user's code can fake it, but only to misreport its own run): 0 ok, EXIT_SYNTAX, EXIT_MEMORY, 1 for any
other uncaught exception, or whatever the program passed to sys.exit().
Where the OS gave no network namespace / private read-only root / pid namespace (a run the caller allowed without
them), audit hooks stand in (best effort: they stop ordinary Python code, not code that corrupts the interpreter).
"""

import sys

EXIT_SYNTAX, EXIT_MEMORY = 210, 211
_BLOCKED_SYMBOLS = {"socket", "connect", "bind", "sendto", "syscall", "open", "open64", "openat", "creat", "kill"}
_EXEC_EVENTS = {"os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "pty.spawn"}
_PATH_EVENTS = {"os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.symlink", "os.link", "os.chmod", "os.truncate"}


def _install_guards(workdir: str, isolation: set) -> None:
    import os
    import socket

    guard_net, guard_fs = "netns" not in isolation, "pivot_root" not in isolation
    guard_kill = "pidns" not in isolation and "uid" not in isolation
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    me = os.getpid()

    def inside(path: object) -> bool:
        if isinstance(path, int):
            return True  # an fd the process already holds
        real = os.path.realpath(os.fsdecode(path))
        return real == workdir or real.startswith(workdir + "/") or real.startswith("/dev/")

    def hook(event: str, args: tuple) -> None:
        deny = False
        if guard_net:
            if event == "socket.__new__":
                deny = args[1] != socket.AF_UNIX
            elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
                deny = args[0].family != socket.AF_UNIX
            elif event in _EXEC_EVENTS or (event == "ctypes.dlsym" and args[1] in _BLOCKED_SYMBOLS):
                deny = True  # no `curl`, no raw libc socket()
        if guard_fs and not deny:
            if event == "open":
                mode, flags = args[1] or "", args[2] or 0
                deny = (any(c in mode for c in "wax+") or flags & write_flags) and not inside(args[0])
            elif event in _PATH_EVENTS:
                deny = not inside(args[0]) or (event in ("os.rename", "os.symlink", "os.link") and not inside(args[1]))
        if guard_kill and event in ("os.kill", "os.killpg") and not deny:
            deny = args[0] <= 0 or (event == "os.kill" and args[0] != me and args[0] == os.getppid())
        if deny:
            raise PermissionError(f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)


def _main() -> None:
    import builtins
    import linecache
    import os
    import traceback
    import types

    main_py, workdir, isolation = sys.argv[1], sys.argv[2], set(sys.argv[3].split(","))
    with open(main_py, "rb") as f:
        src = f.read()
    if not {"netns", "pivot_root"} <= isolation or not ({"pidns", "uid"} & isolation):
        _install_guards(workdir, isolation)
    try:
        code = compile(src, "main.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:  # ValueError: NUL bytes in the source
        traceback.print_exception(type(e), e, None)
        sys.stderr.flush()
        os._exit(EXIT_SYNTAX)
    except MemoryError:
        os.write(2, b"MemoryError\n")
        os._exit(EXIT_MEMORY)
    # Tracebacks show the user's lines without a file on disk; mtime None keeps checkcache from dropping them.
    linecache.cache["main.py"] = (len(src), None, src.decode("utf-8", "replace").splitlines(True), "main.py")
    module = types.ModuleType("__main__")
    module.__dict__.update(__builtins__=builtins, __file__="main.py")
    sys.modules["__main__"] = module
    sys.argv = ["main.py"]
    sys.path.insert(0, workdir)  # as `python main.py` would: the caller's files are importable
    del src
    try:
        exec(code, module.__dict__)
    except SystemExit:
        raise
    except BaseException as e:
        status = EXIT_MEMORY if isinstance(e, MemoryError) else 1
        try:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
        except BaseException:  # no memory left to format it
            os.write(2, f"{type(e).__name__}\n".encode())
        del e
        sys.exit(status)


_main()
