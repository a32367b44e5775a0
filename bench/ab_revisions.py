"""A/B of two revisions of the code, in process: in-process Engine waves of 1, 8 and 32 jobs at
the model's defaults (unary-style, progress=false; `bench/engine_waves.py`), the working tree
against a git revision, each round in a fresh process per arm, arms interleaved so both see the
same machine load. On a shared VM the speed of the same code moves by 10-30% from minute to
minute; the minimum over rounds is the steadiest estimate of a wave's cost, so both min and
median are reported.

    python bench/ab_revisions.py [--base HEAD] [--rounds 4] [--levels 1,8,32] [--length 128]
                                 [--out bench/results/ab_revisions.json]

The base revision runs from `git archive` of it in a temporary folder (its package folders
mapped as pyproject.toml's package-dir maps them, the shipped model linked, not copied); the
working tree runs from the installed (editable) package.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def package_root(rev: str, into: Path) -> Path:
    """A folder to put on PYTHONPATH so that `import unmask` gets revision `rev`."""
    src = into / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                             capture_output=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(src, filter="data")
    mapping = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    pkg = into / "pkg" / "unmask"
    pkg.mkdir(parents=True)
    for entry in (src / mapping["unmask"]).iterdir():
        (pkg / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if name != "unmask":
            link = pkg / name.split(".", 1)[1]
            if link.is_symlink():
                link.unlink()
            link.symlink_to(src / folder)
    return into / "pkg"


def child(levels: list[int], length: int, threads: int) -> dict[str, Any]:
    """One arm's round: load the model, warm up, one wave per level (wall seconds)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from engine_waves import wave

    import unmask
    from unmask.engine.engine import Engine
    from unmask.models.generation import Generator

    torch.set_num_threads(threads)
    with Engine(Generator.load(None), max_batch=max(levels)) as engine:
        wave(engine, 2, length, False)
        walls = {n: wave(engine, n, length, False)["wall_s"] for n in levels}
    return {"walls": walls, "package": str(Path(unmask.__file__).resolve().parent)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", default="HEAD")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/ab_revisions.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    if args.child:
        print(json.dumps(child(levels, args.length, args.threads)))
        return
    base = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    walls: dict[str, list[dict[int, float]]] = {"work": [], base: []}
    with tempfile.TemporaryDirectory(prefix="unmask-ab-") as tmp:
        arms = {"work": os.environ.get("PYTHONPATH", ""),
                base: str(package_root(args.base, Path(tmp)))}  # fmt: skip
        cmd = [sys.executable, __file__, "--child", "--levels", args.levels,
               "--length", str(args.length), "--threads", str(args.threads)]  # fmt: skip
        for r in range(args.rounds):
            for arm in list(arms) if r % 2 == 0 else list(arms)[::-1]:
                env = {**os.environ, "PYTHONPATH": arms[arm], "OMP_NUM_THREADS": str(args.threads)}
                t = time.perf_counter()
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                                     cwd=ROOT).stdout  # fmt: skip
                res = json.loads(out.strip().splitlines()[-1])
                row = {int(n): s for n, s in res["walls"].items()}
                walls[arm].append(row)
                print(f"round {r} {arm:>8} ({time.perf_counter() - t:.0f} s, {res['package']}):",
                      {n: round(s, 3) for n, s in row.items()}, flush=True)  # fmt: skip
    summary = {}
    for arm, rows in walls.items():
        mins = {n: min(r[n] for r in rows) for n in levels}
        meds = {n: statistics.median(r[n] for r in rows) for n in levels}
        summary[arm] = {"min_wall_s": mins, "median_wall_s": meds}
        if 1 in levels:
            for key, agg in (("min", mins), ("median", meds)):
                summary[arm][f"ratios_{key}"] = {
                    f"wall_c{n}_over_c1" if n <= 8 else f"tokens_per_s_c{n}_over_c1":
                    (agg[n] / agg[1] if n <= 8 else n * agg[1] / agg[n])
                    for n in levels if n > 1}  # fmt: skip
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import machine_info

    report = {"machine": machine_info(args.threads), "base": base, "length": args.length,
              "arrival": "each wave: all jobs submitted at t=0 to one Engine (progress=false)",
              "rounds": walls, "summary": summary}  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1), "->", args.out)


if __name__ == "__main__":
    main()
