"""The benchmark rule's table: each naive run of a study, against the rule that picks the default benchmark.

    python tools/lever_table.py runs/lever-mixed              # a study of naive runs (study.py --out)
    python tools/lever_table.py runs/lever-single runs/lever-mixed

For every naive run under each study folder: the lowest diagonal entry (each task right after its own
training), BWT, the share of -BWT that answer format explains, the base row's mean, the smallest margin of a
diagonal entry over the base row's, and whether the run meets each part of the rule (README, "Two
variants"): diagonal >= 90, BWT in [-80, -20], margin >= 40. The last line of each folder says whether all
its runs meet all three.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import eval as ev  # noqa: E402

LEARNT, BWT_RANGE, MARGIN = 90, (-80, -20), 40  # the rule, as README states it


def run_row(r):
    """One run's results.json -> (its numbers, whether it meets each part of the rule)."""
    A, base = r["matrix"], r["base_row"]
    diagonal = [A[i][i] for i in range(len(A))]
    bwt = r["metrics"]["BWT"]
    fmt = ev.format_drop(A, r["format_matrix"], r["content_matrix"])
    margin = min(d - b for d, b in zip(diagonal, base))
    numbers = dict(diagonal_min=min(diagonal), BWT=bwt, format_share=100 * fmt / -bwt if bwt < 0 else None,
                   base_mean=sum(base) / len(base), margin=margin)
    meets = [min(diagonal) >= LEARNT, BWT_RANGE[0] <= bwt <= BWT_RANGE[1], margin >= MARGIN]
    return numbers, meets


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", help="study --out folders holding naive runs")
    args = ap.parse_args()
    print("| study | base | seed | lowest diagonal | BWT | format share of -BWT | base row mean | "
          "smallest margin over base | meets (diagonal, BWT, margin) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for folder in map(Path, args.folders):
        paths = sorted(folder.glob("runs/*/*/naive/seed*/results.json"))
        if not paths:
            print(f"error: {folder} holds no finished naive run", file=sys.stderr)
            return 2
        verdicts = []
        for path in paths:
            numbers, meets = run_row(json.loads(path.read_text()))
            verdicts.append(all(meets))
            share = "-" if numbers["format_share"] is None else f"{numbers['format_share']:.0f} %"
            print(f"| {folder.name} | {path.parts[-4]} | {path.parts[-2].removeprefix('seed')} | "
                  f"{numbers['diagonal_min']:.1f} | {numbers['BWT']:+.1f} | {share} | {numbers['base_mean']:.1f} | "
                  f"{numbers['margin']:+.1f} | {', '.join('yes' if m else 'no' for m in meets)} |")
        print(f"| {folder.name} | all | | | | | | | {'meets the rule' if all(verdicts) else 'misses the rule'} "
              f"({sum(verdicts)} of {len(verdicts)} runs) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
