"""A CPU copy of the official baseline ``train_gpt.py`` for ``pgolf bench baseline --reference`` on a CPU.

Usage: python tools/cpu_baseline_reference.py TRAIN_GPT_PY OUT_PY

The input is the root ``train_gpt.py`` of openai/parameter-golf at 4908dc46f (checked by sha256: a different
script is refused rather than patched differently). Only device and precision plumbing changes, each
substitution exact text with its expected count: CPU device, gloo, no CUDA check, no ``torch.compile`` (model
and Newton-Schulz), no bf16 autocast or model cast, DDP without ``device_ids``, no-op synchronisation, no
``nvidia-smi``. The math, the data order and the optimizer are the script's, so pgolf's baseline and this copy
log the same losses step for step (docs/performance.md, "Step cost on CPU").
"""

from __future__ import annotations

import hashlib
import sys

IN_SHA256 = "c6cae5e767aa0464e8767620f3bbdb08048c99f4b7ae0f0e146dd9b17e68e673"
SUBS = [
    ("bf16 autocast -> CPU autocast, disabled", 'torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=True)',
     'torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=False)', 3),
    ("Newton-Schulz not compiled", "zeropower_via_newtonschulz5 = torch.compile(zeropower_via_newtonschulz5)", "pass", 1),
    ("CUDA-required check removed", '    if not torch.cuda.is_available():\n        raise RuntimeError("CUDA is required")\n', "", 1),
    ("device cuda:local_rank -> cpu", 'device = torch.device("cuda", local_rank)', 'device = torch.device("cpu")', 1),
    ("no set_device", "torch.cuda.set_device(device)", "pass", 1),
    ("nccl -> gloo", 'dist.init_process_group(backend="nccl", device_id=device)', 'dist.init_process_group(backend="gloo")', 1),
    ("model kept fp32 (no .bfloat16())", ").to(device).bfloat16()", ").to(device)", 1),
    ("model not compiled", "compiled_model = torch.compile(base_model, dynamic=False, fullgraph=True)", "compiled_model = base_model", 1),
    ("DDP without device_ids", "DDP(compiled_model, device_ids=[local_rank], broadcast_buffers=False)", "DDP(compiled_model, broadcast_buffers=False)", 1),
    ("synchronize -> no-op", "torch.cuda.synchronize()", "pass", 5),
    ("peak memory -> 0", "torch.cuda.max_memory_allocated()", "0", 1),
    ("reserved memory -> 0", "torch.cuda.max_memory_reserved()", "0", 1),
    ("no nvidia-smi", 'subprocess.run(["nvidia-smi"]', 'subprocess.run(["true"]', 1),
]


def main(src: str, dest: str) -> None:
    text = open(src, encoding="utf-8").read()
    if hashlib.sha256(text.encode()).hexdigest() != IN_SHA256:
        raise SystemExit(f"error: {src} is not the baseline train_gpt.py of openai/parameter-golf at 4908dc46f")
    for why, old, new, count in SUBS:
        found = text.count(old)
        if found != count:
            raise SystemExit(f"error: {why}: found {found} times, expected {count}")
        text = text.replace(old, new)
    compile(text, dest, "exec")
    open(dest, "w", encoding="utf-8").write(text)
    print(f"wrote {dest} ({len(SUBS)} substitutions)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
