"""ecgproto: interpretable prototype networks and digital phenotypes for 12-lead ECGs.

The library is pure and importable without Prefect or MLflow running; `flows/` (installed as
`ecgproto.flows`) orchestrates it.
"""

__version__ = "0.1.0"
