"""Plain synchronous use: no asyncio in sight. The first spawn starts a default cluster.

    python examples/script.py
"""

import aiodagger as dagger


def square(x):
    return x * x


if __name__ == "__main__":
    squares = [dagger.spawn(square, i) for i in range(10)]
    total = dagger.spawn(sum, squares)
    print("sum of squares:", total.fetch())
