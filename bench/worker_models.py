"""Which gunicorn worker model to run (``python -m bench worker_models``): the same
token scenarios with several worker x thread layouts on this machine, SQLite and
PostgreSQL (BENCH_MODELS, default "1x8,2x4,2x8,4x2"; BENCH_DATABASES)."""

from __future__ import annotations

import os
from typing import Any

from bench.load import _Postgres, run_one

SCENARIOS = ["client_credentials", "refresh", "userinfo"]


def run() -> dict[str, Any]:
    models = [m for m in os.environ.get("BENCH_MODELS", "1x8,2x4,2x8,4x2").split(",") if m]
    kinds = [k for k in os.environ.get("BENCH_DATABASES", "sqlite,postgresql").split(",") if k]
    seconds = float(os.environ.get("BENCH_SECONDS", "6"))
    results: list[dict[str, Any]] = []
    for kind in kinds:
        for model in models:
            workers, threads = (int(x) for x in model.split("x"))
            if kind == "postgresql":
                with _Postgres() as url:
                    run = run_one(url, workers, threads, SCENARIOS, seconds)
            else:
                run = run_one("", workers, threads, SCENARIOS, seconds)
            results.append({"database": kind, "model": model,
                            **{r["scenario"]: {"rps": r["rps"], "p99_ms": r["p99_ms"], "ratio": r.get("ratio")}
                               for r in run["scenarios"]}})
    print(f"{'database':<12}{'model':<8}" + "".join(f"{s:>22}" for s in ["hello", *SCENARIOS]))
    for r in results:
        print(f"{r['database']:<12}{r['model']:<8}" + "".join(
            f"{str(r[s]['rps']) + ' (p99 ' + str(r[s]['p99_ms']) + ')':>22}" for s in ["hello", *SCENARIOS]))
    return {"models": results}
