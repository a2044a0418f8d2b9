# ruff: noqa
# Plain lists of a float subclass whose value is computed when it is converted or printed.
class Cell(float):
    def __new__(cls, row, col):
        obj = super().__new__(cls, 0.0)
        obj.row, obj.col = row, col
        return obj

    def __float__(self):
        return float(sum(a * b for a, b in zip(self.row, self.col)))

    def __repr__(self):
        return repr(float(self))


def matmul(A, B):
    cols = list(zip(*B))
    return [[Cell(row, col) for col in cols] for row in A]
