"""The project's lead order (PTB-XL's) and reordering of a record's signals by their names."""

from __future__ import annotations

import numpy as np

LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
MIMIC_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")

_CANONICAL = {name.upper(): name for name in LEADS}


class LeadError(ValueError):
    """A record's signal names cannot be mapped onto the 12 standard leads."""


def canonical_lead(name: str) -> str | None:
    """'AVR', 'avr', 'aVR', 'Lead aVR' -> 'aVR'; unknown names -> None."""
    key = name.strip().upper()
    if key.startswith("LEAD "):
        key = key[5:].strip()
    return _CANONICAL.get(key)


def lead_permutation(sig_names: list[str] | tuple[str, ...]) -> np.ndarray:
    """Indices `idx` such that `signal[:, idx]` is in LEADS order; raises LeadError naming the problem."""
    canonical = [canonical_lead(n) for n in sig_names]
    unknown = [n for n, c in zip(sig_names, canonical, strict=True) if c is None]
    if unknown:
        raise LeadError(f"unknown lead name(s) {unknown}; expected the 12 standard leads {list(LEADS)}")
    seen: dict[str, int] = {}
    duplicates = []
    for i, c in enumerate(canonical):
        if c in seen:
            duplicates.append(c)
        seen[c] = i
    if duplicates:
        raise LeadError(f"duplicate lead name(s) {duplicates}")
    missing = [lead for lead in LEADS if lead not in seen]
    if missing:
        raise LeadError(f"missing lead(s) {missing} (found {list(sig_names)})")
    return np.array([seen[lead] for lead in LEADS], dtype=np.int64)
