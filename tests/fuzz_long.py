"""Long fuzz run (issue 9): tests/test_fuzz.py in chunks, each with its own hypothesis seed, until a deadline.

    nice -n 19 python tests/fuzz_long.py --minutes 60 --out fuzz_run/ [--tests forward generate ...]

Every example tried is one line of OUT/examples.log (time, test, ok/fail/skip, seconds); each chunk's pytest
output is kept as OUT/chunk-<n>-<test>.txt, and a failing chunk's shrunk example is printed there by hypothesis.
At the end the totals per test are printed (and written to OUT/summary.txt): examples tried (in a failing
chunk, up to its first failure; the rest is hypothesis shrinking it) and failing chunks.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time

TESTS = {
    "forward": "test_forward_matches_transformers",
    "generate": "test_generate_matches_transformers",
    "config": "test_corrupted_config_is_a_clear_error",
    "safetensors": "test_corrupted_safetensors_is_a_clear_error",
    "gradients": "test_gradients_match_transformers",
    "sampling": "test_sampling_warpers_match_transformers",
    "kernels": "test_kernels_match_reference",
}
CHUNK = {"forward": 5, "generate": 2, "config": 100, "safetensors": 100, "gradients": 5, "sampling": 200,
         "kernels": 5}


def summary(log: str) -> str:
    """Per test: examples tried (in each chunk, every example up to and including its first failure: later lines
    are hypothesis' shrinking of that failure), failures found (chunks that failed) and examples skipped."""
    per_chunk = collections.defaultdict(list)
    if os.path.exists(log):
        with open(log) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 5:
                    per_chunk[(parts[1], parts[4])].append(parts[2])
    tried, failed, skipped = collections.Counter(), collections.Counter(), collections.Counter()
    for (test, _), statuses in per_chunk.items():
        skipped[test] += statuses.count("skip")
        statuses = [s for s in statuses if s != "skip"]
        if "fail" in statuses:
            tried[test] += statuses.index("fail") + 1
            failed[test] += 1
        else:
            tried[test] += len(statuses)
    return "\n".join(f"{t}: {tried[t]} examples tried, {failed[t]} failing chunks, {skipped[t]} skipped"
                     for t in sorted(tried)) + f"\ntotal: {sum(tried.values())} examples tried"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--out", default="fuzz_run")
    ap.add_argument("--tests", nargs="+", default=["safetensors", "forward", "generate"], choices=sorted(TESTS))
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--chunk", action="append", default=[], metavar="TEST=N",
                    help="examples per pytest process for one test (default: %s)" % CHUNK)
    args = ap.parse_args()
    chunks = dict(CHUNK)
    for item in args.chunk:
        name, _, n = item.partition("=")
        if name not in CHUNK or not n.isdigit() or int(n) < 1:
            ap.error(f"--chunk {item!r}: expected TEST=N with TEST one of {sorted(CHUNK)} and N >= 1")
        chunks[name] = int(n)
    os.makedirs(args.out, exist_ok=True)
    log = os.path.abspath(os.path.join(args.out, "examples.log"))
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    deadline = time.time() + 60 * args.minutes
    chunk = 0
    while time.time() < deadline:
        for name in args.tests:
            if time.time() >= deadline:
                break
            chunk += 1
            env = dict(os.environ, PHI_JAX_FUZZ_EXAMPLES=str(chunks[name]), PHI_JAX_FUZZ_LOG=log,
                       PHI_JAX_FUZZ_CHUNK=str(chunk),
                       PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(here, "test_fuzz.py"),
                   "-k", TESTS[name], f"--hypothesis-seed={args.seed + chunk}"]
            left = max(60, int(deadline - time.time()) + 600)
            with open(os.path.join(args.out, f"chunk-{chunk:04d}-{name}.txt"), "w") as out:
                try:
                    rc = subprocess.run(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        timeout=left).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            with open(os.path.join(args.out, "chunks.log"), "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} chunk {chunk} {name} seed {args.seed + chunk} rc {rc}\n")
            if rc not in (0, 1, "timeout"):  # 0 passed, 1 a failure found; anything else: pytest could not run
                sys.exit(f"fuzz_long: pytest exited {rc} (see {out.name}); stopping")
    text = summary(log)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
