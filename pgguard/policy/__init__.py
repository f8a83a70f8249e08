"""Statement analysis and guard rules. Pure functions: no I/O, no awaits."""
