"""Mutation testing of generated lean model files: plausible porting bugs (``catalog``), applied by AST
edits and run against the file's generated tests (``runner``)."""

from onboardlm.testing.mutations.catalog import KINDS, Kind, Mutant, kinds_by_name, mutants

__all__ = ["KINDS", "Kind", "Mutant", "kinds_by_name", "mutants"]
