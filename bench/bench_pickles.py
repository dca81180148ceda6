"""The cost of reading the released pickles safely: vilbert_train/pickles.py (pickle's pure-Python unpickler, every
global and every state checked) against Python's C unpickler with no checks, which must never read these files but
is the speed a user would compare with.

Two workloads, as the trainer meets them: a VQA answer-target cache (`cache/train_target.pkl`: one dict per
question with its labels and soft scores; the real file holds 443,757 questions), read once when training starts,
and region-feature records (one pickled dict per image with 100 boxes and 100 x 2048 float32 features, about 800 KB),
read for every image of every batch. Both are written with protocol 2, as the released files are. The figure to read
is the ratio of the two readers, measured in one process with their runs interleaved.

    python bench/bench_pickles.py [--questions 443757] [--records 200] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import pickle
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import emit_report, machine_name  # noqa: E402  (bench/, this script's folder)
from vilbert_train.pickles import loads  # noqa: E402


def target_cache(questions: int) -> bytes:
    rng = random.Random(0)
    entries = [{"question_id": i, "image_id": i // 5, "labels": [rng.randrange(3129) for _ in range(3)],
                "scores": [0.3, 0.6, 1.0]} for i in range(questions)]
    return pickle.dumps(entries, protocol=2)


def region_record(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return pickle.dumps({"image_id": str(seed).encode(), "image_h": 480, "image_w": 640, "num_boxes": 100,
                         "boxes": rng.uniform(0, 480, (100, 4)).astype(np.float32),
                         "features": rng.random((100, 2048), dtype=np.float32)}, protocol=2)


def seconds(read, items: list[bytes]) -> float:
    start = time.perf_counter()
    for data in items:
        read(data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=443_757)
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    workloads = {"target_cache": [target_cache(args.questions)],
                 "region_records": [region_record(seed) for seed in range(args.records)]}
    report = {"date": datetime.now(timezone.utc).date().isoformat(), "machine": machine_name(),
              "python": sys.version.split()[0], "numpy": np.__version__, "workloads": {}}
    for name, items in workloads.items():
        # same result from both readers before anything is timed
        assert repr(loads(items[0])) == repr(pickle.loads(items[0]))
        c_reader, checked = [], []
        for _ in range(args.repeats):  # interleaved, so that the machine's load falls on both alike
            c_reader.append(seconds(pickle.loads, items))
            checked.append(seconds(loads, items))
        size = sum(len(data) for data in items)
        report["workloads"][name] = {
            "items": len(items), "megabytes": round(size / 1e6, 2),
            "c_unpickler_ms_per_item": round(1e3 * min(c_reader) / len(items), 3),
            "checked_ms_per_item": round(1e3 * min(checked) / len(items), 3),
            "checked_over_c": round(min(checked) / min(c_reader), 2),
        }
    emit_report(report, args.json)


if __name__ == "__main__":
    main()
