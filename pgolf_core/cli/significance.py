"""``pgolf significance``: the challenge's record test, a one-sided Welch t-test of the candidate runs'
improvement over baseline runs (one per seed); exit code 1 when it is not significant, so scripts can branch."""

from __future__ import annotations

import argparse

from ..errors import ConfigError


def cmd_significance(args: argparse.Namespace) -> int:
    import sys

    from ..report import read_run
    from ..stats import welch_improvement
    from ..sweep import expand_runs

    def warn(line: str) -> None:
        print(f"warning: {line}", file=sys.stderr)

    def values(paths: list[str], side: str) -> list[float]:
        out = []
        for path in paths:
            run = read_run(path)
            value = run.final_loss if args.metric == "val_loss" else run.final_bpb
            if value is None:
                raise ConfigError(f"{path}: no final {args.metric} (submission.json or a final metrics record); is the run finished?")
            seed = run.summary.get("seed", "?")
            print(f"{side:<9} {run.run_id}  seed {seed}  {args.metric} {value:.8f}")
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
