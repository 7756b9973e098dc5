"""pgolf built-in techniques, one module per technique, each registered through an entry point."""
