"""Compare two study runs' results/*.json: every numeric value both hold (timings left out), flattened.

    python scripts/compare_results.py RUN_A/results RUN_B/results     # e.g. a quick run before and after a refactor

Prints, per results file, how many numbers both runs hold, how many differ, and the ones that differ by more
than 1 %; then the share identical to the last bit. Used for issue 14's before/after check of the quick profile.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

#: keys that measure time or speed, or say when and how a run was made: they differ between any two runs
SKIP = {"created", "git_commit", "command", "duration", "train_seconds", "images_per_second", "peak_memory_gib",
        "seconds"}


def flat(x, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(x, dict):
        for k, v in x.items():
            if k not in SKIP and "seconds" not in k and "per_second" not in k:
                out.update(flat(v, f"{prefix}{k}."))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            out.update(flat(v, f"{prefix}{i}."))
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        out[prefix[:-1]] = float(x)
    return out


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2 or not all(Path(p).is_dir() for p in args):
        print(f"usage: python scripts/compare_results.py RUN_A/results RUN_B/results (two folders of results "
              f"*.json); got {args}", file=sys.stderr)
        return 2
    a_dir, b_dir = (Path(p) for p in args)
    total = same = 0
    for a in sorted(a_dir.glob("*.json")):
        b = b_dir / a.name
        if not b.exists():
            print(f"{a.name}: only in {a_dir}")
            continue
        fa, fb = flat(json.loads(a.read_text())), flat(json.loads(b.read_text()))
        common = sorted(set(fa) & set(fb))
        diffs = [(k, fa[k], fb[k]) for k in common if fa[k] != fb[k]]
        big = [d for d in diffs if abs(d[1] - d[2]) > 0.01 * max(1.0, abs(d[1]))]
        total, same = total + len(common), same + len(common) - len(diffs)
        print(f"{a.name}: {len(common)} common numbers, {len(diffs)} differ, {len(big)} by more than 0.01 "
              f"(1% above 1); only in the first {len(set(fa) - set(fb))}, only in the second {len(set(fb) - set(fa))}")
        for k, x, y in big[:8]:
            print(f"   {k}: {x:.4g} -> {y:.4g}")
    print(f"all: {same}/{total} identical")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
