"""``python -m bench [NAME ...]``: run every benchmark (or those named) one after another.

Each benchmark is a module of this package with ``run() -> dict``; it prints a small
table and returns its figures, written to ``var/bench/<name>.json`` with the machine."""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

BENCHMARKS = ["directory_sync", "load", "session_memory", "soak", "row_sizes", "worker_models"]
# Run only when named (``python -m bench soak``): the soak takes five minutes (or with
# BENCH_SOAK=1), row_sizes starts its own PostgreSQL for docs/capacity.md.
ON_REQUEST = {"soak", "row_sizes", "worker_models"}


def machine() -> dict[str, object]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}"}


def main(argv: list[str]) -> int:
    names = argv or [n for n in BENCHMARKS
                     if n not in ON_REQUEST or (n == "soak" and os.environ.get("BENCH_SOAK") == "1")]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    out = Path("var/bench")
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"== {name}", flush=True)
        module = importlib.import_module(f"bench.{name}")
        figures = module.run()
        record = {"benchmark": name, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "machine": machine(), "figures": figures}
        (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
        print(f"   written to {out / (name + '.json')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
