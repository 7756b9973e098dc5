"""Shared test helpers: paths to the fixtures, running the CLI in a subprocess, reading logs."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers (pytest -n) share the machine's cores: one intra-op thread each, for this process and
    # the runs it starts, since busy-waiting OpenMP pools on an oversubscribed machine turn seconds into minutes.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
# The fixtures and reference trajectories ship in tests/data/ (see its README), and the tokenizers are the ones
# pgolf bundles for its samples, so a clone of the repository alone runs the whole suite. PGOLF_SHARED points
# the suite at another copy of the same layout (data/fixture_sp*, data/tokenizers, parity) instead.
DATA = Path(__file__).resolve().parent / "data"
SAMPLES = REPO / "pgolf_core" / "sample"
SHARED = Path(os.environ["PGOLF_SHARED"]) if os.environ.get("PGOLF_SHARED") else None
FIXTURE_1024 = SHARED / "data" / "fixture_sp1024" if SHARED else DATA / "fixture_sp1024"
FIXTURE_4096 = SHARED / "data" / "fixture_sp4096" if SHARED else DATA / "fixture_sp4096"
FIXTURE_8192 = SHARED / "data" / "fixture_sp8192" if SHARED else DATA / "fixture_sp8192"
TOKENIZER_1024 = SHARED / "data" / "tokenizers" / "fineweb_1024_bpe.model" if SHARED else SAMPLES / "fineweb_1024_bpe.model"
TOKENIZER_4096 = SHARED / "data" / "tokenizers" / "fineweb_4096_bpe.model" if SHARED else SAMPLES / "fineweb_4096_bpe.model"
TOKENIZER_8192 = SHARED / "data" / "tokenizers" / "fineweb_8192_bpe.model" if SHARED else SAMPLES / "fineweb_8192_bpe.model"
PARITY = SHARED / "parity" if SHARED else DATA / "parity"
STACKS = REPO / "stacks"


# Every run counts its code as the packed export of its stack, a pure function of the stack and the source; one
# cache for the whole session (and its workers) saves packing the same stack in every test that runs it.
os.environ.setdefault("PGOLF_EXPORT_CACHE", os.path.join(tempfile.gettempdir(), f"pgolf-tests-export-cache-{os.getuid()}"))


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "TMPDIR", "OMP_NUM_THREADS", "PGOLF_EXPORT_CACHE")
    full_env = {k: v for k, v in os.environ.items() if not k.isupper() or k in keep}
    full_env.setdefault("PGOLF_CACHE", str(cwd / ".cache"))
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pgolf", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def parity_case(name: str, case: str) -> dict:
    return json.loads((PARITY / f"{name}.json").read_text())[case]


# The reference trajectories reproduce with PyTorch's AVX2 CPU kernels. On a machine with AVX-512 the kernels sum in
# another order, and once late QAT rounds the weights those last-bit differences grow to ~3e-3 in a few steps (past the
# 2e-3 tolerance), so the parity runs pin the kernel set; it changes nothing on machines without AVX-512.
PARITY_CPU_CAPABILITY = {"ATEN_CPU_CAPABILITY": "avx2"}


def legacy_env(case: dict, data: Path, tokenizer: Path) -> dict[str, str]:
    env = {k.upper(): v for k, v in case["env"].items()}
    env.update(PARITY_CPU_CAPABILITY)
    env["DATA_PATH"] = str(data)
    env["TOKENIZER_PATH"] = str(tokenizer)
    return env


REFERENCE_CONTROL_PATTERNS = (
    "attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes", "q_gain", "skip_weight", "skip_weights",
    "smear", "bigram.scale", "xsa_gate", "ve_layer_scales", "ve_shared.scale",
    "skip_gates",  # the #1218 record's addition (sigmoid-gated U-Net skips)
)
"""The reference scripts' ``CONTROL_TENSOR_NAME_PATTERNS`` (the #315/#450 line's list): tests of quantizers give
their hand-made state dicts the roles these names had there."""


def reference_roles(names) -> dict[str, str]:
    return {n: "control" if any(p in n for p in REFERENCE_CONTROL_PATTERNS) else "weight" for n in names}


@pytest.fixture
def registry():
    from pgolf_core.registry import default_registry

    return default_registry()


def tiny_stack(registry, *overrides: str, path: Path | None = None):
    """The baseline stack at a tiny size on the sp1024 fixture, with extra ``--set`` overrides."""
    from pgolf_core.config import load_stack

    base = [
        "model.num_layers=4",
        "model.model_dim=64",
        "model.num_heads=4",
        "model.num_kv_heads=2",
        "data.train_seq_len=64",
        "data.train_batch_tokens=4096",
        "data.val_batch_size=8192",
        f'data.path="{FIXTURE_1024}"',
        f'data.tokenizer="{TOKENIZER_1024}"',
        "run.iterations=2",
        "run.warmup_steps=0",
        "run.max_wallclock_seconds=0.0",
        "run.val_loss_every=0",
        "run.train_log_every=1",
    ]
    return load_stack(path or STACKS / "baseline.toml", registry, overrides=[*base, *overrides])


# The slowest modules (whole tiny runs in subprocesses) go first, so that with two workers (pytest -n 2) they run
# side by side from the start and the short tests fill in at the end, instead of one long run finishing alone.
SLOW_MODULES = (
    "test_parity_stacks.py", "test_resume.py", "test_parity_baseline.py", "test_reliability.py", "test_toy.py", "test_loop_workflow.py",
    "test_reliability_rundir.py", "test_reliability_process.py", "test_reliability_fuzz.py", "test_gpu_check.py",
)


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        name = item.path.name
        return SLOW_MODULES.index(name) if name in SLOW_MODULES else len(SLOW_MODULES)

    items.sort(key=rank)
