"""Look for falsifying examples: run the numerical suites under random hypothesis draws.

The README's `uv run pytest` is derandomised (the `ci` profile: the same examples on every
machine), so it cannot find new failures; this script can. It runs the given test paths (by
default the numerical suites) once per seed under the `explore` profile (random draws,
`--examples` per test, default 250 = 20x the default profile's 12) and prints every failing test
with its falsifying example, then a summary line.

    uv run python tests/explore.py                         # seeds 0..29, 250 examples per test
    uv run python tests/explore.py --seeds 100-109 --examples 50 tests/flashattn/test_triton.py

Every falsifying example it finds is a kernel bug or a bound that does not follow from the
maths, never noise: fix the root, then pin the example with `@example` so that the default
profile runs it everywhere.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMERICAL = ["tests/flashattn", "tests/fusedops", "tests/zero/test_units.py",
             "tests/parallel/test_layers.py"]


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def run_seed(seed: int, examples: int, paths: list[str], timeout: float) -> tuple[int, str]:
    env = dict(os.environ, HYPOTHESIS_PROFILE="explore", HAILLM_EXPLORE_EXAMPLES=str(examples))
    env.pop("CI", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           f"--hypothesis-seed={seed}", "-m", "not gpu", *paths]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return -1, f"timed out after {timeout:.0f} s\n{e.stdout or ''}"
    return p.returncode, p.stdout + p.stderr


def falsifying(log: str) -> list[str]:
    """The 'FAILED test - reason' lines and each falsifying example's call."""
    found = re.findall(r"^FAILED .*$", log, flags=re.M)
    found += [re.sub(r"^E +", "", m.strip(), flags=re.M) for m in re.findall(
        r"(?:Falsifying example|Failing test case): (.*?\n[E ]*\))$", log, flags=re.S | re.M)]
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="*", default=NUMERICAL)
    ap.add_argument("--seeds", default="0-29", help="e.g. 0-29 or 3,7,100-104")
    ap.add_argument("--examples", type=int, default=250, help="examples per test and seed")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per seed")
    ap.add_argument("--logs", default=None, help="folder for each failing seed's full log")
    args = ap.parse_args(argv)
    seeds = _seeds(args.seeds)
    bad, t0 = {}, time.time()
    for s in seeds:
        t = time.time()
        rc, log = run_seed(s, args.examples, args.paths, args.timeout)
        tail = log.strip().splitlines()[-1] if log.strip() else ""
        print(f"seed {s}: exit {rc} in {time.time() - t:.0f} s: {tail}", flush=True)
        if rc != 0:
            bad[s] = falsifying(log) or [log[-2000:]]
            if args.logs:
                Path(args.logs).mkdir(parents=True, exist_ok=True)
                (Path(args.logs) / f"seed{s}.log").write_text(log)
            for line in bad[s]:
                print("   ", line.replace("\n", "\n    "), flush=True)
    print(f"explore: {len(seeds) - len(bad)} of {len(seeds)} seeds passed, {args.examples} "
          f"examples per test, {len(args.paths)} paths, {time.time() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
