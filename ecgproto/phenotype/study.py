"""A phenotype association study in one object: cohort + phecodes + feature sets -> result tables.

    study = PhenotypeStudy(StudyConfig())
    result = study.run(cohort_store, hosp_dir, model, machine_measurements_csv)
    result.results  # one row per (feature set, feature, phecode), RESULT_COLUMNS

`study_report` turns a result into what MLflow receives, applying the credentialed-data rules: no
subject/admission/record ids, no exported count below 10 and none derivable from the other exported numbers
(`ecgproto.phenotype.disclosure`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from ecgproto.data.store import ArrayStore
from ecgproto.phenotype import compare
from ecgproto.phenotype import figures as figs
from ecgproto.phenotype.cohort import Cohort, CohortConfig, build_cohort
from ecgproto.phenotype.disclosure import protect_study_counts
from ecgproto.phenotype.engine import (
    CATEGORY_COLUMNS,
    RESULT_COLUMNS,
    AssociationEngine,
    EngineConfig,
    FeatureSet,
)
from ecgproto.phenotype.features import (
    Scores,
    class_features,
    nlp_features,
    own_class_only,
    probability_features,
    prototype_features,
    score_cohort,
    scores_from_activations,
    top1_features,
    zscore,
)
from ecgproto.phenotype.phecodes import (
    MappingReport,
    PhecodeMap,
    PhecodeStatus,
    mapping_report,
    phecode_status,
)
from ecgproto.privacy import MIN_CELL, drop_identifiers
from ecgproto.report import StageReport
from ecgproto.scoring import ActivationStore

ALL_SETS = ("prototype", "prototype_top1", "prototype_class", "class_prob", "nlp_concept")


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not a silent default

    cohort: CohortConfig = Field(default_factory=CohortConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    phecode_version: str = Field("1.2", pattern=r"^(1\.2|X)$")
    min_cases: int = 20
    min_controls: int = 20
    feature_sets: tuple[str, ...] = ALL_SETS
    nlp_min_prevalence: float = 0.001
    own_class_prototypes_only: bool = Field(
        True,
        description="test only prototypes projected onto an ECG of their own class (the others carry a "
        "class name their source ECG does not have)",
    )
    predict: bool = True
    targets: dict[str, str] = Field(default_factory=lambda: dict(compare.TARGETS))
    seed: int = 0
    batch_size: int = 256
    device: str = "cpu"
    min_cell: int = MIN_CELL
    uncertain_ecgs: Literal["keep", "flag", "drop"] = Field(
        "keep",
        description="ECGs whose prediction the model is unsure about (more uncertain than `uncertainty_percentile` "
        "of its validation fold; ECGProtoNet.uncertainty): keep (no check), flag (count them in the run) or drop "
        "(leave their admissions out, a step of the cohort flow)",
    )
    uncertainty_percentile: float = Field(95.0, gt=0, lt=100)


@dataclass
class StudyResult:
    results: pd.DataFrame
    cohort: Cohort
    status: PhecodeStatus
    mapping: MappingReport
    strength: pd.DataFrame
    specificity: pd.DataFrame
    calibration: pd.DataFrame
    prediction: pd.DataFrame
    distances: pd.DataFrame
    distance_summary: dict[str, float]
    curves: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    n_features: dict[str, int] = field(default_factory=dict)
    message: str = ""  # why nothing was tested, and what would make phecodes testable
    uncertain: int | None = None  # cohort ECGs above the uncertainty percentile (None: not checked)

    def without_identifiers(self) -> StudyResult:
        """The same result with no subject, admission or record id and no diagnosis rows (what the
        Prefect result store may keep); the tables, counts and figures it reports are unchanged."""
        private = ("hadm_id", "subject_id", "record_id", "row", "ecg_time")
        cohort = Cohort(
            self.cohort.table.drop(columns=[c for c in private if c in self.cohort.table]),
            self.cohort.diagnoses.iloc[:0, :0],
            self.cohort.flow,
            self.cohort.units.drop(columns=["subject_id"], errors="ignore"),
            self.cohort.unit_of,
        )
        return replace(self, cohort=cohort)


@torch.no_grad()
def uncertainty_percentile(model: Any, similarities: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """(n,) where each ECG's uncertainty falls among the model's validation ECGs (0-100;
    ECGProtoNet.uncertainty), from its pooled similarities."""
    if not model.calibrated:
        raise ValueError(
            "this model has no uncertainty reference (trained before ecgproto fitted one): train it again, or "
            "run the study with --uncertain-ecgs keep"
        )
    device = model.uncertainty_quantiles.device  # wherever the study scored the cohort (cpu or cuda)
    out = [
        model.uncertainty(torch.as_tensor(similarities[i : i + batch_size], dtype=torch.float32, device=device))[
            "percentile"
        ].cpu()
        for i in range(0, len(similarities), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0)


class PhenotypeStudy:
    def __init__(self, config: StudyConfig | None = None) -> None:
        self.config = config or StudyConfig()
        unknown = set(self.config.feature_sets) - set(ALL_SETS)
        if unknown:
            raise ValueError(f"unknown feature set(s) {sorted(unknown)}; choose from {ALL_SETS}")

    def cohort(
        self, store: ArrayStore, hosp: Path, drop_rows: np.ndarray | None = None
    ) -> tuple[Cohort, PhecodeStatus, MappingReport]:
        step = f"ECG not more uncertain than {self.config.uncertainty_percentile:g}% of the model's validation ECGs"
        listed = store.info.get("n_listed")
        cohort = build_cohort(store.manifest, Path(hosp), self.config.cohort, drop_rows, step, listed)
        pmap = PhecodeMap.load(self.config.phecode_version)  # type: ignore[arg-type]
        pairs, detail = pmap.map_diagnoses(cohort.diagnoses)
        status = phecode_status(
            cohort.table["hadm_id"],
            pairs,
            pmap,
            cohort.table["male"].to_numpy(),
            self.config.min_cases,
            self.config.min_controls,
            unit_of=cohort.unit_of,
        )
        return cohort, status, mapping_report(detail)

    def feature_sets(self, scores: Scores | None, reports: pd.DataFrame | None) -> list[FeatureSet]:
        makers = {
            "prototype": prototype_features,
            "prototype_top1": top1_features,
            "prototype_class": class_features,
            "class_prob": probability_features,
        }
        out = []
        for name in self.config.feature_sets:
            if name == "nlp_concept":
                if reports is not None:
                    out.append(nlp_features(reports, self.config.nlp_min_prevalence))
            elif scores is not None:
                out.append(makers[name](scores))
        return out

    def run(
        self,
        store: ArrayStore,
        hosp: Path,
        model: Any | None = None,
        machine_measurements: Path | None = None,
        progress: bool = True,
        activations: ActivationStore | None = None,
    ) -> StudyResult:
        """`activations` (an activation store of `model` on `store`, from `ecgproto score`) replaces scoring."""
        c = self.config
        cohort, status, mapping = self.cohort(store, hosp)
        if status.status.shape[1] == 0:
            return self._nothing_testable(cohort, status, mapping)
        rows = cohort.table["row"].to_numpy()
        if activations is not None:
            if activations.info["store"] != store.key:
                raise ValueError(
                    f"{activations.path}: scored another store ({activations.info['store'][:16]}), "
                    f"not {store.path} ({store.key[:16]})"
                )
            scores = scores_from_activations(activations, rows)
        elif model is not None:
            scores = score_cohort(model, store, rows, c.batch_size, c.device, progress)
        else:
            scores = None
        uncertain = None
        if c.uncertain_ecgs != "keep" and scores is not None:
            if scores.percentile is not None:  # scored with the model's calibration (here or by `ecgproto score`)
                pct = scores.percentile
            elif model is not None:  # an activation store scored before ecgproto stored the uncertainty
                pct = uncertainty_percentile(model, scores.similarities)
            else:  # no model: the scores came from an activation store
                assert activations is not None
                raise ValueError(
                    f"{activations.path}: holds no uncertainty (scored by an older ecgproto or by a model without "
                    "calibration): score the cohort again with `ecgproto score`, pass the model beside the "
                    "activations, or use uncertain_ecgs='keep'"
                )
            flagged = pct > c.uncertainty_percentile
            uncertain = int(flagged.sum())
            if c.uncertain_ecgs == "drop":
                cohort, status, mapping = self.cohort(store, hosp, rows[flagged])
                if status.status.shape[1] == 0:
                    return replace(self._nothing_testable(cohort, status, mapping), uncertain=uncertain)
                at = pd.Series(np.arange(len(rows)), index=rows).loc[cohort.table["row"].to_numpy()].to_numpy()
                rows = rows[at]
                scores = scores.take(at)
        if scores is not None and c.own_class_prototypes_only:
            scores = own_class_only(scores)
        reports = None
        if machine_measurements is not None:
            mm = pd.read_csv(machine_measurements, dtype={"study_id": str}, low_memory=False)
            reports = cohort.table[["record_id"]].merge(mm, left_on="record_id", right_on="study_id", how="left")
        sets = [pool_units(fs, cohort.unit_of, len(cohort.units)) for fs in self.feature_sets(scores, reports)]
        if not sets:
            raise ValueError("no feature set to test: give a model and/or machine_measurements.csv")
        # one row per subject (a subject's admissions pooled), so the rows are independent
        engine = AssociationEngine(c.engine).fit(
            cohort.units["age"].to_numpy(float), cohort.units["male"].to_numpy(bool), status
        )
        results = pd.concat([engine.test(fs) for fs in sets], ignore_index=True)
        for col in CATEGORY_COLUMNS:  # concat of differing categories falls back to object
            results[col] = results[col].astype("category")
        shared = c.engine.alpha / max(int(results["p_value"].notna().sum()), 1)
        results["bonferroni_threshold_shared"] = shared
        results["significant_bonf_shared"] = results["p_value"] < shared

        n_features = {fs.name: fs.values.shape[1] for fs in sets}
        strength = compare.strength_by_category(results)
        calibration = (
            compare.feature_count_calibration(results, n_features, seed=c.seed)
            if "prototype" in n_features
            else pd.DataFrame()
        )
        prediction, curves = pd.DataFrame(), {}
        covariates = np.column_stack([cohort.units["age"].to_numpy(float), cohort.units["male"].to_numpy(float)])
        if c.predict:
            prediction, curves = compare.prediction_table(
                {fs.name: fs.values for fs in sets if fs.name != "prototype_top1"},
                covariates,
                status.status,
                status.phecodes["phecode"].tolist(),
                np.arange(len(cohort.units)),
                resolve_targets(c.targets, status),
                c.seed,
            )
        distances, summary = pd.DataFrame(), {}
        if scores is not None and model is not None:
            distances, summary = compare.mixed_significance_test(
                results, compare.intra_class_distance(_prototype_vectors(model), scores.prototypes), seed=c.seed
            )
        return StudyResult(
            results,
            cohort,
            status,
            mapping,
            strength,
            compare.specificity(results),
            calibration,
            prediction,
            distances,
            summary,
            curves,
            n_features,
            uncertain=uncertain,
        )

    def _nothing_testable(self, cohort: Cohort, status: PhecodeStatus, mapping: MappingReport) -> StudyResult:
        """A cohort too small for any phecode: a finished study with the cohort flow, the untested list
        and a message saying what would make phecodes testable (no scoring, no tests)."""
        c = self.config
        n_units = len(cohort.units)
        below = status.untested["reason"].astype(str)
        message = (
            f"no phecode is testable: each needs >= {c.min_cases} case and >= {c.min_controls} control "
            f"subjects, and this cohort has {n_units if n_units >= c.min_cell else f'<{c.min_cell}'} subjects"
            f" ({int(below.str.startswith('fewer than').sum())} phecodes seen, all below). {_largest_loss(cohort.flow)}"
            "Link more ECGs (a larger cohort, --admissions all, a wider window) or lower --min-cases/--min-controls."
        )
        empty = pd.DataFrame(columns=RESULT_COLUMNS + ["bonferroni_threshold_shared", "significant_bonf_shared"])
        return StudyResult(
            empty,
            cohort,
            status,
            mapping,
            pd.DataFrame(),
            pd.DataFrame(),
            pd.DataFrame(),
            pd.DataFrame(),
            pd.DataFrame(),
            {},
            message=message,
        )


def _largest_loss(flow: pd.DataFrame) -> str:
    """The cohort step that removed the largest share of what reached it, as a sentence naming the step
    (no count: the flow table is where counts are published, suppressed)."""
    best, share = "", 0.0
    for (_, prev), (_, row) in zip(flow.iloc[:-1].iterrows(), flow.iloc[1:].iterrows(), strict=True):
        if row["unit"] != prev["unit"] or prev["n"] <= 0:
            continue
        lost = 1 - row["n"] / prev["n"]
        if lost > share:
            best, share = str(row["step"]), lost
    if not best or share < 0.5:
        return ""
    how = "every one" if share >= 1 else "most"
    return f"The cohort step that removed the most: '{best}' ({how} of what reached it; see the cohort flow). "


def resolve_targets(targets: dict[str, str], status: PhecodeStatus) -> dict[str, str]:
    """A target phecode tested under a more specific code with the same cases (428 as 428.1) -> that code."""
    same = status.untested.set_index("phecode")["same_cases_as"] if len(status.untested) else pd.Series(dtype=str)
    return {(same.get(code) or code): name for code, name in targets.items()}


ZSCORED = ("prototype", "prototype_class", "class_prob")  # per-SD features; the others are 0/1 indicators


def pool_units(fs: FeatureSet, unit_of: np.ndarray, n_units: int) -> FeatureSet:
    """Admission rows -> one row per analysis unit (subject): the mean of its ECGs' features (for an
    indicator, the share of its ECGs that show it); per-SD features are standardised again over units."""
    if n_units == len(unit_of) and (unit_of == np.arange(n_units)).all():
        return fs
    counts = np.bincount(unit_of, minlength=n_units).astype(np.float64)
    sums = np.zeros((n_units, fs.values.shape[1]))
    np.add.at(sums, unit_of, fs.values.astype(np.float64))
    values = sums / counts[:, None]
    return FeatureSet(fs.name, zscore(values) if fs.name in ZSCORED else values.astype(np.float32), fs.features)


def _prototype_vectors(model: Any) -> np.ndarray:
    """All prototypes as rows; branches have different widths, so pad (cosine is unchanged by zeros)."""
    blocks = [b.prototypes.prototypes.detach().cpu().numpy() for b in model.branches.values()]
    width = max(b.shape[1] for b in blocks)
    return np.concatenate([np.pad(b, ((0, 0), (0, width - b.shape[1]))) for b in blocks])


def top_hits_markdown(hits: pd.DataFrame, link: Callable[[str], str] | None = None, top: int = 50) -> str:
    """The strongest Bonferroni-significant associations as a table a reviewer reads in the artifact viewer:
    the phecode and its name, the feature (for a prototype, its class and a link to its gallery image via `link`),
    the odds ratio per SD with its 95% CI, p and q."""
    lines = [
        "# Top associations (Bonferroni-significant, smallest p first)",
        "",
        "Odds ratio per standard deviation of the feature (per share of ECGs for an indicator), adjusted for age "
        "and sex; q is the Benjamini-Hochberg FDR.",
        "",
        "| phecode | condition | feature | odds ratio [95% CI] | p | q |",
        "|---|---|---|---|---|---|",
    ]
    for row in hits.head(top).itertuples(index=False):
        feature = f"{row.feature_set}: {row.feature_label}"
        image = str(getattr(row, "gallery_image", "") or "")
        if image and link is not None:
            feature = f"[{feature}]({link(image)})"
        lines.append(
            f"| {row.phecode} | {row.phecode_string} | {feature} | {row.odds_ratio:.2f} [{row.ci_low:.2f}, "
            f"{row.ci_high:.2f}] | {row.p_value:.2g} | {row.q_fdr:.2g} |"
        )
    if len(hits) == 0:
        lines.append("| | no association reached Bonferroni significance | | | | |")
    return "\n".join(lines) + "\n"


def study_report(
    result: StudyResult, config: StudyConfig, lineage: dict[str, str] | None = None, top: int = 50
) -> StageReport:
    """Tables, figures and metrics for MLflow, with identifiers dropped and small counts suppressed."""
    lineage = lineage or {}
    counts = ["n_cases", "n_controls", "n_excluded"]
    results = result.results.copy()
    gallery = lineage.get("gallery_run_id", "")
    is_proto = results["feature_set"].isin(["prototype", "prototype_top1"])
    results["gallery_image"] = np.where(
        is_proto,
        "gallery/"
        + results["branch"].astype(str)
        + "/"
        + results["prototype_class"].astype(str)
        + "/"
        + results["feature_id"].astype(str)
        + ".png",
        "",
    )  # = projection.gallery_path
    results["gallery_run_id"] = np.where(is_proto, gallery, "")
    protected = protect_study_counts(
        result.cohort.flow,
        result.status.phecodes,
        result.mapping.by_version,
        result.mapping.by_chapter,
        result.prediction,
        config.min_cell,
    )
    exported = results
    if len(results):
        exported[counts] = protected.counts_of(results["phecode"]).to_numpy()
    hits = exported[exported["significant_bonf"].astype(bool)].sort_values("p_value").head(top)

    r = StageReport()
    r.params = {"study": config.model_dump(), **{f"lineage.{k}": v for k, v in lineage.items()}}
    r.tags = {k: v for k, v in lineage.items() if k in ("model_uri", "model_version", "dataset_hash", "train_run_id")}
    r.tables = {
        "association/results": exported,
        "association/top_hits": hits,
        "association/phecodes_tested": protected.phecodes,
        "association/phecodes_untested": result.status.untested,
        "association/cohort_flow": protected.flow,
        "association/mapping_by_version": protected.by_version,
        "association/mapping_by_chapter": protected.by_chapter,
        "comparison/strength_by_category": result.strength,
        "comparison/specificity": result.specificity,
    }
    r.formats = {"association/results": ("parquet", "tsv"), "association/top_hits": ("tsv", "csv")}
    if result.message:  # nothing tested: the cohort flow, the untested list and why
        r.documents["association/nothing_tested.json"] = {"message": result.message}
        for name in (
            "association/results",
            "association/top_hits",
            "association/phecodes_tested",
            "comparison/strength_by_category",
            "comparison/specificity",
        ):
            del r.tables[name]
    if len(result.calibration):
        r.tables["comparison/feature_count_calibration"] = result.calibration
    if len(result.prediction):
        r.tables["comparison/prediction_auc"] = protected.prediction
    if len(result.distances):
        r.tables["comparison/intra_class_distance"] = result.distances
        r.documents["comparison/intra_class_distance_test.json"] = result.distance_summary
    for name, t in r.tables.items():  # belt and braces: no identifier column leaves the study
        r.tables[name] = drop_identifiers(t)
    r.documents["association/mapping_summary.json"] = {
        "rate_outside_supplementary_chapters": result.mapping.rate_outside_supplementary,
        "aim": ">= 0.97 of rows outside V/Z (supplementary) and E/V-Y (external cause) chapters",
    }

    m: dict[str, float] = {
        "cohort_admissions": protected.cohort_admissions,
        "cohort_subjects": protected.cohort_subjects,
        "phecodes_tested": float(len(result.status.phecodes)),
        "phecodes_untested": float(len(result.status.untested)),
        "mapping_rate_outside_supplementary": result.mapping.rate_outside_supplementary,
    }
    for version, row in protected.by_version.set_index("icd_version").iterrows():
        m[f"mapping_rate_icd{int(version)}"] = float(row["mapping_rate"])
    for fs, g in result.results.groupby("feature_set", observed=True):
        m[f"{fs}.tests"] = float(g["p_value"].notna().sum())
        m[f"{fs}.significant_bonf"] = float(g["significant_bonf"].sum())
        m[f"{fs}.significant_fdr"] = float(g["significant_fdr"].sum())
        # distinct conditions: phecodes sharing a case set were collapsed to one before testing
        m[f"{fs}.significant_phecodes"] = float(g.loc[g["significant_bonf"], "phecode"].nunique())
    if result.uncertain is not None:  # a count below min_cell is not exported (nor is it derivable: flag only)
        if result.uncertain >= config.min_cell:
            m[f"uncertain_ecgs_{'dropped' if config.uncertain_ecgs == 'drop' else 'flagged'}"] = float(result.uncertain)
        r.tags["uncertain_ecgs"] = (
            f"{config.uncertain_ecgs}: ECGs more uncertain than {config.uncertainty_percentile:g}% of the model's "
            f"validation ECGs: {result.uncertain if result.uncertain >= config.min_cell else f'<{config.min_cell}'}"
        )
    r.metrics = m
    if result.message:  # nothing was tested: no figures
        r.description = f"**Association study**: nothing was tested. {result.message}"
        return r
    r.documents["association/top_hits.md"] = top_hits_markdown(hits, top=top)
    sets = [k.removesuffix(".significant_phecodes") for k in m if k.endswith(".significant_phecodes")]
    found = ", ".join(f"{fs} {int(m[f'{fs}.significant_phecodes'])}" for fs in sets)
    r.description = (
        f"**Association study**: {int(m['phecodes_tested'])} phecodes tested against every feature; conditions with "
        f"a Bonferroni-significant association, by feature set: {found or 'none'}.\n\nOpen: "
        "[top associations](artifacts/association/top_hits.md), "
        "[prototype x phecode heatmap](artifacts/figures/prototype_phecode_heatmap.png), "
        "[cohort flow](artifacts/association/cohort_flow.csv). Counts below 10 are hidden."
    )

    for fs, g in result.results.groupby("feature_set", observed=True):
        r.figures[f"figures/manhattan_{fs}.png"] = figs.manhattan(g, str(fs), config.engine.alpha)
    if "prototype" in result.n_features:
        r.figures["figures/prototype_phecode_heatmap.png"] = figs.heatmap(
            result.results[result.results["feature_set"] == "prototype"]
        )
    r.figures["figures/feature_set_comparison.png"] = figs.feature_set_comparison(result.strength)
    if result.curves:
        r.figures["figures/roc_curves.png"] = figs.roc_curves(result.curves, result.prediction)
    if len(result.distances):
        r.figures["figures/intra_class_distance.png"] = figs.distance_plot(result.distances, result.distance_summary)
    return r
