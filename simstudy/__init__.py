"""simstudy: statistical simulation and theory verification for learned prefix
perturbations in language models. See DESIGN.md (shared) for the design of record."""
__version__ = "0.1.0"
