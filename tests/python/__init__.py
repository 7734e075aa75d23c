"""Python tests of the tools/ scripts (stdlib only)."""
