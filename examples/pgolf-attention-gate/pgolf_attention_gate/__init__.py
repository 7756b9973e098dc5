"""A per-head attention output gate for pgolf, as a third-party plugin package."""
