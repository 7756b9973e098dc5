"""The process layout a launcher describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

Read in one place and checked before anything starts, so that a stray ``RANK`` in a shell, a typo, or a
multi-process layout without a launcher is one line instead of a traceback or a process group that waits
forever for peers. No torch here: the CLI reads this before it imports anything heavy.
"""

from __future__ import annotations

import os
from typing import Mapping

import attrs

from .errors import ConfigError

TORCHRUN_MARKERS = ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE")
"""Set by torchrun's agent for its workers (and by nothing a user exports by accident)."""
LAUNCH = "launch several processes with torchrun (or 'pgolf run --nproc-per-node N'), or unset RANK and WORLD_SIZE to run one"


@attrs.define(frozen=True)
class ProcessEnv:
    distributed: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(f"environment {name}={raw!r}: not an integer; {LAUNCH}") from None


def read_process_env(environ: Mapping[str, str] | None = None) -> ProcessEnv:
    """The layout, or one ``ConfigError`` line. RANK and WORLD_SIZE come together (torchrun sets both). Several
    processes must come from torchrun (its agent's variables are present, MASTER_ADDR and MASTER_PORT too):
    a RANK/WORLD_SIZE exported by hand would have the process group wait for peers that never come. A world of
    one without torchrun is simply one process."""
    env = os.environ if environ is None else environ
    has_rank, has_world = "RANK" in env, "WORLD_SIZE" in env
    if not has_rank and not has_world:
        return ProcessEnv(False)
    if has_rank != has_world:
        present, missing = ("RANK", "WORLD_SIZE") if has_rank else ("WORLD_SIZE", "RANK")
        raise ConfigError(f"environment {present}={env[present]!r} is set but {missing} is not; {LAUNCH}")
    rank, world = _int(env, "RANK", 0), _int(env, "WORLD_SIZE", 1)
    local_rank = _int(env, "LOCAL_RANK", 0)
    if world < 1:
        raise ConfigError(f"environment WORLD_SIZE={world}: must be >= 1; {LAUNCH}")
    if not 0 <= rank < world:
        raise ConfigError(f"environment RANK={rank}: must be in 0..{world - 1} for WORLD_SIZE={world}; {LAUNCH}")
    if local_rank < 0:
        raise ConfigError(f"environment LOCAL_RANK={local_rank}: must be >= 0")
    launched = any(name in env for name in TORCHRUN_MARKERS)
    if not launched:
        if world == 1:
            return ProcessEnv(False, 0, 1, local_rank)
        raise ConfigError(
            f"environment RANK={rank} and WORLD_SIZE={world} are set, but this process was not started by torchrun "
            f"(no {TORCHRUN_MARKERS[0]}): its peers would never join; {LAUNCH}"
        )
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise ConfigError(f"environment RANK={rank} and WORLD_SIZE={world} are set but MASTER_ADDR and MASTER_PORT are not; {LAUNCH}")
    port = _int(env, "MASTER_PORT", 0)
    if not 0 < port < 65536:
        raise ConfigError(f"environment MASTER_PORT={env['MASTER_PORT']!r}: not a port (1..65535); {LAUNCH}")
    return ProcessEnv(True, rank, world, local_rank)


def quiet_rank(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a worker other than rank 0 (whose errors rank 0 already prints)."""
    try:
        layout = read_process_env(environ)
    except ConfigError:
        return False
    return layout.distributed and layout.rank != 0


def elastic_attempt(environ: Mapping[str, str] | None = None) -> int:
    """Which attempt of a torchelastic job this process is (``TORCHELASTIC_RESTART_COUNT``; 0 when unset)."""
    env = os.environ if environ is None else environ
    raw = env.get("TORCHELASTIC_RESTART_COUNT", "").strip()
    if not raw:
        return 0
    try:
        attempt = int(raw)
    except ValueError:
        raise ConfigError(f"environment TORCHELASTIC_RESTART_COUNT={raw!r}: not an integer; torchrun sets it, unset it otherwise") from None
    if attempt < 0:
        raise ConfigError(f"environment TORCHELASTIC_RESTART_COUNT={attempt}: must be >= 0; torchrun sets it, unset it otherwise")
    return attempt


def attempt_or_zero() -> int:
    """``elastic_attempt()`` where a bad value was already refused (or must not fail a record): 0 then."""
    try:
        return elastic_attempt()
    except ConfigError:
        return 0
