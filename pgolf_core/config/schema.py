"""The core-owned tables of a stack file and the resolved ``Stack``.

Defaults are the official baseline ``train_gpt.py``'s, so an empty table means "as the reference does".
Technique parameters live in the techniques' own attrs classes (see ``plugins/``).
"""

from __future__ import annotations

from typing import Any, Optional

import attrs

from .fields import bounded, no_nul, non_negative, one_of, param, run_name

SCHEMA_VERSION = 1

# Ranges of the core fields. Each bound is a fact, not a taste: seeds are what numpy accepts, token ids are
# uint16 in the challenge's shard format, sizes are what an int32 tensor index reaches, and a model deeper
# than MAX_LAYERS takes longer to build (even on the meta device) than ``pgolf validate`` may take to answer.
MAX_SEED = 2**32 - 1
MAX_VOCAB = 2**16
MAX_LAYERS = 1024
MAX_SIZE = 2**31 - 1
MAX_SECONDS = 1e9


@attrs.define(frozen=True, kw_only=True)
class MetaConfig:
    name: str = param("", help="short name of the recipe")
    description: str = param("", help="one paragraph on what the recipe does")
    pr: Optional[int] = param(None, help="openai/parameter-golf pull request number")
    source: str = param("", help="link to the reference script")
    author: str = param("", help="author, copied into submission.json")
    github_id: str = param("", help="GitHub id, copied into submission.json")
    reported_val_bpb: Optional[float] = param(None, help="val_bpb the PR reported", unit="bits/byte", validator=attrs.validators.optional(non_negative))
    reported_bytes: Optional[int] = param(None, help="artifact bytes the PR reported", unit="bytes", validator=attrs.validators.optional(non_negative))


@attrs.define(frozen=True, kw_only=True)
class RunConfig:
    seed: int = param(1337, help="seed for python, numpy and torch (same on every rank)", env="SEED", validator=bounded(0, MAX_SEED))
    run_id: str = param("", help="run directory name under out_dir (a name, not a path); a timestamped id when empty", env="RUN_ID", validator=run_name)
    out_dir: str = param("runs", help="directory that receives runs/<run_id>/", validator=no_nul)
    iterations: int = param(20000, help="training steps (the schedule's horizon)", env="ITERATIONS", validator=bounded(0, MAX_SIZE))
    warmup_steps: int = param(
        20, help="compile-priming steps; weights and optimizer state are restored afterwards", env="WARMUP_STEPS", validator=bounded(0, MAX_SIZE)
    )
    max_wallclock_seconds: float = param(
        600.0, help="training time cap; 0 disables the cap", unit="s", env="MAX_WALLCLOCK_SECONDS", validator=bounded(0, MAX_SECONDS)
    )
    val_loss_every: int = param(1000, help="validate every N steps; 0 only at the end", env="VAL_LOSS_EVERY", validator=bounded(0, MAX_SIZE))
    train_log_every: int = param(200, help="log train loss every N steps (and the first 10)", env="TRAIN_LOG_EVERY", validator=bounded(0, MAX_SIZE))
    grad_accum_base: int = param(
        8, help="micro-batches per step on one process; each of W ranks runs grad_accum_base // W", validator=bounded(1, 2**16)
    )
    device: str = param("auto", help="'auto' (cuda when available), 'cuda' or 'cpu'", validator=one_of("auto", "cuda", "cpu"))
    compile: str = param("auto", help="torch.compile the model: 'auto' (on for cuda), 'on', 'off'", validator=one_of("auto", "on", "off"))
    recompile_limit: int = param(
        8,
        help="graphs torch.compile may build per compiled function before a fullgraph run fails (dynamo's recompile_limit; "
        "8 is torch's default, PR #1392 raised it to 32 and PR #1319 to 64); 'pgolf rehearse' checks a stack stays 2 below it",
        validator=bounded(1, 2**16),
    )
    artifact_cap_bytes: int = param(16_000_000, help="size cap for code + compressed model", unit="bytes", validator=bounded(1, 2**62))
    save_raw_model: bool = param(False, help="also write the unquantized state dict (final_model.pt)")
    on_nonfinite: str = param(
        "stop",
        help="a NaN/inf loss or gradient: 'stop' (found at the loop's next host read, a logged step at the latest, with no "
        "cost per step; fail naming the step; checkpoints hold only states checked finite) or 'skip' (drop exactly that "
        "step's update, log it, continue; skips are counted in summary.json; a host read and, under torchrun, an all-reduce per step)",
        validator=one_of("stop", "skip"),
    )


@attrs.define(frozen=True, kw_only=True)
class DataConfig:
    path: str = param(
        "./data/datasets/fineweb10B_sp1024",
        help="directory of fineweb_{train,val}_*.bin shards, or 'sample:sp1024' for the built-in sample",
        env="DATA_PATH",
        validator=no_nul,
    )
    tokenizer: str = param(
        "./data/tokenizers/fineweb_1024_bpe.model",
        help="SentencePiece .model used for the byte counts of val_bpb ('sample:sp1024' for the bundled one)",
        env="TOKENIZER_PATH",
        validator=no_nul,
    )
    train_batch_tokens: int = param(524_288, help="tokens per optimizer step, all ranks", env="TRAIN_BATCH_TOKENS", validator=bounded(1, MAX_SIZE))
    train_seq_len: int = param(1024, help="training sequence length", unit="tokens", env="TRAIN_SEQ_LEN", validator=bounded(1, MAX_SIZE))
    val_batch_size: int = param(524_288, help="validation tokens per batch, all ranks", env="VAL_BATCH_SIZE", validator=bounded(1, MAX_SIZE))


@attrs.define(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int = param(1024, help="must equal the tokenizer's vocabulary", env="VOCAB_SIZE", validator=bounded(1, MAX_VOCAB))
    num_layers: int = param(9, env="NUM_LAYERS", validator=bounded(1, MAX_LAYERS))
    model_dim: int = param(512, env="MODEL_DIM", validator=bounded(1, MAX_SIZE))
    num_heads: int = param(8, env="NUM_HEADS", validator=bounded(1, MAX_SIZE))
    num_kv_heads: int = param(4, env="NUM_KV_HEADS", validator=bounded(1, MAX_SIZE))
    tie_embeddings: bool = param(True, help="output head reuses the token embedding", env="TIE_EMBEDDINGS")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads


CORE_TABLES: dict[str, type] = {"meta": MetaConfig, "run": RunConfig, "data": DataConfig, "model": ModelConfig}


@attrs.define(frozen=True)
class Choice:
    """A slot's chosen technique with its structured parameters."""

    technique: str
    params: Any
    distribution: str = ""
    version: str = ""


@attrs.define(frozen=True)
class ModifierChoice:
    technique: str
    params: Any
    layers: Any  # selector as written: "all", "last 4", "first 2", "-4:", or a list of indices
    distribution: str = ""
    version: str = ""


@attrs.define(frozen=True, kw_only=True)
class Stack:
    """A fully resolved, validated stack: what ``pgolf config`` prints and a run records."""

    path: str
    schema_version: int
    meta: MetaConfig
    run: RunConfig
    data: DataConfig
    model: ModelConfig
    slots: dict[str, Choice]
    modifiers: tuple[ModifierChoice, ...] = ()
    overrides: tuple[str, ...] = ()
    legacy_env: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()  # [requires] plugins: distributions the stack needs
    toy: tuple[str, ...] = ()  # ``key=value`` settings of ``--toy`` (pgolf_core.toy), applied before ``overrides``

    def params(self, slot: str) -> Any:
        return self.slots[slot].params

    def technique(self, slot: str) -> str:
        return self.slots[slot].technique
