"""The bundled stacks, installed as package data of ``pgolf_core.stacks`` (``pgolf stacks`` lists them)."""
