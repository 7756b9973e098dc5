"""``pgolf bench-gptq STACK``: time GPTQ's post-training phases (self-generated calibration, Hessians, quantization).

A command the gptq plugin adds to ``pgolf`` (``pgolf_add_commands``), so the core knows nothing of it.

Why: in the PR #1019 line the references spent ~430 s after the training clock on these phases, a budget
that decides whether a recipe evaluates within its 600 s. This builds the stack's model (its real sizes,
or smaller with ``--set``), perturbs the initial weights so that every layer contributes (the timings do not
depend on training), and times each phase the way the quantizer runs it, once per ``gen_kv_cache`` mode asked
for. Generation and Hessians run under the stack's autocast on the chosen device; GPTQ itself on the CPU,
as in a run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from pgolf_core.calibration import ar_generate, collect_hessians, decode_mismatch
from pgolf_core.cli.common import add_stack_args, check_output_file, load_stack_and_registry
from pgolf_core.contracts import loop_handlers
from pgolf_core.errors import ConfigError
from pgolf_core.hookspecs import hookimpl
from pgolf_core.model.roles import parameter_roles


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_gptq_bench(stack: Any, registry: Any, *, device: str, seqs: int | None, seq_len: int | None, modes: list[str], quantize: bool) -> dict:
    from pgolf_core.model.gpt import build_model
    from pgolf_core.model.layers import cast_for_device

    from .gptq import GPTQ

    choice = stack.slots["quantizer"]
    if choice.technique != "gptq":
        raise ConfigError(f"{stack.path}: quantizer is '{choice.technique}'; bench-gptq times the 'gptq' quantizer")
    p = choice.params
    dev = torch.device(device)
    seqs = seqs or p.calib_seqs
    seq_len = seq_len or p.calib_seq_len or stack.data.train_seq_len
    torch.manual_seed(stack.run.seed)
    model, modifiers = build_model(stack, registry)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in model.parameters():
            w.add_(torch.randn(w.shape, generator=gen) * 0.02)
    model = model.to(dev).eval()
    bf16 = dev.type == "cuda"
    if bf16:
        cast_for_device(model, True)
    ended = type("State", (), {"log": staticmethod(lambda *a, **k: None), "step": 0})()
    for handler in loop_handlers(modifiers, "on_train_end"):
        handler(ended)  # the model as it is after training (e.g. depth recurrence switched on for evaluation)
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16)
    vocab = stack.model.vocab_size
    result: dict[str, Any] = {"stack": str(stack.path), "device": str(dev), "seqs": seqs, "seq_len": seq_len,
                              "gen_batch": p.gen_batch, "torch": torch.__version__, "generate_s": {}}
    with autocast, torch.inference_mode():
        result["kv_cache_check"] = decode_mismatch(model, vocab, dev) or "ok"
    batches = None
    for mode in modes:
        _sync(dev)
        t0 = time.perf_counter()
        with autocast:
            out = ar_generate(model, num_seqs=seqs, seq_len=seq_len, vocab_size=vocab, temperature=p.temperature,
                              batch_size=p.gen_batch, seed=stack.run.seed, rng=p.gen_rng, device=dev, kv_cache=mode)
        _sync(dev)
        result["generate_s"][mode] = round(time.perf_counter() - t0, 3)
        batches = batches or out
    seqs_list = batches if p.gen_rng == "pr1319" else [b[i : i + 1] for b in batches for i in range(b.shape[0])]
    _sync(dev)
    t0 = time.perf_counter()
    with autocast:
        hessians = collect_hessians(model, ((s[:, :-1], s[:, 1:]) for s in seqs_list), damp=p.collect_damp)
    _sync(dev)
    result["hessians_s"] = round(time.perf_counter() - t0, 3)
    if quantize:
        q = GPTQ(p)
        q.hessians = hessians
        state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        t0 = time.perf_counter()
        _, stats = q.quantize(state, parameter_roles(model))
        result["gptq_s"] = round(time.perf_counter() - t0, 3)
        result["gptq_matrices"] = stats["num_gptq"]
    return result


def format_gptq_bench(result: dict) -> str:
    lines = [f"bench-gptq {result['stack']} device:{result['device']} seqs:{result['seqs']} seq_len:{result['seq_len']} "
             f"gen_batch:{result['gen_batch']} kv_cache_check:{result['kv_cache_check']}"]
    for mode, secs in result["generate_s"].items():
        lines.append(f"generate kv_cache:{mode} {secs:.3f}s")
    lines.append(f"hessians {result['hessians_s']:.3f}s")
    if "gptq_s" in result:
        lines.append(f"gptq {result['gptq_s']:.3f}s matrices:{result['gptq_matrices']}")
    return "\n".join(lines)


def dump(result: dict, path: str) -> None:
    from pgolf_core.rundir import atomic_write

    atomic_write(Path(path), json.dumps(result, indent=1).encode("utf-8"))


def cmd_bench_gptq(args: argparse.Namespace) -> int:
    check_output_file("--json", args.json)  # before minutes of generation and GPTQ
    stack, registry = load_stack_and_registry(args)
    modes = [m.strip() for m in args.kv_cache.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("exact", "approximate", "off")]
    if bad or not modes:
        raise ConfigError(f"--kv-cache {args.kv_cache}: expected a comma list of exact, approximate, off")
    result = run_gptq_bench(stack, registry, device=args.device, seqs=args.seqs, seq_len=args.seq_len, modes=modes, quantize=not args.no_quantize)
    print(format_gptq_bench(result))
    if args.json:
        dump(result, args.json)
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@hookimpl
def pgolf_add_commands(subparsers, common) -> None:
    bg = subparsers.add_parser("bench-gptq", parents=[common], help="time GPTQ's self-generated calibration, Hessians and quantization for a stack's model")
    add_stack_args(bg)
    bg.add_argument("--device", default="cuda" if _cuda_available() else "cpu", help="where generation and Hessians run (default: cuda when present)")
    bg.add_argument("--seqs", type=int, help="calibration sequences (default: the stack's calib_seqs)")
    bg.add_argument("--seq-len", type=int, help="tokens per sequence (default: the stack's calib_seq_len or train_seq_len)")
    bg.add_argument("--kv-cache", default="off,exact,approximate", help="generation modes to time, comma-separated (default: all three)")
    bg.add_argument("--no-quantize", action="store_true", help="skip the GPTQ pass itself")
    bg.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    bg.set_defaults(func=cmd_bench_gptq)
