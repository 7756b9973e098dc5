"""``pgolf validate``: resolve and check a stack and build it on the meta device, so a bad recipe fails in
seconds without data or a GPU; it also says what the evaluator and quantizer will report on the challenge's rules."""

from __future__ import annotations

import argparse

from .common import add_stack_args, add_toy_arg, check_buildable, load_stack_and_registry


def cmd_validate(args: argparse.Namespace) -> int:
    from ..export import code_bytes
    from ..config.checks import memory_estimate
    from ..model.gpt import count_parameters

    stack, registry = load_stack_and_registry(args)
    model, built = check_buildable(stack, registry)
    n = count_parameters(model)
    print(f"{stack.path}: ok")
    print(f"model_params:{n}")
    print(f"code_bytes:{code_bytes(stack, registry)}")
    print(f"memory: {memory_estimate(stack, n).describe()}")
    for slot, choice in stack.slots.items():
        print(f"  {slot:<10} {choice.technique}")
    for i, mod in enumerate(stack.modifiers):
        print(f"  modifier[{i}] {mod.technique} layers={mod.layers!r}")
    lines = compliance_lines(stack, built)
    if lines:
        print("compliance (the challenge's rules: no validation token used before it is scored, no training data after the training clock):")
        print("\n".join(lines))
    return 0


def compliance_lines(stack, built: dict) -> list[str]:
    """What validate says about the challenge's rules: each final line the evaluator will report, and the
    quantizer's calibration source."""
    from ..compliance import final_line_compliance, quantizer_compliance

    evaluator, quantizer, compressor = built["evaluator"], built["quantizer"], built["compressor"]
    names = evaluator.reported_lines(quantizer.label, compressor.label)
    out = [f"  {name} {'ok' if check.ok else 'NOT_COMPLIANT'} - {check.reason}" for name, check in final_line_compliance(evaluator, names).items()]
    for check in quantizer_compliance(quantizer):
        out.append(f"  {check.what} {'ok' if check.ok else 'NOT_COMPLIANT'} - {check.reason}")
    return out


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    validate = sub.add_parser("validate", parents=[common], help="resolve and check a stack, build it on the meta device")
    add_stack_args(validate)
    add_toy_arg(validate)
    validate.set_defaults(func=cmd_validate)
