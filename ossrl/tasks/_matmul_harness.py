"""The matmul harness: the main program of one sandboxed run (this file's text is what runs; it imports nothing
from ossrl). The submission is ``solution.py`` in the work dir; stdin holds a nonce line and the spec
``{"allowed": [...], "cases": [[A, B], ...], "timed": [[A, B], ...]}`` (each timed pair: one timed call).

What keeps the policy's code from fooling it (the parent process does the grading; this only runs and times):
- stdin is read whole before the submission runs: it cannot read the inputs ahead, and the inputs live only in
  this function's locals (frames are out of reach: sys._getframe, gc and tracing are blocked by an audit hook);
- the submission runs with its own builtins dict: no exec/eval/compile/open/getattr..., and ``__import__`` only
  admits the allowed modules (all imported here first, so no import happens once it runs);
- the clocks and os.write are captured before it runs; after timing, each clock is checked to be the same
  object, and a replaced one is reported as tampering;
- the result must be a plain list of lists of int/float (checked by exact type, so no lazy objects that compute
  outside the timed call), written to fd 1 after the nonce the submission never saw.
"""


def _main() -> None:
    import builtins
    import json
    import os
    import sys
    import time

    write, exit_now, perf, kind, dumps, n_items = os.write, os._exit, time.perf_counter, type, json.dumps, len
    clock_names = ("perf_counter", "perf_counter_ns", "time", "time_ns", "monotonic", "monotonic_ns", "process_time")
    clocks = {name: getattr(time, name) for name in clock_names}
    raw = sys.stdin.buffer.read()
    nonce, _, payload = raw.partition(b"\n")
    spec = json.loads(payload)
    allowed = frozenset(spec["allowed"])
    for module in sorted(allowed | {"collections.abc"}):  # now, so that no import happens once the code runs
        try:
            __import__(module)
        except ImportError:
            pass

    def report(**result: object) -> None:
        write(1, b"\n" + nonce + b" " + dumps(result).encode() + b"\n")
        exit_now(0)

    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):  # noqa: A002
        if level != 0 or name.split(".")[0] not in allowed:
            raise ImportError(f"import of {name!r} is not allowed in this task")
        return real_import(name, globals, locals, fromlist, level)

    blocked = {"__import__", "exec", "eval", "compile", "open", "input", "breakpoint", "globals", "locals", "vars",
               "getattr", "setattr", "delattr", "help", "exit", "quit", "memoryview"}  # fmt: skip
    safe_builtins = {k: v for k, v in builtins.__dict__.items() if k not in blocked}
    safe_builtins["__import__"] = guarded_import
    armed = []
    denied_events = {"sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile", "sys.addaudithook",
                     "gc.get_objects", "gc.get_referrers", "gc.get_referents", "compile", "import", "open",
                     "code.__new__", "function.__new__", "os.system", "subprocess.Popen"}  # fmt: skip

    def hook(event: str, args: tuple) -> None:
        if armed and (event in denied_events or event.startswith(("ctypes.", "os.", "socket."))):
            raise RuntimeError(f"{event} is not allowed in this task")

    try:
        with open("solution.py", "rb") as f:
            code = compile(f.read(), "solution.py", "exec", dont_inherit=True)
    except SyntaxError as err:
        report(error=f"syntax error: {err.msg} (line {err.lineno})")
    namespace = {"__name__": "solution", "__builtins__": safe_builtins}
    sys.addaudithook(hook)
    armed.append(True)
    try:
        exec(code, namespace)
        matmul = namespace.get("matmul")
        if not callable(matmul):
            report(error="the code defines no function matmul")
        outputs = [matmul(a, b) for a, b in spec["cases"]]
        elapsed = []
        for a, b in spec["timed"]:
            start = perf()
            out = matmul(a, b)
            elapsed.append(perf() - start)
            outputs.append(out)
    except BaseException as err:  # noqa: BLE001 (SystemExit and KeyboardInterrupt too: the submission's fault)
        report(error=f"{kind(err).__name__}: {str(err)[:300]}")
    tampered = sorted(name for name, fn in clocks.items() if getattr(time, name) is not fn)
    plain = []
    for out in outputs:  # exact types: nothing can run after the timer stopped
        if kind(out) is not list or not all(kind(row) is list for row in out):
            report(error=f"matmul returned {kind(out).__name__}, not a list of lists", tampered=tampered)
        if not all(kind(x) is int or kind(x) is float for row in out for x in row):
            report(error="matmul's result holds values that are not int or float", tampered=tampered)
        plain.append([[x for x in row] for row in out])
    report(outputs=plain, elapsed=elapsed, tampered=tampered, n=n_items(plain))


_main()
