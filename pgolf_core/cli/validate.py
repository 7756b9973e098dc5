"""``pgolf validate``: resolve and check a stack and build it on the meta device, so a bad recipe fails in
seconds without data or a GPU; it also says what the evaluator and quantizer will report on the challenge's rules."""

from __future__ import annotations

import argparse

from .common import add_stack_args, check_buildable, load_stack_and_registry


def cmd_validate(args: argparse.Namespace) -> int:
    from ..config.checks import memory_estimate
    from ..model.gpt import count_parameters

    stack, registry = load_stack_and_registry(args)
    model, built = check_buildable(stack, registry)
    n = count_parameters(model)
    print(f"{stack.path}: ok")
    print(f"model_params:{n}")
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
    quantizer's calibration source. Evaluators without ``reported_lines`` get one line from their flag."""
    from ..train import final_line_compliance, quantizer_compliance

    evaluator, quantizer, compressor = built.get("evaluator"), built.get("quantizer"), built.get("compressor")
    out = []
    names = None
    if callable(getattr(evaluator, "reported_lines", None)):
        names = evaluator.reported_lines(getattr(quantizer, "label", "q"), getattr(compressor, "label", "c"))
    if names:
        for name, check in final_line_compliance(evaluator, names).items():
            out.append(f"  {name} {'ok' if check.ok else 'NOT_COMPLIANT'} - {check.reason}")
    elif evaluator is not None:
        ok = bool(getattr(evaluator, "compliant", True))
        out.append(f"  evaluator({stack.technique('evaluator')}) {'ok' if ok else 'NOT_COMPLIANT'} - {getattr(evaluator, 'compliance_note', '') or '(no note)'}")
    for check in quantizer_compliance(quantizer):
        out.append(f"  {check.what} {'ok' if check.ok else 'NOT_COMPLIANT'} - {check.reason}")
    return out


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    validate = sub.add_parser("validate", parents=[common], help="resolve and check a stack, build it on the meta device")
    add_stack_args(validate)
    validate.set_defaults(func=cmd_validate)
