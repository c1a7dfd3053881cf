"""Plant a one-line slip, run the tests that should catch it, put the file back (see docs/testing.md).

    python scripts/plant_slip.py colab_helpers/runtime/policies.py "if self.decay != 1.0:" "if False:" \
        tests/test_policies.py tests/test_policy_choices.py

``old`` must occur exactly once in the file. Exit code 0: the slip was caught (some test failed);
1: it survived (every test passed: write the test that catches it); 2: bad arguments. The file is
restored byte for byte however pytest ends (Ctrl-C included).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("old", help="text to replace (must occur exactly once)")
    ap.add_argument("new", help="the slip")
    ap.add_argument("tests", nargs="+", help="test files or node ids to run")
    args = ap.parse_args(argv)
    original = args.file.read_bytes()
    text = original.decode()
    if text.count(args.old) != 1:
        print(f"{args.file}: {args.old!r} occurs {text.count(args.old)} times, need exactly 1", file=sys.stderr)
        return 2
    try:
        args.file.write_text(text.replace(args.old, args.new))
        env = {**os.environ, "CI": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", *args.tests]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        args.file.write_bytes(original)
    lines = run.stdout.strip().splitlines()
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    if run.returncode == 0:
        print(f"SURVIVED: {args.file}: {args.old!r} -> {args.new!r} ({lines[-1] if lines else ''})")
        return 1
    print(f"caught: {args.file}: {args.old!r} -> {args.new!r}")
    for ln in failed or lines[-1:]:
        print(f"  {ln}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
