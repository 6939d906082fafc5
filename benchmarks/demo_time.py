"""Wall time of `pocketlm demo` as a user runs it (README: demo under 3 minutes on 2 cores).

    python benchmarks/demo_time.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common import write_result

TARGET_S = 180


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pocketlm.cli", "demo", "-o", str(out)],
                              capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        files = sorted(p.name for p in out.iterdir()) if out.exists() else []
    ok = proc.returncode == 0 and "report.html" in files and any(f.endswith(".png") for f in files)
    table = Table(title="pocketlm demo")
    for col in ("wall s", "target s", "exit", "report.html + plot"):
        table.add_column(col, justify="right")
    table.add_row(f"{wall:.1f}", str(TARGET_S), str(proc.returncode), "yes" if ok else "no")
    Console().print(table)
    if proc.returncode:
        print(proc.stderr[-2000:])
    path = write_result("demo_time", {"wall_s": wall, "target_s": TARGET_S, "exit_code": proc.returncode,
                                      "files": files, "meets_target": ok and wall < TARGET_S})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
