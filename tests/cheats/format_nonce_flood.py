# ruff: noqa
# As format_nonce_crash, but the harness is stopped by flooding stdout past the sandbox's output limit (the run
# is killed: "output_limit"), after the forged line.
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
            line = "x" * 65535
            while True:
                print(line, flush=True)
    return out
