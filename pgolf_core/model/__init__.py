"""Model assembly: the slot spec, shared layers, and the GPT container built from pgolf.plugins."""
