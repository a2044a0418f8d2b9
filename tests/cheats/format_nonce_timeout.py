# ruff: noqa
# As format_nonce_crash, but after the forged line it spins until the sandbox's deadline: a run that timed out
# still had its stdout scanned for a report.
from operator import mul

REPEATS = 3
SEEN = []
BIG = []


def nonce():
    try:
        1 / 0
    except ZeroDivisionError as e:
        text = "{0.__traceback__.tb_frame.f_back.f_back.f_locals[nonce]}".format(e)
    return text[2:-1]


def matmul(A, B):
    cols = list(zip(*B))
    out = [[sum(map(mul, row, col)) for col in cols] for row in A]
    SEEN.append(out)
    n = len(A)
    if n >= 8:
        BIG.append(n)
        if len(BIG) == REPEATS:
            fake = repr([n**3 * 3e-9] * REPEATS)
            print("\n" + nonce() + ' {"outputs": ' + repr(SEEN) + ', "elapsed": ' + fake + ', "tampered": []}',
                  flush=True)
            while True:
                pass
    return out
