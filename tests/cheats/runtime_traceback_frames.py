# ruff: noqa
# The run-time layer alone (graded with the AST gate off): plain attribute access to frames. Reading tb_frame
# raises the audit event "object.__getattr__", which the harness's audit hook let through.
from operator import mul

REPEATS = 3
SEEN = []
BIG = []


def reporter():
    try:
        1 / 0
    except ZeroDivisionError as e:
        fr = e.__traceback__.tb_frame
    while fr is not None:
        if "report" in fr.f_locals:
            return fr.f_locals["report"]
        fr = fr.f_back
    raise RuntimeError("no harness frame")


def matmul(A, B):
    cols = list(zip(*B))
    out = [[sum(map(mul, row, col)) for col in cols] for row in A]
    SEEN.append(out)
    n = len(A)
    if n >= 8:
        BIG.append(n)
        if len(BIG) == REPEATS:
            reporter()(outputs=SEEN, elapsed=[n**3 * 3e-9] * REPEATS, tampered=[], n=len(SEEN))
    return out
