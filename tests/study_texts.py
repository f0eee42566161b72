"""Study-file texts shared by the command-line tests (one definition of the Wald/Wilson binomial study)."""
from __future__ import annotations


def binomial_study(*, name: str = "bin", replicates: int = 20, seed: int = 3, n=(20, 80), p=(0.2, 0.5),
                   methods=("wald",), wilson_level: float | None = None, tail: str = "") -> str:
    """The generic binomial-interval study of ``simstudy.studies.examples`` as a study file's text.

    ``wilson_level`` adds ``params = { level = ... }`` to the Wilson method; ``tail`` (more tables) is
    appended as it is."""
    lines = ["", "[study]", 'kind = "generic"', f'name = "{name}"', f"replicates = {replicates}", f"seed = {seed}", "",
             "[design]", f"n = {list(n)}", f"p = {list(p)}", "",
             "[generate]", 'function = "simstudy.studies.examples:binomial_data"', "",
             "[truth]", 'function = "simstudy.studies.examples:binomial_truth"', ""]
    for m in methods:
        lines += [f"[methods.{m}]", f'function = "simstudy.studies.examples:{m}_interval"']
        if m == "wilson" and wilson_level is not None:
            lines.append(f"params = {{ level = {wilson_level} }}")
        lines.append("")
    return "\n".join(lines) + tail
