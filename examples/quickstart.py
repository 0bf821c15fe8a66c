"""A first taste: sync and async tasks, dependencies, options, and errors.

    python examples/quickstart.py
"""

import asyncio

import aiodagger as dagger


def add(a, b):  # sync functions run on the cluster's thread pool
    return a + b


PRICES = {1: 10, 2: 20, 3: 30, 4: 40, 5: 50}


async def fetch_price(item):  # coroutine functions run on the event loop
    await asyncio.sleep(0.01)  # stands in for a database or HTTP call
    return PRICES[item]


def checkout(prices):
    return sum(prices)


async def main():
    async with dagger.Cluster():
        prices = [dagger.spawn(fetch_price, item) for item in range(1, 6)]
        total = dagger.spawn(checkout, prices)  # a list of DTasks: all are dependencies
        with_tax = dagger.options(name="tax", priority=5).spawn(add, total, 15)
        print("total with tax:", await with_tax)

        failing = dagger.spawn(fetch_price, 99)  # no such item: KeyError
        after = dagger.spawn(add, failing, 1)
        try:
            await after
        except dagger.UpstreamError as err:
            print("failed upstream:", err.origin.name, "->", type(err.__cause__).__name__)


if __name__ == "__main__":
    asyncio.run(main())
