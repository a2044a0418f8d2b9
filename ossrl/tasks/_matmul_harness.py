"""The matmul harness: the main program of one sandboxed run (this file's text is what runs; it imports nothing
from ossrl). Two processes:

- the PARENT reads stdin (a nonce line, then the spec), times every call on its own clock and writes the one
  report (after the nonce) on fd 1. It never runs a line of the submission and holds everything secret.
- the CHILD, forked before stdin is read (its memory never held the nonce or an input it was not yet asked
  about), runs ``solution.py``. Its fds 0, 1 and 2 are /dev/null; its only way out is a pipe the parent reads.

One call: the parent encodes the inputs (untimed), checks that the child has said nothing unasked, starts its
clock, writes the request, reads the child's whole answer and stops the clock. The child decodes the inputs,
calls matmul, checks the result's types (plain lists of int/float) and sends it as raw doubles, all inside the
timed window: whatever the submission defers (a placeholder filled in later, a lazy object, work in __del__)
either lands in the window or misses the answer, which is already out of its process. The parent checks the
answer's framing and shape and forwards its bytes; the grader decodes them and compares with its own products.

Even full control of the child's interpreter gives nothing that forges a result: the parent's clock and the
grader's reference are in other processes, the parent is not dumpable (no /proc/PID/mem, /proc/PID/fd or ptrace
from the child; made so before it reads stdin and before the child runs a line of the submission, and it refuses
to go on without it), the child cannot fork (RLIMIT_NPROC 0), and any exit of the parent other than a clean
report is a crash for the grader. The child's restricted builtins, import gate and audit hook (frames via
"object.__getattr__", sys._getframe, gc, compile, open, os.*, ctypes...) are a second layer behind the AST gate.

stdin after the nonce line: JSON ``{"allowed": [...], "cases": [[A, B], ...], "timed": [[A, B], ...]}``, each
matrix ``[typecode "q"|"d", rows, cols, base64 of the native-endian values]``. Report: ``{"outputs": [[rows,
cols, base64 doubles or ""], ...], "elapsed": [seconds per timed call]}`` or ``{"error": "..."}``.
"""

import os

OK, ERR = b"o", b"e"  # answer kinds; an answer is kind (1 byte) + payload length (uint32) + payload
MAX_ERROR_BYTES = 4096


def _read_exactly(fd, n):
    chunks, left = [], n
    while left:
        data = os.read(fd, min(left, 1 << 20))
        if not data:
            return None
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _child(req_fd, ans_fd):
    """The submission's process. Never returns."""
    import array
    import builtins
    import json
    import resource
    import struct
    import sys

    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    keep = sorted({0, 1, 2, req_fd, ans_fd})  # nothing else: the parent's stdout is out of reach
    for low, high in zip(keep, [*keep[1:], 1 << 16], strict=True):
        os.closerange(low + 1, high)
    read_exactly, write_all, exit_now = _read_exactly, _write_all, os._exit
    kind, n_items, number, new_array, unpack, pack = type, len, {int, float}, array.array, struct.unpack, struct.pack

    def answer(tag, payload):
        write_all(ans_fd, tag + pack("<I", n_items(payload)) + payload)

    def fail(message):
        answer(ERR, message.encode("utf-8", "replace")[:MAX_ERROR_BYTES])

    def describe(err):
        try:
            text = str(err)[:300]
        except BaseException:  # noqa: BLE001 (a __str__ that raises is the submission's business)
            text = "(unprintable)"
        return f"{kind(err).__name__}: {text}"

    header = read_exactly(req_fd, 4)
    if header is None:
        exit_now(0)
    allowed = frozenset(json.loads(read_exactly(req_fd, unpack("<I", header)[0])))
    for module in sorted(allowed | {"collections.abc"}):  # now, so that no import happens once the code runs
        try:
            __import__(module)
        except ImportError:
            pass
    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):  # noqa: A002
        if level != 0 or name.split(".")[0] not in allowed:
            raise ImportError(f"import of {name!r} is not allowed in this task")
        return real_import(name, globals, locals, fromlist, level)

    blocked = {"__import__", "exec", "eval", "compile", "open", "input", "breakpoint", "globals", "locals", "vars",
               "getattr", "setattr", "delattr", "help", "exit", "quit", "memoryview"}  # fmt: skip
    safe_builtins = {k: v for k, v in builtins.__dict__.items() if k not in blocked}
    safe_builtins["__import__"] = guarded_import
    # "object.__getattr__" is how CPython audits reads of tb_frame, gi_frame, cr_frame, f_code, __code__...:
    # every way from an object to a frame passes through one of them.
    denied = {"object.__getattr__", "object.__setattr__", "object.__delattr__", "sys._getframe",
              "sys._getframemodulename", "sys._current_frames", "sys._current_exceptions", "sys.settrace",
              "sys.setprofile", "sys.addaudithook", "compile", "exec", "import", "open", "code.__new__",
              "function.__new__", "marshal.loads", "marshal.load", "builtins.input", "subprocess.Popen",
              "pty.spawn"}  # fmt: skip
    denied_prefixes = ("gc.", "ctypes.", "os.", "socket.", "cpython.", "sys.monitoring", "_posixsubprocess.")
    state = {"armed": False, "exec_left": 1}

    def hook(event, args):
        if state["armed"] and (event in denied or event.startswith(denied_prefixes)):
            if event == "exec" and state["exec_left"]:  # the harness's own exec of the submission, once
                state["exec_left"] = 0
                return
            raise RuntimeError(f"{event} is not allowed in this task")

    try:
        with open("solution.py", "rb") as f:
            code = compile(f.read(), "solution.py", "exec", dont_inherit=True)
    except SyntaxError as err:
        fail(f"syntax error: {err.msg} (line {err.lineno})")
        exit_now(0)
    except BaseException as err:  # noqa: BLE001
        fail(describe(err))
        exit_now(0)
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no fork, no thread: one core's worth of work
    except (ValueError, OSError):
        pass
    namespace = {"__name__": "solution", "__builtins__": safe_builtins}
    sys.addaudithook(hook)
    state["armed"] = True
    try:
        exec(code, namespace)
        matmul = namespace.get("matmul")
        if not callable(matmul):
            fail("the code defines no function matmul")
            exit_now(0)
        answer(OK, b"")
    except BaseException as err:  # noqa: BLE001 (SystemExit and KeyboardInterrupt too: the submission's fault)
        fail(describe(err))
        exit_now(0)
    while True:
        header = read_exactly(req_fd, 4)
        if header is None:
            exit_now(0)
        request = read_exactly(req_fd, unpack("<I", header)[0])
        if request is None:
            exit_now(0)
        try:  # decode, call, check, encode: all inside the parent's timed window
            tc_a, tc_b, n, m, p = unpack("<ccIII", request[:14])
            flat_a, flat_b = new_array(tc_a.decode()), new_array(tc_b.decode())
            split = 14 + n * m * flat_a.itemsize
            flat_a.frombytes(request[14:split])
            flat_b.frombytes(request[split:])
            flat_a, flat_b = flat_a.tolist(), flat_b.tolist()
            a = [flat_a[i * m : (i + 1) * m] for i in range(n)]
            b = [flat_b[k * p : (k + 1) * p] for k in range(m)]
            del flat_a, flat_b, request
            out = matmul(a, b)
            if kind(out) is not list or not all(kind(row) is list for row in out):
                fail(f"matmul returned {kind(out).__name__}, not a list of lists")
                continue
            if not all(set(map(kind, row)) <= number for row in out):
                fail("matmul's result holds values that are not int or float")
                continue
            rows = n_items(out)
            cols = n_items(out[0]) if rows else 0
            if not all(n_items(row) == cols for row in out):
                cols = -1
            flat = new_array("d")
            if (rows, cols) == (n, p):
                for row in out:
                    flat.extend(row)
            answer(OK, pack("<ii", rows, cols) + flat.tobytes())
        except BaseException as err:  # noqa: BLE001
            fail(describe(err))


def _parent(pid, req_fd, ans_fd):
    """Reads the spec, drives and times the child, writes the report. Never returns."""
    import base64
    import json
    import select
    import signal
    import struct
    import sys
    import time

    perf, pack, unpack = time.perf_counter, struct.pack, struct.unpack
    # Not dumpable: a same-uid child can then neither open our /proc/PID/mem or /proc/PID/fd/* nor ptrace us.
    # Without it the nonce would be one read away, so no report at all rather than one made without it.
    try:
        import ctypes

        ul = ctypes.c_ulong
        failed = ctypes.CDLL(None, use_errno=True).prctl(4, ul(0), ul(0), ul(0), ul(0))  # PR_SET_DUMPABLE
    except Exception as err:  # noqa: BLE001
        failed = f"{type(err).__name__}: {err}"
    if failed:
        _write_all(2, f"harness: prctl(PR_SET_DUMPABLE, 0) failed ({failed})\n".encode())
        os._exit(3)
    raw = sys.stdin.buffer.read()
    nonce, _, payload = raw.partition(b"\n")

    def report(**result):
        _write_all(1, b"\n" + nonce + b" " + json.dumps(result).encode() + b"\n")
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
        os._exit(0)

    def child_gone():
        try:
            _, status = os.waitpid(pid, 0)
        except OSError:
            return "the submission's process is gone"
        if os.WIFSIGNALED(status):
            return f"the submission's process was killed by signal {os.WTERMSIG(status)}"
        return f"the submission's process exited (status {os.WEXITSTATUS(status)}) without answering"

    def receive(shape):
        """The child's answer: ("ok", payload) or ("error", message). shape None: the answer to the set-up."""
        head = _read_exactly(ans_fd, 5)
        if head is None:
            return "error", child_gone()
        tag, size = head[:1], unpack("<I", head[1:])[0]
        if tag == ERR:
            if size > MAX_ERROR_BYTES:
                return "error", "the submission's process broke the harness protocol"
            body = _read_exactly(ans_fd, size)
            return ("error", body.decode("utf-8", "replace")) if body is not None else ("error", child_gone())
        full = 8 + shape[0] * shape[1] * 8 if shape else 0
        if tag != OK or size not in ({full, 8} if shape else {0}):
            return "error", "the submission's process broke the harness protocol"
        body = _read_exactly(ans_fd, size)
        if body is None:
            return "error", child_gone()
        if shape and (unpack("<ii", body[:8]) == shape) != (size == full):  # data exactly when the shape is right
            return "error", "the submission's process broke the harness protocol"
        return "ok", body

    def unasked():
        return bool(select.select([ans_fd], [], [], 0)[0])

    try:
        spec = json.loads(payload)
        init = json.dumps(sorted(spec["allowed"])).encode()
        calls = [*spec["cases"], *spec["timed"]]
        n_cases = len(spec["cases"])
        requests = []
        for (tc_a, n, m, data_a), (tc_b, m_b, p, data_b) in calls:
            a, b = base64.b64decode(data_a), base64.b64decode(data_b)
            if m != m_b or tc_a not in "qd" or tc_b not in "qd" or len(a) != n * m * 8 or len(b) != m * p * 8:
                raise ValueError("bad matrix in the spec")
            body = pack("<ccIII", tc_a.encode(), tc_b.encode(), n, m, p) + a + b
            requests.append((pack("<I", len(body)) + body, n, p))
    except Exception as err:  # noqa: BLE001
        report(error=f"harness: bad spec ({type(err).__name__}: {err})")
    _write_all(req_fd, pack("<I", len(init)) + init)
    kind_, body = receive(None)  # the child imported the allowed modules and ran the code's top level
    if kind_ == "error":
        report(error=body)
    outputs, elapsed = [], []
    for i, (request, n, p) in enumerate(requests):
        if unasked():
            report(error="the submission's process wrote to the harness without being asked")
        start = perf()
        _write_all(req_fd, request)
        kind_, body = receive((n, p))
        stop = perf()
        if kind_ == "error":
            report(error=body)
        rows, cols = unpack("<ii", body[:8])
        outputs.append([rows, cols, base64.b64encode(body[8:]).decode()])
        if i >= n_cases:
            elapsed.append(stop - start)
    report(outputs=outputs, elapsed=elapsed)


def _main():
    req_r, req_w = os.pipe()
    ans_r, ans_w = os.pipe()
    pid = os.fork()  # before stdin is read: the child never holds the nonce or the inputs
    if pid == 0:
        try:
            os.close(req_w)
            os.close(ans_r)
            _child(req_r, ans_w)
        finally:
            os._exit(0)
    os.close(req_r)
    os.close(ans_w)
    _parent(pid, req_w, ans_r)


_main()
