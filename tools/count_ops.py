"""Count what a whole process runs: every aten op the dispatcher sees (``--python``: every Python call instead).

    python tools/count_ops.py OUT.json [--python] -- SCRIPT ARGS...       # a script, e.g. a reference train_gpt.py
    python tools/count_ops.py OUT.json [--python] -- -m MODULE ARGS...    # a module, e.g. -m pgolf run STACK
    python tools/count_ops.py --per-step STEPS A_LONG A_SHORT B_LONG B_SHORT   # compare two programs' steps

Counts are exact and do not depend on the machine's load, so they show where one training loop does more work
than another on a busy machine where wall times cannot. Run each program twice, with ITERATIONS differing by
STEPS and nothing else; the difference of the two counts is the work of STEPS training steps alone (start-up,
validation, quantization and evaluation cancel). ``--per-step`` prints those differences per op side by side and
the ops whose counts differ. How it was used: docs/performance.md, "Step cost on CPU".
"""

from __future__ import annotations

import atexit
import collections
import json
import runpy
import sys


def _count(out: str, python: bool, target: list[str]) -> None:
    counts: collections.Counter[str] = collections.Counter()
    atexit.register(lambda: json.dump(dict(counts), open(out, "w"), indent=0, sort_keys=True))
    if python:
        def profile(frame, event, arg):
            if event == "call":
                code = frame.f_code
                counts[f"{code.co_filename}:{code.co_firstlineno}:{code.co_name}"] += 1
            elif event == "c_call":
                counts[f"C:{getattr(arg, '__qualname__', arg)}"] += 1
        sys.setprofile(profile)
    else:
        from torch.utils._python_dispatch import TorchDispatchMode

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts[str(func.overloadpacket)] += 1
                return func(*args, **(kwargs or {}))

        Ops().__enter__()
    if target[0] == "-m":
        sys.argv = target[1:]
        try:
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            if exit_.code not in (None, 0):
                raise
    else:
        sys.argv = target
        runpy.run_path(target[0], run_name="__main__")


def _per_step(steps: int, a_long: str, a_short: str, b_long: str, b_short: str) -> None:
    def diff(long: str, short: str) -> dict[str, int]:
        x, y = json.load(open(long)), json.load(open(short))
        return {k: x.get(k, 0) - y.get(k, 0) for k in set(x) | set(y)}

    a, b = diff(a_long, a_short), diff(b_long, b_short)
    print(f"per step: A {sum(a.values()) / steps:.1f}, B {sum(b.values()) / steps:.1f}")
    for key in sorted(set(a) | set(b)):
        if a.get(key, 0) != b.get(key, 0):
            print(f"  {key:60s} A {a.get(key, 0) / steps:9.1f}  B {b.get(key, 0) / steps:9.1f}")


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--per-step"] and len(argv) == 6:
        _per_step(int(argv[1]), *argv[2:])
    elif "--" in argv and argv.index("--") in (1, 2) and len(argv) > argv.index("--") + 1:
        sep = argv.index("--")
        _count(argv[0], "--python" in argv[1:sep], argv[sep + 1:])
    else:
        raise SystemExit(__doc__)
