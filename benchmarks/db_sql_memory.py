"""Peak memory and time of `autometa db sql` on queries built to exhaust memory or the terminal.

Each case runs in a fresh process on a small SQLite study database: the library call the command
makes (``queries.sql``, then ``format_rows`` as a table) with the command's defaults (1000 rows,
10 MB of output, 30 s). The peak is the process's resident-set high-water mark during the call
(Linux: reset through /proc/self/clear_refs just before it), shown beside the resident size
before it; the difference is what the query cost.

    python benchmarks/db_sql_memory.py              # every case, side by side
    python benchmarks/db_sql_memory.py --case randomblob --json   # one case, as JSON (tests use it)
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    # One 1 GB value: before the length cap it was built, hex-encoded and printed (7.3 GB peak).
    "randomblob": "SELECT randomblob(1000000000)",
    # Many values each under the cap, together far over it: output stops at the byte cap.
    "many-big-rows": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 200) "
                     "SELECT x, randomblob(900000) FROM c",
    # A long result of small rows: only --limit rows are read.
    "ten-million-rows": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 10000000) "
                        "SELECT x, 'row ' || x FROM c",
    # A 1 GB string grown inside one aggregate.
    "group-concat": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 2000) "
                    "SELECT group_concat(hex(zeroblob(300000))) FROM c",
}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(statement: str, db: str) -> dict:
    """Run ``statement`` as `autometa db sql` would, in this process; the figures of the call."""
    from autometa.errors import AutometaError
    from autometa.store.queries import format_rows, sql

    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
    started = time.perf_counter()
    try:
        rows, cut = sql(db, statement)
        printed = len(format_rows(rows, "table", raw=True).encode())
        outcome = f"{len(rows)} rows, {printed:,} bytes printed" + (" (cut)" if cut else "")
    except AutometaError as exc:
        outcome = f"refused: {str(exc)[:60]}…"
    seconds = time.perf_counter() - started
    peak = _status_mb("VmHWM")
    return {"outcome": outcome, "seconds": seconds, "rss_before_mb": before, "peak_mb": peak, "cost_mb": peak - before}


def _database(folder: Path) -> str:
    path = folder / "studies.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE trials (number INTEGER)")
        connection.executemany("INSERT INTO trials VALUES (?)", [(i,) for i in range(10)])
    return f"sqlite:///{path}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), default=None, help="Run one case in this process.")
    parser.add_argument("--json", action="store_true", help="Print the figures of --case as JSON.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        db = _database(Path(folder))
        if args.case:
            figures = measure(CASES[args.case], db)
            print(json.dumps(figures) if args.json else figures)
            return
        print(f"{'case':<18} {'seconds':>8} {'RSS before':>11} {'peak':>9} {'cost':>9}  outcome")
        for name in CASES:
            # A fresh process per case: one case's high-water mark must not hide the next one's.
            run = subprocess.run([sys.executable, __file__, "--case", name, "--json"], capture_output=True, text=True,
                                 check=True)
            f = json.loads(run.stdout)
            print(f"{name:<18} {f['seconds']:>8.2f} {f['rss_before_mb']:>8.0f} MB {f['peak_mb']:>6.0f} MB "
                  f"{f['cost_mb']:>6.0f} MB  {f['outcome']}")


if __name__ == "__main__":
    main()
