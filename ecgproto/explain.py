"""Case explanations and the prototype gallery.

An explanation ranks, for each predicted label, the prototypes by their contribution to the fused
logit (fusion weight x normalised similarity) and shows each next to the window of the input that
matched it: the window is the best window under the same pooling rule as training, widened to
the samples and leads its receptive field really sees. Under `beat` pooling (the small config's
local branch) the similarity is that of the record's mean beat latent in the prototype's own lead
group, and the window shown is the input's single best-matching beat in those leads (`pooling`,
`n_beats`, `beat_similarity`); under `lead_mean` pooling (the reference's local default) the
similarity is the mean along that window's lead row over the whole strip (`pooled_span_s`); under
`row_latent` the window is the best lead row's whole strip, whose mean latent was compared.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ecgproto.data.beats import detect_batch
from ecgproto.data.preprocess import PreprocessConfig, highpass, prepare_record
from ecgproto.data.wfdb_io import read_record
from ecgproto.figures import draw_ecg, plot_ecg
from ecgproto.model.network import ECGProtoNet
from ecgproto.projection import gallery_path, prototype_name


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
        sims.append(branch.prototypes.pool(sim_map))
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
    labels = []
    for li in predicted:
        evidence = []
        for p in np.argsort(-contrib[li])[:top_k]:
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
            if window["pooling"] in ("lead_mean", "row_latent"):
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
                    "contribution": float(contrib[li, p]),
                    "weight": float(weight[li, p]),
                    "similarity": float(similarity[p]),
                    # how certain the match is: the similarity's range over the input perturbed at ECG noise
                    # level (Gaussian noise, baseline wander, a 40 ms shift; ecgproto.quality)
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


@torch.no_grad()
def _match_under_perturbation(
    model: ECGProtoNet, x: torch.Tensor, beats: torch.Tensor | None, sims: torch.Tensor
) -> np.ndarray:
    """(2, P): each prototype's lowest and highest normalised similarity with the input over the input as it is
    and perturbed (ecgproto.quality.perturbations)."""
    from ecgproto.quality import perturbations

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
    labels: np.ndarray, codes: tuple[str, ...], preferred: tuple[str, ...] = (), n: int = 3
) -> list[tuple[int, str]]:
    """(row, code) of `n` ECGs to explain: the first positive ECG of each of `preferred` (those with positives),
    then of the most frequent labels; one ECG per label and no ECG twice."""
    counts = labels.sum(axis=0)
    order = [codes.index(c) for c in preferred if c in codes] + list(np.argsort(-counts, kind="stable"))
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
    """One row per (label, prototype): the input with its matching window | (beat prototypes: the input's beat
    beside the prototype's beat, enlarged, in the prototype's leads) | the prototype's source ECG and window."""
    from ecgproto.figures import draw_beats

    rows = [(lab, ev) for lab in explanation["labels"] for ev in lab["evidence"]]
    fig = Figure(figsize=(17, 4.2 * len(rows)))  # the ECG panels keep their paper aspect: no width to spare
    axes = fig.subplots(len(rows), 3, squeeze=False, width_ratios=[10, 4, 10])
    for (lab, ev), (left, middle, right) in zip(rows, axes, strict=True):
        w = ev["input_window"]
        along = {
            "lead_mean": f" (mean along {','.join(w['leads'])}, best window shown)",
            "row_latent": f" (mean latent along {','.join(w['leads'])})",
            "beat": f" (mean of {w.get('n_beats')} beats in {','.join(w['leads'])}; best beat shown, "
            f"sim {w.get('beat_similarity', float('nan')):.2f}"
            + ("; no beats detected: 1 s grid windows" if w.get("beat_source") == "grid" else "")
            + ")",
        }.get(w["pooling"], "")
        draw_ecg(
            left,
            signal,
            model.fs,
            f"{title} {lab['code']} p={lab['probability']:.2f}{_calibrated(lab)}: "
            f"contribution {ev['contribution']:.2f} = w {ev['weight']:.2f} x sim {ev['similarity']:.2f}"
            f"{_noise_range(ev)}{along}",
            (w["start_s"], w["end_s"]),
            tuple(w["leads"]),
        )
        src = ev["prototype_source"]
        prov = model.provenance[ev["prototype"]] if model.provenance else None
        middle.set_axis_off()
        if prov is not None and model.source_signals.numel():
            source = model.source_signals[prov["source_index"]].float().numpy()
            draw_ecg(
                right,
                source,
                model.fs,
                f"{prototype_name(ev['prototype'], ev['class'], ev['branch'])} from ECG {src['ecg_id']} "
                f"[{src['source_labels']}]",
                (src["start_s"], src["end_s"]),
                tuple(str(src["leads"]).split(",")),
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
    fig.tight_layout()
    return fig


def _calibrated(label: dict[str, Any]) -> str:
    """' (calibrated 0.78, heads 0.70-0.85)' where the explanation has it."""
    if "calibrated_probability" not in label:
        return ""
    lo, hi = label["probability_range"]
    return f" (calibrated {label['calibrated_probability']:.2f}, heads {lo:.2f}-{hi:.2f})"


def _noise_range(evidence: dict[str, Any]) -> str:
    if "similarity_under_noise" not in evidence:
        return ""
    lo, hi = evidence["similarity_under_noise"]
    return f" ({lo:.2f}-{hi:.2f} under noise)"


def prototype_gallery(model: ECGProtoNet, only_projected_own_class: bool = True) -> Iterator[tuple[str, Figure]]:
    """One figure per prototype, ('gallery/<branch>/<class>/P0207.png', Figure), made one at a time
    (a thousand prototype figures would not fit in memory together)."""
    for prov in model.provenance:
        if only_projected_own_class and not prov["own_class_source"]:
            continue
        title = (
            f"{prototype_name(prov['prototype'], prov['class'], prov['branch'])} | ECG {prov['ecg_id']} "
            f"[{prov['source_labels']}] | window {prov['start_s']:.2f}-{prov['end_s']:.2f} s, leads {prov['leads']} "
            f"| cos {prov['similarity']:.3f}, fidelity {prov.get('fidelity', float('nan')):.2f}"
            + (
                f" | purity {prov['purity']:.2f}, consistency {prov['consistency']:.2f}, "
                f"stability {prov['stability']:.2f}" + (", near-duplicate" if prov.get("duplicate") else "")
                if "purity" in prov
                else ""
            )
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


def load_record_for_model(path: str | Path, config: PreprocessConfig | None = None) -> np.ndarray:
    """A WFDB record (path without extension) -> (12, n) preprocessed exactly as ingest does."""
    config = config or PreprocessConfig()
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".hea", ".dat") else base
    x, _ = prepare_record(read_record(base), config, str(base))
    x = x.T  # (12, n)
    if config.highpass_hz:
        x = highpass(x, config.fs, config.highpass_hz, config.highpass_order, axis=-1)
    return np.ascontiguousarray(x, dtype=np.float32)
