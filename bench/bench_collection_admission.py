"""What the atomic admission of a collection add costs Redis: the time of one `CollectionStore.admit` call (the ADMIT
Lua script: MAX_COLLECTIONS, MAX_COLLECTION_BYTES and MAX_COLLECTION_IMAGES checked, the pending entries written)
against the collection's size. The script runs inside Redis and blocks it while it runs, so this is also how long
every other client (the queue, other workers) waits per add. A private server (service/localstack.py); the stored
records are stand-ins (ADMIT reads only the metadata hash and the counts).

    python bench/bench_collection_admission.py [--images 100,1000,10000] [--repeats 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from redis import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.collections import CollectionStore  # noqa: E402
from service.localstack import find_server_binary, free_port, start_redis, stop  # noqa: E402


def fill(store: CollectionStore, count: int) -> None:
    """`count` images as the worker stores them: a regions entry and metadata JSON of the real shape."""
    meta = json.dumps({"width": 640, "height": 480, "bytes": 150_000, "stored": 823_000})
    with store.connection.pipeline(transaction=False) as pipe:
        for index in range(count):
            image_id = f"{index:032x}"
            pipe.hset(store.regions_key, image_id, b"record")
            pipe.hset(store.meta_key, image_id, meta)
        pipe.execute()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default="100,1000,10000")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    binary = find_server_binary()
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bench-admit-"))
    server = start_redis(port, workdir, binary=binary)
    rows = []
    try:
        connection = Redis(port=port)
        for count in (int(n) for n in args.images.split(",")):
            store = CollectionStore(connection, f"bench-{count}")
            fill(store, count)
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                admission = store.admit([uuid.uuid4().hex], uuid.uuid4().hex, 600, 1000, 1 << 50, 1 << 30)
                times.append(time.perf_counter() - started)
                assert admission.refused is None
            rows.append({"images": count, "median_ms": round(statistics.median(times) * 1000, 2),
                         "max_ms": round(max(times) * 1000, 2)})
            print(f"{count:>7} images: admit median {rows[-1]['median_ms']} ms, max {rows[-1]['max_ms']} ms",
                  flush=True)
    finally:
        stop(server)
    if args.json:
        Path(args.json).write_text(json.dumps({"server": binary.version(), "machine": platform.processor() or
                                               platform.machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
