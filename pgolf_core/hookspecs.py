"""Hook points of pgolf: the one registration hook, the technique slots, and the loop events.

pgolf separates *catalogue* from *composition*:

* Plugins fill the catalogue through one pluggy hook, ``pgolf_register_techniques(register)``, calling
  ``register(Technique(...))`` once per technique (see ``pgolf_core.registry.Technique``).
* A stack file chooses one technique per **slot** (``[attention] use = "<name>"``) and an ordered list of
  **modifiers** (``[[modifier]] use = "..." layers = "last 4"``). The core calls the chosen technique's
  ``build`` directly; no pluggy dispatch happens while a model runs. Everything a technique contributes
  is an ``nn.Module``, a plain function, or an object whose methods the loop calls at step boundaries.

When each slot's ``build`` runs and what it must return (``SLOTS`` below holds the same contract as
data for ``pgolf list``)::

    stack   = resolve(toml, --set, --legacy-env)
    tok     = build_tokenizer(stack); tok.load(path)      # val_bpb's byte accounting (tokenizer slot)
    spec    = ModelSpec from the slots; modifiers transform it in stack-file order:
              install modules at host sites, replace host parts, claim options, add model-level modules
    model   = GPT(
        embedding = build_embedding(spec)                 # ids -> x            (embedding slot; sites lookup, x0)
        topology  = build_topology(spec)                  # drives the blocks   (topology slot; parts schedule, decoder)
        blocks    = [build_residual(spec, i,              # one block per layer (residual slot; sites, part wiring)
                        attn=build_attention(spec, i),    #   x -> y            (attention slot; sites, part rotary)
                        mlp=build_mlp(spec, i))           #   x -> y            (mlp slot; site hidden)
                     for i in layers],
        head      = build_head(spec),                     # x -> logits         (head slot)
        loss      = build_loss(spec))                     # logits -> loss      (loss slot)
    build_init(spec)(model)                               # weights' init       (init slot)
    modifier.attach(model) for each modifier that has it
    loader  = build_loader(stack)(files, rank, world)     # batches             (loader slot)
    compiled = torch.compile(model, fullgraph=True)       # CUDA; nothing below calls into plugins per token
    opt     = build_optimizer(stack)(model, runtime)      # param groups        (optimizer slot)
    sched   = build_schedule(stack)                       # lr multiplier       (schedule slot)
    avg     = build_averaging(stack)                      # export weights      (averaging slot)

    on_train_start(state)
    for step in range(iterations):                        # stops early at the wallclock cap
        [on_eval_start(state); evaluate; on_eval_end(state)]   every val_loss_every steps
        state.lr_scale = sched.lr_mul(step, elapsed_ms); on_step_start(state)   # late switches (QAT)
        opt.zero_grad(); forward/backward over grad-accumulation micro-batches (loader.next_batch)
        opt.before_step(step); opt.set_lr_scale(state.lr_scale)
        opt.step(model)
        after_optimizer_step(state)                       # averaging updates, late switches
        on_step_end(state)
    on_train_end(state)
    weights = avg.export_weights(model)                   # averaging slot
    quantizer.calibrate(ctx)                              # if it is Calibrating
    obj     = quantizer.quantize(weights, roles); obj = quantizer.fit(obj, measure)   # if it is Fitting
    blob    = compressor.compress(obj)                    # compressor slot (receives the structured object)
    size accounting (code + blob) against the cap; write artifact
    model.load(quantizer.dequantize(compressor.decompress(read(artifact))))
    evaluator.evaluate(model, env, quant, comp)           # evaluator slot -> [FinalResult] -> final_* lines

Loop events reach two audiences, always outside the compiled step: the *objects built for the stack*
(the schedule, averaging, quantizer, compressor and evaluator, then the modifiers in stack order) when they define ``on_train_start``,
``on_step_start``, ``after_optimizer_step``, ``on_step_end``, ``on_eval_start``, ``on_eval_end``, ``on_train_end``; and any
installed plugin implementing the matching ``pgolf_on_*`` hook below (loggers, trackers). A plugin may also
add CLI commands (``pgolf_add_commands``). ``pgolf_core.contracts`` holds every slot's and capability's
protocol; ``docs/hooks.md`` is the reference of hooks, slots, sites and parts in one place.
"""

from __future__ import annotations

from typing import Any

import pluggy

from .contracts import SLOT_CONTRACTS, SlotContract

PROJECT = "pgolf"
HOOKSPEC_VERSION = 2
"""Bumped when a hook or slot contract changes incompatibly; plugins may declare the version they target.
2: sites and parts, quantize(weights, roles), compressors receive the quantized object, FinalResult records,
loss/tokenizer/loader slots."""

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


SLOTS: dict[str, SlotContract] = SLOT_CONTRACTS
"""The slots and what each ``build`` returns (``pgolf_core.contracts`` holds the protocols)."""
SINGLE_SLOTS = tuple(name for name in SLOTS if name != "modifier")


@hookspec(historic=True)
def pgolf_register_techniques(register: Any) -> None:
    """Register techniques: call ``register(Technique(...))`` once for each technique the plugin offers."""


@hookspec
def pgolf_add_commands(subparsers: Any, common: Any) -> None:
    """Add ``pgolf`` subcommands: ``subparsers.add_parser(name, parents=[common], help=...)`` and
    ``set_defaults(func=...)``; ``func(args)`` returns the exit code (``common`` carries --debug/--plugin)."""


@hookspec
def pgolf_on_train_start(state: Any) -> None:
    """After the model, optimizers and data are ready, before the first training step."""


@hookspec
def pgolf_on_step_start(state: Any) -> None:
    """Before a step's forward pass; ``state.step`` is the 0-based step, ``state.lr_scale`` its LR multiplier,
    ``state.elapsed_ms`` the training time it was computed from."""


@hookspec
def pgolf_after_optimizer_step(state: Any) -> None:
    """Right after every optimizer step (weights just changed), outside the compiled graph."""


@hookspec
def pgolf_on_step_end(state: Any) -> None:
    """After a step has been counted and logged."""


@hookspec
def pgolf_on_eval_start(state: Any) -> None:
    """Before a periodic validation pass."""


@hookspec
def pgolf_on_eval_end(state: Any) -> None:
    """After a periodic validation pass; ``state.last_val`` holds ``(val_loss, val_bpb)``."""


@hookspec
def pgolf_on_train_end(state: Any) -> None:
    """After the last step, before averaging, quantization and the final evaluation."""
