"""Hook points of pgolf: the one registration hook, the technique slots, and the loop events.

pgolf separates *catalogue* from *composition*:

* Plugins fill the catalogue through one pluggy hook, ``pgolf_register_techniques(register)``, calling
  ``register(Technique(...))`` once per technique (see ``pgolf_core.registry.Technique``).
* A stack file chooses one technique per **slot** (``[attention] use = "gqa"``) and an ordered list of
  **modifiers** (``[[modifier]] use = "..." layers = "last 4"``). The core calls the chosen technique's
  ``build`` directly; no pluggy dispatch happens while a model runs. Everything a technique contributes
  is an ``nn.Module``, a plain function, or an object whose methods the loop calls at step boundaries.

When each slot's ``build`` runs and what it must return (``SLOTS`` below holds the same contract as
data for ``pgolf list``)::

    stack   = resolve(toml, --set, --legacy-env)
    spec    = ModelSpec from the slots; modifiers transform it in stack-file order
    model   = GPT(
        embedding = build_embedding(spec)                 # ids -> x            (embedding slot)
        topology  = build_topology(spec)                  # drives the blocks   (topology slot)
        blocks    = [build_residual(spec, i,              # one block per layer (residual slot)
                        attn=build_attention(spec, i),    #   x -> y            (attention slot)
                        mlp=build_mlp(spec, i))           #   x -> y            (mlp slot)
                     for i in layers],
        head      = build_head(spec))                     # x, targets -> loss  (head slot)
    build_init(spec)(model)                               # weights' init       (init slot)
    opt     = build_optimizer(stack)(model)               # param groups        (optimizer slot)
    sched   = build_schedule(stack)                       # lr multiplier       (schedule slot)
    avg     = build_averaging(stack)                      # export weights      (averaging slot)
    compiled = torch.compile(model, fullgraph=True)       # CUDA; nothing below calls into plugins per token

    on_train_start(state)
    for step in range(iterations):                        # stops early at the wallclock cap
        [on_eval_start(state); evaluate; on_eval_end(state)]   every val_loss_every steps
        state.lr_scale = sched.lr_mul(step, elapsed_ms); on_step_start(state)   # late switches (QAT)
        opt.zero_grad(); forward/backward over grad-accumulation micro-batches
        opt.before_step(step); opt.set_lr_scale(state.lr_scale)
        opt.step()
        after_optimizer_step(state)                       # averaging updates, late switches
        on_step_end(state)
    on_train_end(state)
    weights = avg.export_weights(model)                   # averaging slot
    blob    = compressor.compress(serialize(quantizer.quantize(weights)))
    size accounting (code + blob) against the cap; write artifact
    model.load(quantizer.dequantize(deserialize(compressor.decompress(read(artifact)))))
    evaluator.evaluate(model, env, quant, comp)           # evaluator slot -> final_* lines, submission.json

Loop events reach two audiences, always outside the compiled step: the *objects built for the stack*
(in stack order: slots first, then modifiers) when they define ``on_train_start``,
``on_step_start``, ``after_optimizer_step``, ``on_step_end``, ``on_eval_start``, ``on_eval_end``, ``on_train_end``; and any
installed plugin implementing the matching ``pgolf_on_*`` hook below (loggers, trackers).
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "pgolf"
HOOKSPEC_VERSION = 1
"""Bumped when a hook or slot contract changes incompatibly; plugins may declare the version they target."""

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class SlotContract:
    """What a slot's ``build(params, ctx, **kw)`` receives and returns."""

    def __init__(self, name: str, signature: str, returns: str, required: bool = True) -> None:
        self.name = name
        self.signature = signature
        self.returns = returns
        self.required = required


SLOTS: dict[str, SlotContract] = {
    s.name: s
    for s in (
        SlotContract("embedding", "build(params, ctx)", "nn.Module: forward(input_ids) -> x; attribute tok_emb (nn.Embedding)"),
        SlotContract("attention", "build(params, ctx, layer)", "nn.Module: forward(x[, aux]) -> y; aux holds per-forward model-level tensors"),
        SlotContract("mlp", "build(params, ctx, layer)", "nn.Module: forward(x) -> y"),
        SlotContract("residual", "build(params, ctx, layer, attn, mlp)", "nn.Module block: forward(x, x0, aux) -> x"),
        SlotContract("topology", "build(params, ctx)", "nn.Module: forward(x, x0, blocks, aux) -> x (e.g. U-Net skips)"),
        SlotContract("head", "build(params, ctx)", "nn.Module: forward(x, targets, tok_weight) -> mean loss; logits(x, tok_weight)"),
        SlotContract("init", "build(params, ctx)", "callable(model) that initialises weights after construction"),
        SlotContract("optimizer", "build(params, ctx)", "callable(model) -> OptimizerSet (param grouping, step, lr scale, clipping)"),
        SlotContract("schedule", "build(params, ctx)", "object with lr_mul(step, elapsed_ms) -> float"),
        SlotContract("averaging", "build(params, ctx)", "object with export_weights(model) -> state_dict; may hook loop events"),
        SlotContract("quantizer", "build(params, ctx)", "object with quantize(state_dict) -> (obj, stats), dequantize(obj) -> state_dict, label"),
        SlotContract("compressor", "build(params, ctx)", "object with compress(bytes) -> bytes, decompress(bytes) -> bytes, label"),
        SlotContract(
            "evaluator",
            "build(params, ctx)",
            "object with evaluate(model, eval_env, quant_label, comp_label) -> [(final line name, val_loss, val_bpb, eval_ms, note), ...] and compliant: bool",
        ),
        SlotContract(
            "modifier",
            "build(params, ctx)",
            "object with transform(spec, layers, name): rewrites the ModelSpec before modules are built; "
            "optional attach(model) after init; may hook loop events",
            required=False,
        ),
    )
}
SINGLE_SLOTS = tuple(name for name in SLOTS if name != "modifier")


@hookspec(historic=True)
def pgolf_register_techniques(register: Any) -> None:
    """Register techniques: call ``register(Technique(...))`` once for each technique the plugin offers."""


@hookspec
def pgolf_on_train_start(state: Any) -> None:
    """After the model, optimizers and data are ready, before the first training step."""


@hookspec
def pgolf_on_step_start(state: Any) -> None:
    """Before a step's forward pass; ``state.step`` is the 0-based step, ``state.lr_scale`` its LR multiplier."""


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
