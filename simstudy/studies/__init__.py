"""Studies: TOML study files (``spec``, generic), the perturbation domain's study kind
(``domain``, ``perturbation``) and generic examples (``examples``)."""
