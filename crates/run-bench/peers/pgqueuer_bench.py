"""run-bench peer: pgqueuer draining N no-op jobs.

    python3 pgqueuer_bench.py --url URL --jobs N --concurrency W [--batch-size B]

Installs pgqueuer's schema (``Queries.install``, its default "durable" tables) unless it is
there, enqueues N jobs of a no-op entrypoint in one batch ``enqueue`` call and opens W
connections (neither timed), then times W consumers from their start until all N have run
and every consumer has shut down (which flushes its buffered completions). Checks that the
queue is empty and prints one JSON line on stdout. Any failure: a message on stderr and
exit code 1.

Concurrency: W is the number of consumers, each a ``QueueManager`` on its own asyncpg
connection, as pgqueuer's own drain benchmark (tools/benchmark.py, ``--dequeue``) does. Each
dequeues ``batch_size`` jobs a statement (pgqueuer's default, 10) and logs completions in
batches of the same size (or every 0.1 s). Jobs of a batch run as concurrent asyncio tasks;
the entrypoint's ``concurrency_limit`` is left at 0 (unlimited), its default.

Run with PYTHONPATH naming the folder pgqueuer and asyncpg were installed into.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return n


async def bench(url: str, jobs: int, concurrency: int, batch_size: int) -> dict[str, object]:
    import asyncpg
    from pgqueuer import Job, Queries, QueueManager
    from pgqueuer._version import __version__

    entrypoint = "run_bench_noop"

    admin = await asyncpg.connect(dsn=url)
    try:
        queries = Queries.from_asyncpg_connection(admin)
        if not await queries.schema_is_installed():
            await queries.install()
        await queries.clear_queue()
        await queries.enqueue([entrypoint] * jobs, [None] * jobs, [0] * jobs)

        done = 0
        managers: list[QueueManager] = []

        async def noop(job: Job) -> None:
            nonlocal done
            done += 1
            if done == jobs:
                for manager in managers:
                    manager.shutdown.set()

        # Connections are opened before timing (the executor's pool is open when it is timed
        # too); each consumer's start-up (schema check, LISTEN) is timed.
        connections: list[asyncpg.Connection] = []
        try:
            for _ in range(concurrency):
                connections.append(await asyncpg.connect(dsn=url))
            for connection in connections:
                manager = QueueManager(Queries.from_asyncpg_connection(connection))
                manager.entrypoint(entrypoint)(noop)
                managers.append(manager)
            started = time.perf_counter()
            await asyncio.gather(*(m.run(batch_size=batch_size) for m in managers))
            seconds = time.perf_counter() - started
        finally:
            for connection in connections:
                await connection.close()

        if done != jobs:
            raise RuntimeError(f"ran {done} jobs, not {jobs}")
        left = sum(s.count for s in await queries.queue_size())
        if left != 0:
            raise RuntimeError(f"{left} jobs left in the queue after the drain")
    finally:
        await admin.close()

    return {
        "peer": "pgqueuer",
        "version": __version__,
        "batched": True,
        "jobs": jobs,
        "concurrency": concurrency,
        "batch_size": batch_size,
        "seconds": seconds,
        "jobs_per_s": jobs / seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--jobs", type=positive, required=True)
    parser.add_argument("--concurrency", type=positive, required=True)
    parser.add_argument("--batch-size", type=positive, default=10)
    args = parser.parse_args()

    # Quiet: pgqueuer's warnings and errors go to stderr, nothing else is printed.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        import uvloop  # pgqueuer's CLI runs on uvloop when it is installed

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        result = run(bench(args.url, args.jobs, args.concurrency, args.batch_size))
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        print(f"pgqueuer_bench.py: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
