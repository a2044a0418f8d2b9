# ruff: noqa
# Compiled code: numpy.
import numpy as np


def matmul(A, B):
    return (np.array(A) @ np.array(B)).tolist()
