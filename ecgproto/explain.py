"""Case explanations and the prototype gallery.

An explanation ranks, for each predicted label, the prototypes by their contribution to the fused
logit (fusion weight x normalised similarity) and shows each next to the window of the input that
matched it: the window is the best window under the same pooling rule as training, widened to
the samples and leads its receptive field really sees. Under `beat` pooling (the small config's
local branch) the similarity is that of the record's mean beat latent in the prototype's own lead
group, and the window shown is the input's single best-matching beat in those leads (`pooling`,
`n_beats`, `beat_similarity`); under `lead_mean` pooling (the reference's local default) the
similarity is the mean along that window's lead row over the whole strip (`pooled_span_s`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ecgproto.data.beats import detect_batch
from ecgproto.data.ingest import READ_MARGIN_S
from ecgproto.data.preprocess import PreprocessConfig, highpass, prepare_record
from ecgproto.data.wfdb_io import read_record
from ecgproto.figures import draw_ecg, plot_ecg
from ecgproto.model.names import gallery_path, prototype_name
from ecgproto.model.network import ECGProtoNet


@torch.no_grad()
def explain(
    model: ECGProtoNet,
    signal: np.ndarray,
    top_k: int = 3,
    max_labels: int = 5,
    codes: list[str] | tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """(12, n) preprocessed mV -> predicted labels, each with its top-k prototypes by contribution. `codes`: explain
    these labels instead, predicted or not (why this label, or why not)."""
    model.eval()
    x = torch.as_tensor(np.array(signal, dtype=np.float32)).unsqueeze(0)  # a writable copy
    offsets = model.prototype_offsets()
    sims, best, beat_at, beat_sim = [], [], [], []
    beats, beat_source = None, ""
    if any(b.beat for b in model.branches.values()):
        found, sources = detect_batch(x.numpy(), model.fs)
        beats, beat_source = torch.as_tensor(found, dtype=torch.long), sources[0]
    for branch in model.branches.values():
        sim_map = branch.prototypes.similarity_map(branch.latent_windows(x, beats))  # (1, W, P)
        sims.append(branch.prototypes.pool(sim_map) * branch.distinct)  # merged prototypes score 0 (Branch.forward)
        best.append(branch.prototypes.best_window(sim_map)[0])
        where, value = best_beats(branch, x, beats)
        beat_at.append(where)
        beat_sim.append(value)
    s = torch.cat(sims, dim=1)
    prob = torch.sigmoid(model.fusion(s))[0].numpy()
    certainty = {k: v[0].numpy() for k, v in model.uncertainty(s).items()}
    match_range = _match_under_perturbation(model, x, beats, s)  # (2, P) normalised similarity, lowest / highest
    contrib = model.fusion.contributions(s)[0].numpy()  # (L, P)
    similarity = model.fusion.normalised(s)[0].numpy()  # in [-1, 1], 1 at the prototype
    weight = model.fusion.effective_weight().numpy()
    windows = torch.cat(best).numpy()
    beat_at_all, beat_sim_all = np.concatenate(beat_at), np.concatenate(beat_sim)
    n_beats = next((b.n_beats for b in model.branches.values() if b.beat), 0)
    thresholds = model.thresholds.numpy()
    if codes:
        unknown = [c for c in codes if c not in model.codes]
        if unknown:
            raise ValueError(f"unknown label code(s) {unknown}; the model's labels are {', '.join(model.codes)}")
        predicted = [model.codes.index(c) for c in codes]
    else:
        predicted = [int(i) for i in np.argsort(-prob) if prob[i] >= thresholds[i]][:max_labels]
    if not predicted:  # always explain something: the most likely label
        predicted = [int(np.argmax(prob))]
    names = list(offsets)
    own = model.membership().numpy() > 0  # (L, P): the label's own prototypes (merged near-duplicates: none)
    labels = []
    for li in predicted:
        evidence = []
        for p in evidence_order(contrib[li], own[li], top_k):
            branch_name = names[int(np.searchsorted(list(offsets.values()), p, side="right")) - 1]
            branch = model.branches[branch_name]
            ext = branch.extent(int(windows[p]), int(beat_at_all[p]) if branch.beat else None)
            prov = model.provenance[p] if model.provenance else {}
            window = {
                "start_s": ext.start / model.fs,
                "end_s": ext.end / model.fs,
                "leads": list(ext.leads),
                "pooling": branch.prototypes.pool_mode if branch.kind == "local_2d" else "time_mean",
            }
            if window["pooling"] == "lead_mean":
                window["pooled_span_s"] = [0.0, signal.shape[-1] / model.fs]  # the mean runs along the whole row
            if branch.beat:  # the pooled latent is the mean over n_beats beats; this beat alone matches so well
                window.update(
                    n_beats=n_beats, beat_similarity=float(beat_sim_all[p]) / branch.scale, beat_source=beat_source
                )  # 'grid': no beats detected, windows on a 1 s grid
            evidence.append(
                {
                    "prototype": int(p),
                    "name": prototype_name(int(p), str(prov.get("class")), branch_name),
                    "branch": branch_name,
                    "class": prov.get("class"),
                    # a case of this label, or of another label the ECG also resembles ("also resembles a NORM case")
                    "own_class": bool(own[li, p]),
                    "contribution": float(contrib[li, p]),
                    "weight": float(weight[li, p]),
                    "similarity": float(similarity[p]),
                    # how certain the match is: the similarity's range over the input perturbed at ECG noise
                    # level (Gaussian noise, baseline wander, a 40 ms shift; ecgproto.train.quality)
                    "similarity_under_noise": [float(match_range[0, p]), float(match_range[1, p])],
                    "input_window": window,
                    "prototype_source": {
                        k: prov.get(k) for k in ("ecg_id", "start_s", "end_s", "leads", "source_labels", "fidelity")
                    },
                }
            )
        labels.append(
            {
                "code": model.codes[li],
                "probability": float(prob[li]),
                # calibrated (the temperature fitted on the validation fold) and its range over the fusion heads
                "calibrated_probability": float(certainty["probability"][li]),
                "probability_range": [float(certainty["low"][li]), float(certainty["high"][li])],
                "threshold": float(thresholds[li]),
                "logit_bias": float(model.fusion.bias[li]),
                "evidence": evidence,
            }
        )
    return {
        "labels": labels,
        "probabilities": {c: float(p) for c, p in zip(model.codes, prob, strict=True)},
        "uncertainty": {
            "total_bits": float(certainty["uncertainty"]),
            "epistemic_bits": float(certainty["epistemic"]),
            "validation_percentile": float(certainty["percentile"]),
        },
    }


def evidence_order(contribution: np.ndarray, own: np.ndarray, top_k: int) -> list[int]:
    """The prototypes an explanation of one label shows, in order: its own prototypes (`own` (P,) bool) by
    contribution, at most `top_k`, then the other labels' prototypes among the `top_k` largest contributions (what
    the ECG also resembles: evidence the fusion took from another label's case, never shown as the label's own).
    Prototypes that add nothing (contribution <= 0) are left out, unless the label has no other own evidence."""
    order = np.argsort(-contribution, kind="stable")
    mine = [int(p) for p in order if own[p]]
    shown = [p for p in mine[:top_k] if contribution[p] > 0] or mine[:1]
    others = [int(p) for p in order[:top_k] if not own[p] and contribution[p] > 0]
    return shown + others


@torch.no_grad()
def _match_under_perturbation(
    model: ECGProtoNet, x: torch.Tensor, beats: torch.Tensor | None, sims: torch.Tensor
) -> np.ndarray:
    """(2, P): each prototype's lowest and highest normalised similarity with the input over the input as it is
    and perturbed (ecgproto.train.quality.perturbations)."""
    from ecgproto.train.quality import perturbations

    seen = [sims]
    b = beats if beats is not None else torch.full((1, 1), -1, dtype=torch.long)
    for _, xp, bp in perturbations(x, b, model.fs, seed=0):
        seen.append(model.similarities(xp, bp if beats is not None else None))
    s = model.fusion.normalised(torch.cat(seen, dim=0))  # (1 + perturbations, P)
    return torch.stack([s.amin(dim=0), s.amax(dim=0)]).numpy()


@torch.no_grad()
def best_beats(branch: torch.nn.Module, x: torch.Tensor, beats: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """Beat pooling: per prototype, the R peak of the record's (one record, x (1, 12, n)) best-matching single
    beat in the prototype's lead group, and that beat's similarity; (-1, nan) for other branches."""
    p = branch.n_prototypes
    if not branch.beat:
        return np.full(p, -1), np.full(p, np.nan)
    z, pos = branch.beat_latents(x, beats)  # (1, M, G, D'), (1, M)
    sim = branch.prototypes.similarity_map(z[0])  # (M, G, P)
    own = sim.gather(1, branch.prototypes.group.view(1, 1, -1).expand(sim.shape[0], 1, -1)).squeeze(1)  # (M, P)
    value, slot = own.max(dim=0)
    return pos[0, slot].numpy(), value.numpy()


def example_cases(
    labels: np.ndarray,
    codes: tuple[str, ...],
    preferred: tuple[str, ...] = (),
    n: int = 3,
    include_one_of: tuple[str, ...] = (),
) -> list[tuple[int, str]]:
    """(row, code) of `n` ECGs to explain: the first positive ECG of each of `preferred` (those with positives),
    then of the most frequent labels; one ECG per label and no ECG twice. With `include_one_of` (e.g. the local
    morphology labels, whose evidence is a beat) one example at least is of those labels: the most frequent of them
    takes the place of the first example not of them (after `preferred`, where they leave room)."""
    counts = labels.sum(axis=0)
    frequent = list(np.argsort(-counts, kind="stable"))
    order = [codes.index(c) for c in preferred if c in codes] + frequent
    among = {codes.index(c) for c in include_one_of if c in codes}
    chosen = [codes.index(c) for c in preferred if c in codes][:n]
    if among and not among & set(chosen) and any(counts[j] for j in among):
        first = next(j for j in frequent if j in among)
        order = chosen[: n - 1] + [first] + order
    out: list[tuple[int, str]] = []
    used: set[int] = set()
    for j in dict.fromkeys(order):
        rows = [int(r) for r in np.flatnonzero(labels[:, j]) if int(r) not in used]
        if counts[j] == 0 or not rows:
            continue
        out.append((rows[0], codes[j]))
        used.add(rows[0])
        if len(out) == n:
            break
    return out


def explanation_figure(model: ECGProtoNet, signal: np.ndarray, explanation: dict[str, Any], title: str = "") -> Figure:
    """Per (label, prototype) two rows, 11 in wide (legible at the ~1,000 px an MLflow artifact panel shows): the
    input with its matching window shaded in the prototype's leads (a beat: a 10 s strip of each of its leads) beside
    the input's beat and the prototype's source beat, enlarged, in those leads; then the prototype's source ECG with
    its window. Each label says its calibrated probability with its range over the bootstrap heads (the as-trained
    probability stays in the JSON); evidence from another label's prototype says so."""
    from ecgproto.figures import draw_beats

    rows = [(lab, ev) for lab in explanation["labels"] for ev in lab["evidence"]]
    heights = []
    for _, ev in rows:
        heights += [len(_strips(ev["input_window"]) or ("II",)) + 3] * 2
    fig = Figure(figsize=(11, sum(0.62 * h + 0.9 for h in heights)))
    axes = fig.subplots(len(heights), 2, squeeze=False, width_ratios=[8, 3], height_ratios=heights)
    for i, (lab, ev) in enumerate(rows):
        (left, middle), (right, note) = axes[2 * i], axes[2 * i + 1]
        w = ev["input_window"]
        whole = w["pooling"] == "time_mean"
        case = f"{ev['class']} case" if ev.get("own_class", True) else f"also resembles a {ev['class']} case"
        along = {
            "lead_mean": f"mean along {','.join(w['leads'])}, best window shown",
            "beat": f"mean of {w.get('n_beats')} beats in {','.join(w['leads'])}; best beat shaded, "
            f"sim {w.get('beat_similarity', float('nan')):.2f}"
            + ("; no beats detected: 1 s grid windows" if w.get("beat_source") == "grid" else ""),
        }.get(w["pooling"], "the whole record")
        draw_ecg(
            left,
            signal,
            model.fs,
            f"{title} {lab['code']} {_probability(lab)}. Evidence {ev['name']}, {case}: contribution "
            f"{ev['contribution']:.2f} = w {ev['weight']:.2f} x sim {ev['similarity']:.2f}{_noise_range(ev)} "
            f"({along})",
            None if whole else (w["start_s"], w["end_s"]),  # the whole record is the window: nothing to shade
            None if whole else tuple(w["leads"]),
            wrap=95,
            strips=_strips(w),
        )
        src = ev["prototype_source"]
        prov = model.provenance[ev["prototype"]] if model.provenance else None
        middle.set_axis_off()
        note.set_axis_off()
        if prov is not None and model.source_signals.numel():
            source = model.source_signals[prov["source_index"]].float().numpy()
            draw_ecg(
                right,
                source,
                model.fs,
                f"its source: {ev['name']} on training ECG {src['ecg_id']} [{src['source_labels']}]",
                None if whole else (src["start_s"], src["end_s"]),
                None if whole else tuple(str(src["leads"]).split(",")),
                wrap=95,
                strips=_strips(w),  # the source beat on a strip of each of its leads too
            )
            if w["pooling"] == "beat":
                middle.set_axis_on()
                draw_beats(
                    middle,
                    [
                        ("input", signal, (w["start_s"], w["end_s"])),
                        (f"P{ev['prototype']:04d}", source, (src["start_s"], src["end_s"])),
                    ],
                    tuple(w["leads"]),
                    model.fs,
                )
        else:
            right.set_axis_off()
    fig.tight_layout(h_pad=1.2)
    return fig


def _strips(window: dict[str, Any]) -> tuple[str, ...] | None:
    """The 10 s strips that show a beat window in each of its leads (up to 3; a 12-lead beat: II, V1, V5, and the
    enlarged beat shows all 12); None: the default strip."""
    if window.get("pooling") != "beat":
        return None
    leads = tuple(window["leads"])
    return leads if len(leads) <= 3 else ("II", "V1", "V5")


def _probability(label: dict[str, Any]) -> str:
    """'p 0.78 (0.70-0.85)': the calibrated probability and its range over the bootstrap heads (the as-trained one
    where the model has no calibration)."""
    if "calibrated_probability" not in label:
        return f"p {label['probability']:.2f}"
    lo, hi = label["probability_range"]
    return f"p {label['calibrated_probability']:.2f} ({lo:.2f}-{hi:.2f})"


def _noise_range(evidence: dict[str, Any]) -> str:
    if "similarity_under_noise" not in evidence:
        return ""
    lo, hi = evidence["similarity_under_noise"]
    return f" ({lo:.2f}-{hi:.2f} under noise)"


def prototype_gallery(model: ECGProtoNet) -> Iterator[tuple[str, Figure]]:
    """One figure per distinct prototype, ('gallery/<branch>/<class>/P0207.png', Figure), made one at a time (a
    thousand prototype figures would not fit in memory together). A prototype whose source ECG lacks its class
    (no training ECG had it) is shown and marked; a merged near-duplicate has no figure: its keeper's is its case
    (`gallery_index` lists both)."""
    for prov in model.provenance:
        if not _distinct_row(prov):
            continue
        title = (
            f"{prototype_name(prov['prototype'], prov['class'], prov['branch'])}{_also(model, prov)} | "
            f"ECG {prov['ecg_id']} [{prov['source_labels']}] | window {prov['start_s']:.2f}-{prov['end_s']:.2f} s, "
            f"leads {prov['leads']} | cos {prov['similarity']:.3f}, fidelity {prov.get('fidelity', float('nan')):.2f}"
            + (
                f" | purity {prov['purity']:.2f}, consistency {prov['consistency']:.2f}, "
                f"stability {prov['stability']:.2f}" + (", near-duplicate" if prov.get("duplicate") else "")
                if "purity" in prov
                else ""
            )
            + ("" if prov["own_class_source"] else f" | NOT A {prov['class']} ECG: no training ECG has {prov['class']}")
            + (" | no beats detected: window on the fallback grid" if prov.get("beat_source") == "grid" else "")
        )
        fig = plot_ecg(
            model.source_signals[prov["source_index"]].float().numpy(),
            model.fs,
            title,
            (prov["start_s"], prov["end_s"]),
            tuple(str(prov["leads"]).split(",")),
            beat=prov.get("beat_source", "") != "",
        )
        yield gallery_path(prov["prototype"], prov["class"], prov["branch"]), fig


def _distinct_row(prov: dict[str, Any]) -> bool:
    """A provenance row of a distinct prototype (every row of a model saved before merging existed)."""
    return int(prov.get("merged_into", prov["prototype"])) == int(prov["prototype"])


def _also(model: ECGProtoNet, prov: dict[str, Any]) -> str:
    """' (also IMI, ILMI)': the classes of the near-duplicates merged into this prototype, other than its own."""
    also = sorted(
        {str(q["class"]) for q in model.provenance if int(q.get("merged_into", -1)) == int(prov["prototype"])}
        - {str(prov["class"])}
    )
    return f" (also {', '.join(also)})" if also else ""


GALLERY_COLUMNS = {
    "cos": "cosine between the trained prototype and the real beat or ECG it was projected onto (1: the same latent)",
    "fidelity": "correlation, over training ECGs, of the projected prototype's similarities with the trained one's "
    "(1: projection changed nothing the model uses)",
    "purity": "share of its 20 most similar training ECGs that carry its class (chance: the class's share, in "
    "brackets)",
    "consistency": "mean cosine among those 20 ECGs where the prototype looks (1: they share one morphology)",
    "stability": "1 - the change of its similarity with them under ECG noise, baseline wander and a 40 ms shift, over "
    "the similarity scale (1: the match does not move)",
    "near-duplicate": "another distinct prototype of the branch within cosine 0.95, or on the same source window "
    "(none after training: such pairs are merged into one case)",
}


def gallery_index(model: ECGProtoNet, link: Callable[[str], str] | None = None) -> str:
    """gallery/README.md: the prototypes by branch and class, each linked to its figure (`link` maps a gallery path to
    a URL; default: the path relative to gallery/), what each quality column means, and the merged near-duplicates."""
    link = link or (lambda path: path.removeprefix("gallery/"))
    rows = list(model.provenance)
    distinct = [p for p in rows if _distinct_row(p)]
    lines = [
        "# Prototype gallery",
        "",
        f"{len(distinct)} distinct cases of {len(rows)} prototypes: "
        f"{len(rows) - len(distinct)} near-duplicates (cosine >= 0.95 to another prototype of the branch) were "
        "merged into the case they repeat. One figure per case: its source ECG in the 12-lead layout, the window "
        "it was projected onto shaded in its leads (a beat prototype: the beat, enlarged, beside it).",
        "",
        "| column | meaning |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in GALLERY_COLUMNS.items()),
    ]
    by_id = {int(p["prototype"]): p for p in rows}
    for branch in dict.fromkeys(str(p["branch"]) for p in rows):
        mine = [p for p in rows if p["branch"] == branch]
        cases = [p for p in mine if _distinct_row(p)]
        lines += ["", f"## {branch}: {len(cases)} distinct cases of {len(mine)} prototypes", ""]
        lines += [
            "| class | prototype | source ECG | window (s) | leads | cos | fidelity | purity | consistency | stability "
            "| note |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for cls in dict.fromkeys(str(p["class"]) for p in mine):
            for p in (q for q in mine if str(q["class"]) == cls):
                name = f"P{int(p['prototype']):04d}"
                if not _distinct_row(p):
                    keeper = by_id[int(p["merged_into"])]
                    target = gallery_path(keeper["prototype"], keeper["class"], keeper["branch"])
                    k = f"P{int(keeper['prototype']):04d}"
                    merged = f"merged into [{k} {keeper['class']}]({link(target)})"
                    lines.append(f"| {cls} | {name} | | | | | | | | | {merged} |")
                    continue
                notes = []
                if not p["own_class_source"]:
                    notes.append(f"not a {cls} ECG: no training ECG has {cls}")
                if also := _also(model, p):
                    notes.append(also.strip(" ()"))
                if p.get("duplicate"):
                    notes.append("near-duplicate")
                if p.get("beat_source") == "grid":
                    notes.append("no beats detected")
                purity = f"{p['purity']:.2f} ({p['class_share']:.3f})" if "purity" in p and "class_share" in p else "-"
                lines.append(
                    f"| {cls} | [{name}]({link(gallery_path(p['prototype'], p['class'], p['branch']))}) | "
                    f"{p['ecg_id']} | {p['start_s']:.2f}-{p['end_s']:.2f} | {p['leads']} | {p['similarity']:.3f} | "
                    f"{p.get('fidelity', float('nan')):.2f} | {purity} | {_fmt(p.get('consistency'))} | "
                    f"{_fmt(p.get('stability'))} | {'; '.join(notes)} |"
                )
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return "-" if value is None or not np.isfinite(float(value)) else f"{float(value):.2f}"


def load_record_for_model(path: str | Path, config: PreprocessConfig | None = None) -> np.ndarray:
    """A WFDB record (path without extension) -> (12, n) preprocessed exactly as ingest does."""
    config = config or PreprocessConfig()
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".hea", ".dat") else base
    x, _ = prepare_record(read_record(base, seconds=config.duration_s + READ_MARGIN_S), config, str(base))
    if config.highpass_hz:
        x = highpass(x, config.fs, config.highpass_hz, config.highpass_order, axis=-1)
    return np.ascontiguousarray(x, dtype=np.float32)
