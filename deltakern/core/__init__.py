"""The bottom layer: input validation, dtype rules, the per-row score state and its derivation,
and the constants every other layer shares. Imports nothing else of deltakern."""
