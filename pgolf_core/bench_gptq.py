"""``pgolf bench-gptq STACK``: time GPTQ's post-training phases (self-generated calibration, Hessians, quantization).

Why: in the PR #1019 line the references spent ~430 s after the training clock on these phases, a budget
that decides whether a recipe evaluates within its 600 s. This builds the stack's model (its real sizes,
or smaller with ``--set``), perturbs the initial weights so that every layer contributes (the timings do not
depend on training), and times each phase the way the quantizer runs it, once per ``gen_kv_cache`` mode asked
for. Generation and Hessians run under the stack's autocast on the chosen device; GPTQ itself on the CPU,
as in a run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_gptq_bench(stack: Any, registry: Any, *, device: str, seqs: int | None, seq_len: int | None, modes: list[str], quantize: bool) -> dict:
    from plugins.quantizer.gptq import GPTQ, ar_generate, collect_hessians, decode_mismatch

    from .model.gpt import build_model
    from .model.layers import cast_for_device

    choice = stack.slots["quantizer"]
    if choice.technique != "gptq":
        raise ConfigError(f"{stack.path}: quantizer is '{choice.technique}'; bench-gptq times the 'gptq' quantizer")
    p = choice.params
    dev = torch.device(device)
    seqs = seqs or p.calib_seqs
    seq_len = seq_len or p.calib_seq_len or stack.data.train_seq_len
    torch.manual_seed(stack.run.seed)
    model, _ = build_model(stack, registry)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in model.parameters():
            w.add_(torch.randn(w.shape, generator=gen) * 0.02)
    model = model.to(dev).eval()
    bf16 = dev.type == "cuda"
    if bf16:
        cast_for_device(model, True)
    for topo in [m for m in model.modules() if hasattr(m, "recur_active")]:
        topo.recur_active = True  # the model as it is after training
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
        _, stats = q.quantize(state)
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
    from .rundir import atomic_write

    atomic_write(Path(path), json.dumps(result, indent=1).encode("utf-8"))
