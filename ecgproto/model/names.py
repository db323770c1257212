"""How a prototype is named in every table, figure, gallery file and explanation."""

from __future__ import annotations


def prototype_name(index: int, cls: str, branch: str) -> str:
    """The one name of a prototype in tables, figures, gallery files and explanations: 'P0207 NORM (global_2d)'
    (P + its index in the model, its class, its branch)."""
    return f"P{int(index):04d} {cls} ({branch})"


def gallery_path(index: int, cls: str, branch: str) -> str:
    """Its gallery figure in the fusion run: gallery/<branch>/<class>/P0207.png."""
    return f"gallery/{branch}/{cls}/P{int(index):04d}.png"
