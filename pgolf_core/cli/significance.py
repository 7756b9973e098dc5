"""``pgolf significance``: the challenge's record test, a one-sided Welch t-test of the candidate runs'
improvement over baseline runs (one per seed); exit code 1 when it is not significant, so scripts can branch.
A run given twice (or in both groups), or a seed repeated within a group, would fake independent samples and is
refused."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError


def cmd_significance(args: argparse.Namespace) -> int:
    import sys

    from ..report import read_run
    from ..stats import welch_improvement
    from ..sweep import expand_runs

    def warn(line: str) -> None:
        print(f"warning: {line}", file=sys.stderr)

    seen: dict[object, str] = {}  # each run counts once, in one group

    def values(paths: list[str], side: str) -> list[float]:
        out, seeds = [], {}
        for path in paths:
            run = read_run(path)
            value = run.final_loss if args.metric == "val_loss" else run.final_bpb
            if value is None:
                raise ConfigError(f"{path}: no final {args.metric} (submission.json or a final metrics record); is the run finished?")
            for key in (("dir", Path(path).resolve()), ("run_id", run.run_id)):
                if key in seen:
                    raise ConfigError(
                        f"{path}: the same run as {seen[key]} (same {'directory' if key[0] == 'dir' else 'run id ' + repr(run.run_id)}); "
                        "each run may be counted once, in one group"
                    )
                seen[key] = path
            seed = run.summary.get("seed")
            if seed is not None and seed in seeds:
                raise ConfigError(
                    f"{path}: seed {seed} is counted twice among the {side} runs (also {seeds[seed]}); the test needs one run per "
                    "seed, or the same seed's repeats count as independent samples"
                )
            seeds[seed] = path
            print(f"{side:<9} {run.run_id}  seed {seed if seed is not None else '?'}  {args.metric} {value:.8f}")
            out.append(value)
        return out

    candidate = values(expand_runs(args.runs, warn), "candidate")
    baseline = values(expand_runs(args.baseline, warn), "baseline")
    try:
        r = welch_improvement(candidate, baseline, delta=args.delta, alpha=args.alpha)
    except ValueError as exc:
        raise ConfigError(f"significance: {exc}; add runs with other seeds") from None
    unit = "nats" if args.metric == "val_loss" else "bits/byte"
    print(f"candidate: n={r.n_candidate} mean={r.mean_candidate:.6f} std={r.std_candidate:.6f}")
    print(f"baseline:  n={r.n_baseline} mean={r.mean_baseline:.6f} std={r.std_baseline:.6f}")
    print(f"improvement: {r.improvement:.6f} {unit} (required > {r.delta} {unit})")
    print(f"welch one-sided: t={r.t:.4f} df={r.df:.2f} p={r.p:.6g} (alpha {r.alpha})")
    if r.significant:
        print(f"SIGNIFICANT: the candidate beats the baseline by more than {r.delta} {unit} at p < {r.alpha}")
        return 0
    print(f"NOT SIGNIFICANT: an improvement of more than {r.delta} {unit} is not shown at p < {r.alpha}")
    return 1


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    sig = sub.add_parser("significance", parents=[common], help="the record test: Welch t-test of an improvement over baseline runs")
    sig.add_argument("runs", nargs="+", metavar="RUN_DIR", help="candidate runs (one per seed), or a sweep directory (pgolf sweep)")
    sig.add_argument("--baseline", nargs="+", required=True, metavar="RUN_DIR", help="baseline runs (one per seed), or a sweep directory")
    sig.add_argument("--metric", choices=("val_loss", "val_bpb"), default="val_loss", help="the challenge's rule is in nats (val_loss)")
    sig.add_argument("--delta", type=float, default=0.005, help="required improvement (default 0.005)")
    sig.add_argument("--alpha", type=float, default=0.01, help="significance level (default 0.01)")
    sig.set_defaults(func=cmd_significance)
