"""simstudy: statistical simulation and theory verification for learned prefix
perturbations in language models. See DESIGN.md (shared) for the design of record."""
__version__ = "0.1.0"

# The generic study engine's public API (DESIGN §7), imported lazily so that `import simstudy` stays light.
_ENGINE_EXPORTS = ("Study", "StudyResult", "RateResult", "FitFailure", "Diverged")


def __getattr__(name):
    if name in _ENGINE_EXPORTS:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'simstudy' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_ENGINE_EXPORTS))
