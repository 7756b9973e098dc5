"""What a finished run directory says about itself: ``report.md``, ``loss.png``, and ``pgolf compare``.

Everything is read back from the files a run leaves (``summary.json``, ``metrics.jsonl``, ``stack.toml``,
``log.txt``), so a report can be rebuilt for any old run (``pgolf report RUN_DIR``) and compared with
others. Switches that techniques log in the reference scripts' format (``swa:start step:4450``,
``late_qat:enabled step:4717 scale:0.1499``, ``ema:applying EMA weights``) are marked on the curves.
matplotlib is optional (``pip install 'pgolf[plot]'``): without it the markdown is still written and the
report says why there is no picture.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import attrs

from .errors import DataError
from .hookspecs import SLOTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SWITCH = re.compile(r"^(?P<name>[a-z][a-z0-9_]*):(?P<what>start|enabled|applying|disabled)\b(?P<rest>.*)$")
STEP = re.compile(r"step:?\s*(\d+)")
NO_MATPLOTLIB = "matplotlib is not installed (pip install 'pgolf[plot]')"


@attrs.define
class Switch:
    """A technique turning something on (or applying averaged weights) at a step; ``step`` None means after training."""

    name: str
    step: int | None
    line: str


@attrs.define
class RunRecord:
    """One run directory, read back."""

    path: Path
    summary: dict[str, Any]
    submission: dict[str, Any]
    stack: dict[str, Any]
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    finals: list[dict[str, Any]]
    switches: list[Switch]
    status: str = "complete"  # "complete", "failed" (a .failed directory) or "incomplete" (.partial: running, killed)
    error: str = ""  # a failed run's error line
    overrides: list[str] = attrs.field(factory=list)  # the run's --set
    toy: list[str] = attrs.field(factory=list)  # the run's --toy settings
    legacy_env: list[str] = attrs.field(factory=list)

    @property
    def run_id(self) -> str:
        return str(self.summary.get("run_id") or self.path.name)

    @property
    def variant(self) -> str:
        """How this run differs from its stack file: ``toy``, the ``--set`` overrides, the legacy env; ``""`` for
        the stack as written."""
        parts = (["toy"] if self.toy else []) + [f"--set {o}" for o in self.overrides]
        parts += [f"env {e.split(' -> ')[0]}" for e in self.legacy_env]
        return ", ".join(parts)

    @property
    def final_loss(self) -> float | None:
        """The submission's val_loss (nats): the last final evaluation line, as in submission.json."""
        if "val_loss" in self.submission:
            return float(self.submission["val_loss"])
        return float(self.finals[-1]["val_loss"]) if self.finals else None

    @property
    def final_bpb(self) -> float | None:
        if "val_bpb" in self.submission:
            return float(self.submission["val_bpb"])
        return float(self.finals[-1]["val_bpb"]) if self.finals else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:  # also bytes that are not UTF-8
        where = f" ({exc.msg} at line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise DataError(f"{path}: not valid JSON{where}; the run directory is damaged") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: holds a JSON {type(data).__name__}, not an object; the run directory is damaged")
    return data


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What each kind of metrics record must carry (numbers), so that tables and plots can use them as they are.
RECORD_FIELDS = {"train": ("step", "train_loss", "train_time_ms"), "val": ("step", "val_loss", "val_bpb", "train_time_ms"),
                 "final": ("val_loss", "val_bpb")}
SUMMARY_NUMBERS = ("steps", "train_time_ms", "model_params", "bytes_total", "bytes_code", "bytes_model", "seed", "eval_time_ms")


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a torn last line (a killed run) is skipped, anything else damaged is one error."""
    lines = _read_text(path).splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                continue
            raise DataError(f"{path}:{number}: not a JSON record; the run directory is damaged") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: not a JSON object; the run directory is damaged")
        missing = [k for k in RECORD_FIELDS.get(record.get("kind"), ()) if not _is_number(record.get(k))]
        missing += [k for k in ("lr_scale", "eval_time_ms") if k in record and not _is_number(record[k])]
        if record.get("kind") == "final" and not isinstance(record.get("name"), str):
            missing.append("name (a string)")
        if missing:
            raise DataError(f"{path}:{number}: a {record.get('kind')!r} record without a number for {', '.join(missing)}; the run directory is damaged")
        records.append(record)
    return records


def _stack_tables(path: Path) -> dict[str, Any]:
    """The resolved stack as the report reads it: tables that are not tables are left out."""
    if not path.is_file():
        return {}
    try:
        stack = tomllib.loads(_read_text(path))
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{path}: not valid TOML ({exc}); the run directory is damaged") from None
    out = {k: v for k, v in stack.items() if isinstance(v, dict)}
    mods = stack.get("modifier")
    if isinstance(mods, list):
        out["modifier"] = [m for m in mods if isinstance(m, dict)]
    for table in ("run", "meta"):
        for key, value in list(out.get(table, {}).items()):
            if key in ("iterations", "artifact_cap_bytes") and not _is_number(value):
                del out[table][key]
    return out


def read_run(path: str | Path) -> RunRecord:
    """Read a run directory; a path that is not one, or one that is damaged, raises ``DataError`` naming the file."""
    run = Path(path)
    if not run.is_dir():
        raise DataError(f"{run}: not a directory; pass a run directory such as runs/<run_id>")
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.is_file() and not (run / "summary.json").is_file():
        raise DataError(f"{run}: no metrics.jsonl or summary.json; not a pgolf run directory (or the run never started)")
    records = _read_metrics(metrics_path) if metrics_path.is_file() else []
    log_path = run / "log.txt"
    log_text = _read_text(log_path) if log_path.is_file() else ""
    switches = parse_switches(log_text)
    status, error = run_status(run, log_text)
    stack_path = run / "stack.toml"
    header = stack_header(_read_text(stack_path) if stack_path.is_file() else "")
    summary = _read_json(run / "summary.json")
    for key in SUMMARY_NUMBERS:
        if key in summary and not _is_number(summary[key]):
            raise DataError(f"{run / 'summary.json'}: {key} is not a number; the run directory is damaged")
    shapes = {"final": dict, "quantizer_compliance": list, "compliant": bool, "score_line": str, "run_id": str}
    for key, kind in shapes.items():
        if key in summary and not isinstance(summary[key], kind):
            raise DataError(f"{run / 'summary.json'}: {key} is not a {kind.__name__}; the run directory is damaged")
    if any(not isinstance(v, dict) for v in summary.get("final", {}).values()):
        raise DataError(f"{run / 'summary.json'}: final holds an entry that is not an object; the run directory is damaged")
    submission = _read_json(run / "submission.json")
    for key in ("val_loss", "val_bpb"):
        if key in submission and not _is_number(submission[key]):
            raise DataError(f"{run / 'submission.json'}: {key} is not a number; the run directory is damaged")
    return RunRecord(
        path=run,
        summary=summary,
        submission=submission,
        stack=_stack_tables(run / "stack.toml"),
        train=[r for r in records if r.get("kind") == "train"],
        val=[r for r in records if r.get("kind") == "val"],
        finals=[r for r in records if r.get("kind") == "final"],
        switches=switches,
        status=status,
        error=error,
        overrides=header["--set"],
        toy=header["--toy"],
        legacy_env=header["legacy env:"],
    )


def stack_header(text: str) -> dict[str, list[str]]:
    """The comment lines ``stack_to_toml`` writes above a run's resolved stack: its ``--toy`` settings, ``--set``
    overrides and legacy-env mappings (TOML readers drop comments, so they are read here)."""
    out: dict[str, list[str]] = {"--toy": [], "--set": [], "legacy env:": []}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:].strip()
        for prefix in out:
            if body.startswith(prefix + " "):
                out[prefix].append(body[len(prefix) + 1 :])
    return out


def run_status(run: Path, log_text: str) -> tuple[str, str]:
    """``(status, error)`` from the directory's name and the ``run_failed:`` line a failed run logs last."""
    failed = next((line[len("run_failed:") :].strip() for line in reversed(log_text.splitlines()) if line.startswith("run_failed:")), "")
    if ".failed" in run.name:
        return "failed", failed
    if run.name.endswith(".partial"):
        return "incomplete", "still running, or killed (pgolf run STACK --resume DIR continues a checkpointed run)"
    return ("failed", failed) if failed else ("complete", "")


def parse_switches(log_text: str) -> list[Switch]:
    out = []
    for raw in log_text.splitlines():
        line = raw.strip()
        m = SWITCH.match(line)
        if not m:
            continue
        step = STEP.search(m.group("rest"))
        # A switch happens at a step; only "applying" (averaged weights, after training) may come without one.
        if step or m.group("what") == "applying":
            out.append(Switch(f"{m.group('name')}:{m.group('what')}", int(step.group(1)) if step else None, line))
    return out


# ---------------------------------------------------------------------------------------------------------
# report.md


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def render_markdown(run: RunRecord, plot_note: str | None) -> str:
    s, stack = run.summary, run.stack
    meta = stack.get("meta", {})
    title = meta.get("name") or Path(str(s.get("stack", ""))).stem or run.run_id
    lines = [f"# {title}: run {run.run_id}", ""]
    if meta.get("description"):
        lines += [meta["description"], ""]
    steps, train_ms = s.get("steps"), s.get("train_time_ms")
    iterations = stack.get("run", {}).get("iterations")
    stopped = f" of {iterations} (stopped at the wallclock cap)" if iterations and steps is not None and steps < iterations else ""
    cap = stack.get("run", {}).get("artifact_cap_bytes")
    step_ms = train_ms / steps if steps and train_ms is not None else None
    status = {"complete": "complete", "failed": f"**failed**: {run.error or '(no error line in log.txt)'}"}.get(run.status, f"**{run.status}**: {run.error}")
    rows = [
        ("status", status),
        ("final val_bpb", f"{_fmt(run.final_bpb, '.8f')}" + (f" ({run.finals[-1].get('name')})" if run.finals else "")),
        ("final val_loss", f"{_fmt(run.final_loss, '.8f')} nats"),
        ("stack", f"`{s.get('stack', '-')}`" + (f" (PR #{meta['pr']})" if meta.get("pr") else "")),
        ("seed", _fmt(s.get("seed"))),
        *([("variant of the stack", variant_text(run))] if run.variant else []),
        ("steps", f"{_fmt(steps)}{stopped}"),
        ("train time", f"{_fmt(train_ms / 1000.0 if train_ms is not None else None, '.1f')} s ({_fmt(step_ms, '.2f')} ms/step)"),
        ("parameters", _fmt(s.get("model_params"), ",")),
        (
            "artifact",
            f"{_fmt(s.get('bytes_total'), ',')} bytes (code {_fmt(s.get('bytes_code'), ',')} + model {_fmt(s.get('bytes_model'), ',')})"
            + (f" of the {cap:,}-byte cap" if cap else ""),
        ),
        ("compliant evaluation", {True: "yes", False: "no"}.get(s.get("compliant"), "-")),
    ]
    if meta.get("reported_val_bpb") is not None:
        rows.append(("reported val_bpb", _fmt(meta["reported_val_bpb"])))
    lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]

    techniques = [(slot, stack[slot]["use"]) for slot in SLOTS if isinstance(stack.get(slot), dict) and "use" in stack[slot]]
    techniques += [(f"modifier[{i}]", f"{m.get('use')} (layers {m.get('layers', 'all')!r})") for i, m in enumerate(stack.get("modifier", []))]
    if techniques:
        lines += ["## Techniques", "", "| slot | technique |", "|---|---|", *(f"| {a} | {b} |" for a, b in techniques), ""]
        lines += ["The resolved stack is `stack.toml`; the full log is `log.txt`.", ""]

    if run.switches:
        lines += ["## Switches", ""]
        lines += [f"- {'after training' if w.step is None else f'step {w.step}'}: `{w.line}`" for w in run.switches]
        lines += [""]

    if run.val:
        lines += ["## Validation during training", "", "| step | train time (s) | val_loss | val_bpb |", "|---:|---:|---:|---:|"]
        lines += [
            f"| {v.get('step')} | {_fmt(v.get('train_time_ms', 0) / 1000.0, '.1f')} | {_fmt(v.get('val_loss'), '.4f')} | {_fmt(v.get('val_bpb'), '.4f')} |"
            for v in run.val
        ]
        lines += [""]
    if run.finals:
        rules = s.get("final", {}) if isinstance(s.get("final"), dict) else {}

        def allowed(name: str) -> str:
            check = rules.get(name) or rules.get(str(name).removesuffix("_exact")) or {}
            return {True: "yes", False: "**no**"}.get(check.get("compliant"), "-")

        lines += ["## Final evaluation (after the artifact round trip)", "",
                  "| line | val_loss | val_bpb | eval time (ms) | allowed by the rules |", "|---|---:|---:|---:|---|"]
        lines += [
            f"| {f.get('name')} | {_fmt(f.get('val_loss'), '.8f')} | {_fmt(f.get('val_bpb'), '.8f')} | {_fmt(f.get('eval_time_ms'), '.0f')} | {allowed(f.get('name'))} |"
            for f in run.finals
        ]
        lines += [""]
        why = [(name, c) for name, c in rules.items() if isinstance(c, dict) and c.get("compliance")]
        why += [(c.get("what"), {"compliant": c.get("ok"), "compliance": c.get("reason")}) for c in s.get("quantizer_compliance", []) if isinstance(c, dict)]
        if why:
            lines += ["## Compliance", ""]
            lines += [f"- `{name}`: {'allowed' if c.get('compliant') else '**not allowed**'} — {c.get('compliance')}" for name, c in why]
            if s.get("score_line"):
                lines += [f"- submission.json carries `{s['score_line']}`."]
            lines += [""]
    lines += ["## Curves", ""]
    lines += [f"loss.png was not drawn: {plot_note}." if plot_note else "![train and validation loss, LR multiplier](loss.png)"]
    return "\n".join(lines) + "\n"


def variant_text(run: RunRecord) -> str:
    parts = [f"toy (`--toy`, {len(run.toy)} settings; `stack.toml` lists them)"] if run.toy else []
    parts += [f"`--set {o}`" for o in run.overrides]
    parts += [f"legacy env `{e}`" for e in run.legacy_env]
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# plots


def _figure(rows: int, cols: int, size: tuple[float, float]) -> Any:
    """A matplotlib Figure without pyplot (no GUI backend, safe in threads and on headless machines)."""
    from matplotlib.figure import Figure

    return Figure(figsize=size, layout="constrained")


def _save_figure(fig: Any, path: str | Path) -> None:
    """PNG bytes rendered in memory, then written under a temporary name and renamed."""
    import io

    from .rundir import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(Path(path), buf.getvalue())


def plot_run(run: RunRecord, path: Path) -> None:
    fig = _figure(1, 3, (15, 4.2))
    by_step, by_time, lr = fig.subplots(1, 3)
    for ax, key, scale, label in ((by_step, "step", 1.0, "step"), (by_time, "train_time_ms", 1e-3, "train time (s)")):
        if run.train:
            ax.plot([r[key] * scale for r in run.train], [r["train_loss"] for r in run.train], label="train loss", lw=1)
        if run.val:
            ax.plot([r[key] * scale for r in run.val], [r["val_loss"] for r in run.val], "o-", label="val loss", ms=4)
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
    if run.train and any("lr_scale" in r for r in run.train):
        lr.plot([r["step"] for r in run.train], [r.get("lr_scale", float("nan")) for r in run.train], color="tab:green")
    lr.set_xlabel("step")
    lr.set_ylabel("LR multiplier")
    lr.grid(alpha=0.3)
    last = run.summary.get("steps") or (run.train[-1]["step"] if run.train else 0)
    for w in run.switches:
        x = last if w.step is None else w.step
        for ax in (by_step, lr):
            ax.axvline(x, color="tab:red", ls="--", lw=0.8)
            ax.annotate(w.name, (x, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=7)
    if run.train or run.val:
        by_step.legend()
    fig.suptitle(f"{run.run_id}: final val_bpb {_fmt(run.final_bpb, '.4f')}")
    _save_figure(fig, path)


def write_report(run_dir: str | Path) -> tuple[Path, Path | None]:
    """Write ``report.md`` (always) and ``loss.png`` (with matplotlib) into a finished run directory."""
    from .rundir import atomic_write

    run = read_run(run_dir)
    png: Path | None = run.path / "loss.png"
    note = None
    try:
        plot_run(run, png)
    except ImportError:
        png, note = None, NO_MATPLOTLIB
    md = run.path / "report.md"
    atomic_write(md, render_markdown(run, note).encode("utf-8"))
    return md, png


# ---------------------------------------------------------------------------------------------------------
# compare


def compare_table(runs: list[RunRecord]) -> str:
    """A markdown table of several runs: the ablation picture in numbers. A failed or unfinished run shows
    its status and how far it got (its last logged step and validation), and its error below the table."""
    head = "| run | stack | status | seed | steps | train s | params | bytes_total | val_loss | val_bpb | within the rules | variant |"
    rows = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    notes = []
    for r in runs:
        s = r.summary
        stack_meta = r.stack.get("meta", {}) if isinstance(r.stack.get("meta"), dict) else {}
        stack = s.get("stack") or stack_meta.get("name") or "-"
        steps = s.get("steps", r.train[-1]["step"] if r.train else None)
        train_ms = s.get("train_time_ms", r.train[-1].get("train_time_ms") if r.train else None)
        train_s = train_ms / 1000.0 if train_ms is not None else None
        loss, bpb = r.final_loss, r.final_bpb
        if loss is None and r.val:  # not finished: the last validation it reached
            loss, bpb = r.val[-1].get("val_loss"), r.val[-1].get("val_bpb")
        rules = {True: "yes", False: "**no**"}.get(s.get("compliant"), "-")
        seed = s.get("seed", r.stack.get("run", {}).get("seed") if isinstance(r.stack.get("run"), dict) else None)
        rows.append(
            f"| {r.run_id} | {stack} | {r.status} | {_fmt(seed)} | {_fmt(steps)} | {_fmt(train_s, '.1f')} | "
            f"{_fmt(s.get('model_params'), ',')} | {_fmt(s.get('bytes_total'), ',')} | {_fmt(loss, '.5f')} | {_fmt(bpb, '.5f')} | "
            f"{rules} | {r.variant or '-'} |"
        )
        if r.status != "complete":
            notes.append(f"{r.run_id}: {r.status}" + (f": {r.error}" if r.error else "") + ("; val_loss/val_bpb are its last validation" if r.val and r.final_loss is None else ""))
    return "\n".join(rows + [""] + notes if notes else rows) + "\n"


def plot_compare(runs: list[RunRecord], path: Path) -> None:
    fig = _figure(1, 2, (12, 4.2))
    train_ax, val_ax = fig.subplots(1, 2)
    for r in runs:
        (line,) = train_ax.plot([x["step"] for x in r.train], [x["train_loss"] for x in r.train], lw=1, label=r.run_id)
        if r.val:
            val_ax.plot([x["step"] for x in r.val], [x["val_bpb"] for x in r.val], "o-", ms=3, color=line.get_color(), label=r.run_id)
    train_ax.set(xlabel="step", ylabel="train loss (nats)")
    val_ax.set(xlabel="step", ylabel="val_bpb")
    for ax in (train_ax, val_ax):
        ax.grid(alpha=0.3)
    if any(r.train for r in runs):
        train_ax.legend(fontsize=7)
    _save_figure(fig, path)
