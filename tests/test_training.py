"""Training end to end on the demo data: a real Prefect flow run into a real MLflow sqlite store.

One short CPU training (module fixture) is shared by the checks of what a user relies on: planted
labels are learned, prototypes are real training segments, the run tree and the registered model
are in MLflow, and `ecgproto explain` renders an explanation. Determinism and resume-after-kill
are checked on one branch of a smaller store.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from ecgproto import tracking
from ecgproto.data.demo.beat_model import PLANTED_LABELS
from ecgproto.data.demo.generate import DemoConfig, generate_demo
from ecgproto.data.ingest import IngestConfig, ingest
from ecgproto.data.labels import load_label_set
from ecgproto.data.store import ArrayStore
from ecgproto.evaluation.metrics import macro_auroc
from ecgproto.explain import prototype_gallery
from ecgproto.model import persist
from ecgproto.train import stages
from ecgproto.train.config import TrainConfig
from ecgproto.train.data import SplitData

PLANTED = tuple(PLANTED_LABELS)


def fast_config() -> TrainConfig:
    cfg = TrainConfig.small()
    cfg.joint.epochs = 6  # rhythm and global branches are near 1.0 by epoch 3; keeps the fixture ~3 min
    cfg.baseline.stage.epochs = 6
    return cfg


@pytest.fixture(scope="module")
def trained(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from ecgproto.flows.train import train_flow

    root = tmp_path_factory.mktemp("training")
    demo = generate_demo(root / "demo", DemoConfig(n_ptbxl=2000, n_hr=10, n_mimic_subjects=0, workers=2))
    store = ingest(demo.ptbxl, root / "store", IngestConfig(workers=2), progress=False).store
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ECGPROTO_HOME", str(root))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        out = train_flow(
            str(store.path), fast_config(), work_root=str(root / "work"), tracking_uri=uri, planted=PLANTED
        )
    return SimpleNamespace(out=out, store=store, uri=uri, demo=demo, root=root, demo_seed=DemoConfig().seed)


@pytest.mark.slow
def test_short_cpu_training_learns_every_planted_label(trained: SimpleNamespace) -> None:
    m = trained.out["metrics"]
    assert m["test.planted_macro_auroc"] >= 0.90
    c = tracking.client(trained.uri)
    per_label = Path(c.download_artifacts(trained.out["evaluate_run_id"], "evaluation/fused.csv", str(trained.root)))
    t = pd.read_csv(per_label).set_index("code")
    for code in PLANTED:
        assert t.loc[code, "n_pos"] > 0 and t.loc[code, "auroc_lo"] > 0.5, code  # beats chance, whole test fold
    assert m["baseline.macro_auroc"] > 0.9  # the black box is trained and shown side by side
    assert m["fused.macro_auroc_lo"] <= m["fused.macro_auroc"] <= m["fused.macro_auroc_hi"]
    d = m["fused_minus_baseline.macro_auroc"]  # the two side by side, paired on the same test records
    assert d == pytest.approx(m["fused.macro_auroc"] - m["baseline.macro_auroc"], abs=1e-9)
    assert m["fused_minus_baseline.macro_auroc_lo"] <= d <= m["fused_minus_baseline.macro_auroc_hi"]


@pytest.mark.slow
def test_every_projected_prototype_is_the_latent_of_a_real_training_segment_of_its_class(
    trained: SimpleNamespace,
) -> None:
    model = persist.load(Path(trained.out["work_dir"]) / "model.pt")
    manifest = trained.store.manifest.set_index("record_id")
    provenance = pd.DataFrame(model.provenance)
    assert len(provenance) == model.n_prototypes
    offsets = model.prototype_offsets()
    checked = 0
    for _, p in provenance[provenance["own_class_source"]].iterrows():
        assert manifest.loc[p["ecg_id"], "split"] == "train"
        assert p["class"] in p["source_labels"].split(",")
        branch = model.branches[p["branch"]]
        row = manifest.loc[p["ecg_id"], "row"]
        x = torch.as_tensor(np.array(trained.store.signals[row], dtype=np.float32))
        beats = torch.as_tensor(np.array(trained.store.beats[row], dtype=np.int64))
        with torch.no_grad():  # a real window: of the local branch, one beat (not the record's mean over beats)
            latent = branch.candidate_windows(x[None], beats[None])[0][0, int(p["window"])]
        proto = branch.prototypes.prototypes[p["prototype"] - offsets[p["branch"]]]
        assert torch.allclose(latent, proto, atol=1e-5), p["prototype"]
        assert 0 <= p["window_start"] < p["window_end"] <= 1000
        if p["branch"] == "morphology_2d_local":
            assert p["end_s"] - p["start_s"] <= 1.5 and p["beat_source"] in ("detected", "grid")
        checked += 1
    assert checked >= len(PLANTED) * 3
    # the prototypes of one class come from different ECGs (where the class has enough training records)
    train = trained.store.manifest[trained.store.manifest["split"] == "train"]
    n_pos = dict(zip(model.codes, np.asarray(trained.store.labels)[train["row"].to_numpy()].sum(axis=0), strict=True))
    own = provenance[provenance["own_class_source"]]
    for (_, code), group in own.groupby(["branch", "class"]):
        if n_pos[code] >= len(group):
            assert group["ecg_id"].nunique() == len(group), code


@pytest.mark.slow
def test_training_is_one_mlflow_run_tree_with_curves_gallery_and_a_registered_model(trained: SimpleNamespace) -> None:
    c = tracking.client(trained.uri)
    parent = c.get_run(trained.out["run_id"])
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = sorted(r.data.tags["mlflow.runName"] for r in children)
    for branch in ("rhythm_1d", "morphology_2d_local", "global_2d"):
        assert {f"{branch}/joint", f"{branch}/projection", f"{branch}/last_layer"} <= set(names)
    assert {"fusion", "baseline", "evaluate"} <= set(names)
    # the black box teaches the branches (loss.distill): it trains first, and its scores of the training records,
    # kept beside it, rank the training labels as a teacher should
    start = {r.data.tags["mlflow.runName"]: r.info.start_time for r in children}
    assert start["baseline"] < min(v for k, v in start.items() if k.endswith("/joint"))
    teacher = np.load(Path(trained.out["work_dir"]) / "baseline" / "train_scores.npy")
    train = SplitData(trained.store, "train")
    assert teacher.shape == (len(train), 71) and 0 <= teacher.min() and teacher.max() <= 1
    assert macro_auroc(train.labels, teacher) > 0.9
    assert parent.data.params["config.joint.lr"] and parent.data.tags["dataset_hash"] == trained.store.key
    joint = next(r for r in children if r.data.tags["mlflow.runName"] == "rhythm_1d/joint")
    curve = c.get_metric_history(joint.info.run_id, "val_macro_auroc")
    assert len(curve) >= 2 and [m.step for m in curve] == sorted(m.step for m in curve)
    fusion_id = next(r for r in children if r.data.tags["mlflow.runName"] == "fusion").info.run_id
    fusion = tracking.describe(fusion_id, trained.uri)
    gallery = [a for a in fusion["artifacts"] if a.startswith("gallery/") and a.endswith(".png")]
    assert any("/AFIB/" in a for a in gallery) and any("/LVH/" in a for a in gallery)
    assert "provenance.csv" in fusion["artifacts"]
    # one figure per distinct case, none dropped (prototypes of classes without a training ECG are shown, marked),
    # and a README that lists every prototype, merged ones with the case they repeat
    model = persist.load(Path(trained.out["work_dir"]) / "model.pt")
    prov = pd.DataFrame(model.provenance)
    distinct = prov[prov["merged_into"] == prov["prototype"]]
    assert sorted(gallery) == sorted(
        f"gallery/{r.branch}/{r['class']}/P{r.prototype:04d}.png" for _, r in distinct.iterrows()
    )
    assert not distinct["own_class_source"].all()  # the demo has classes without training ECGs: still shown
    readme = Path(c.download_artifacts(fusion_id, "gallery/README.md", str(trained.root)))
    text = readme.read_text()
    assert f"{len(distinct)} distinct cases of {len(prov)} prototypes" in text
    assert all(f"P{p:04d}" in text for p in prov["prototype"])
    assert all(column in text for column in ("cos", "fidelity", "purity", "consistency", "stability", "near-duplicate"))
    version = c.get_model_version("ecgproto-protoecgnet", trained.out["model_version"])
    assert version.run_id == trained.out["evaluate_run_id"]
    loaded = tracking.load_model(f"models:/ecgproto-protoecgnet/{trained.out['model_version']}", trained.uri)
    x = torch.as_tensor(np.array(trained.store.signals[:4], dtype=np.float32))
    assert loaded(x).shape == (4, 71)


@pytest.mark.slow
def test_explain_command_writes_a_png_and_json_ranked_by_contribution(
    trained: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ecgproto.cli import main

    db = pd.read_csv(trained.demo.ptbxl / "ptbxl_database.csv")
    test = db[db["strat_fold"] == 10]
    afib = test[test["scp_codes"].str.contains("'AFIB'")].iloc[0]
    normal = test[test["scp_codes"].str.contains("'NORM'")].iloc[0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.uri)
    probs = {}
    for name, row in (("afib", afib), ("normal", normal)):
        record = trained.demo.ptbxl / row["filename_lr"]
        assert main(["explain", str(record), "--model", trained.out["model_uri"], "--out", str(tmp_path)]) == 0
        stem = Path(row["filename_lr"]).name
        assert (tmp_path / f"{stem}.explanation.png").stat().st_size > 10_000
        result = json.loads((tmp_path / f"{stem}.explanation.json").read_text())
        for label in result["labels"]:
            # the label's own cases first, by contribution; then what the ECG also resembles, marked as such
            own = [e["own_class"] for e in label["evidence"]]
            assert own == sorted(own, reverse=True) and own[0], label
            for flag in (True, False):
                contributions = [e["contribution"] for e in label["evidence"] if e["own_class"] == flag]
                assert contributions == sorted(contributions, reverse=True)
            assert all(e["contribution"] > 0 for e in label["evidence"][1:])
            assert all(e["input_window"]["leads"] for e in label["evidence"])
            for e in label["evidence"]:  # says how the similarity was pooled: over beats, or the whole record
                local = e["branch"] == "morphology_2d_local"
                w = e["input_window"]
                assert w["pooling"] == ("beat" if local else "time_mean")
                if local:  # the input's best-matching beat in the prototype's own leads, beside the prototype's beat
                    assert w["end_s"] - w["start_s"] <= 1.5 and w["n_beats"] == 8
                    assert ",".join(w["leads"]) == e["prototype_source"]["leads"]
        probs[name] = result["probabilities"]["AFIB"]
    assert probs["afib"] > probs["normal"]
    # asked about labels by name, predicted or not; an unknown code is one message, exit code 2
    record = str(trained.demo.ptbxl / normal["filename_lr"])
    assert (
        main(
            [
                "explain",
                record,
                "--model",
                trained.out["model_uri"],
                "--out",
                str(tmp_path),
                "--label",
                "LVH",
                "--label",
                "AFIB",
            ]
        )
        == 0
    )
    asked = json.loads((tmp_path / f"{Path(normal['filename_lr']).name}.explanation.json").read_text())
    assert [lab["code"] for lab in asked["labels"]] == ["LVH", "AFIB"]
    assert main(["explain", record, "--model", trained.out["model_uri"], "--label", "XYZ"]) == 2


@pytest.mark.slow
def test_a_planted_local_morphology_is_shown_on_its_own_leads_and_on_a_real_beat(trained: SimpleNamespace) -> None:
    """The demo plants inferior Q waves (IMI: II, III, aVF) and ST elevation (STE_: V1-V4) in every beat. Asked why
    a test ECG has the label, the strongest lead-group prototype matches on those leads and the input window shown is
    one of the record's true beats (the generator's QRS onsets, re-drawn from the demo's seed)."""
    from ecgproto.data.demo.beat_model import synthesize
    from ecgproto.data.demo.generate import _seed
    from ecgproto.data.labels import parse_scp_codes
    from ecgproto.explain import explain

    model = persist.load(Path(trained.out["work_dir"]) / "model.pt")
    db = pd.read_csv(trained.demo.ptbxl / "ptbxl_database.csv").set_index("ecg_id")
    m = trained.store.manifest
    test = m[m["split"] == "test"]
    for code, leads in (("IMI", ("II", "aVF", "III")), ("STE_", ("V1", "V2", "V3"))):
        rows = test[test["labels_text"].str.split().apply(lambda labels, c=code: c in labels)]
        assert len(rows) >= 5, code
        on_leads = 0
        for _, r in rows.iterrows():
            result = explain(model, np.asarray(trained.store.signals[r["row"]]), top_k=model.n_prototypes, codes=[code])
            # the lead-group prototype that adds most to this label (the groups of 3 leads, not the whole beat)
            local = [
                e
                for e in result["labels"][0]["evidence"]
                if e["branch"] == "morphology_2d_local" and len(e["input_window"]["leads"]) == 3
            ]
            w = local[0]["input_window"]
            on_leads += tuple(w["leads"]) == leads
            labels = set(parse_scp_codes(db.loc[int(r["record_id"]), "scp_codes"]))
            _, facts = synthesize(_seed(trained.demo_seed, 1, int(r["record_id"])), labels, fs=500.0)
            r_peaks = np.asarray(facts["qrs_onsets_s"]) + 0.04
            assert ((r_peaks >= w["start_s"]) & (r_peaks <= w["end_s"])).any(), (code, r["record_id"], w)
            assert w["end_s"] - w["start_s"] <= 1.5
        assert on_leads >= 0.8 * len(rows), (code, on_leads, len(rows))


def _store(demo_root: Path, tmp_path: Path) -> ArrayStore:
    return ingest(demo_root / "ptbxl", tmp_path / "store", IngestConfig(workers=1), progress=False).store


def _one_branch_config() -> TrainConfig:
    cfg = TrainConfig.small().without_baseline()  # one branch on the labels alone (no black box, no teacher)
    cfg.joint.epochs = 3
    cfg.joint.patience = 10
    return cfg


def test_a_stage_that_learns_from_the_black_box_says_to_train_it_first(demo_root: Path, tmp_path: Path) -> None:
    store = _store(demo_root, tmp_path)
    cfg = TrainConfig.small()
    cfg.loss.distill = 0.5
    ctx = stages.TrainContext.open(store.path, cfg, tmp_path / "work")
    with pytest.raises(FileNotFoundError, match=r"baseline\.pt.*run the baseline stage first"):
        stages.train_joint(ctx, "rhythm_1d")
    assert not ctx.path("rhythm_1d", "joint.ckpt").exists()  # nothing half-done left behind
    cfg.baseline.enabled = False  # switched off after the config was built: still no stage without its teacher
    off = stages.TrainContext.open(store.path, cfg, tmp_path / "off")
    with pytest.raises(ValueError, match="baseline is switched off"):
        stages.train_joint(off, "rhythm_1d")


@pytest.mark.slow
def test_registered_model_scores_an_external_cohort_and_its_prototypes_meet_the_planted_phecodes(
    trained: SimpleNamespace,
) -> None:
    from ecgproto.data.demo.cohort import PLANTED as PLANTED_DX
    from ecgproto.flows.associate import associate_flow
    from ecgproto.phenotype.study import StudyConfig

    cohort = generate_demo(trained.root / "cohort", DemoConfig(n_ptbxl=20, n_hr=0, workers=2))  # 1,500 subjects
    store = ingest(cohort.mimic_ecg, trained.root / "store", IngestConfig(workers=2), progress=False).store
    config = StudyConfig(feature_sets=("prototype", "class_prob"), predict=False)
    out = associate_flow(
        str(store.path), str(cohort.mimic_hosp), trained.out["model_uri"], None, config, tracking_uri=trained.uri
    )
    run = tracking.describe(str(out["run_id"]), trained.uri)
    assert run["tags"]["train_run_id"] == trained.out["run_id"]  # lineage: which training made these prototypes
    assert run["tags"]["model_version"] == str(trained.out["model_version"])
    c = tracking.client(trained.uri)
    results = pd.read_parquet(
        c.download_artifacts(str(out["run_id"]), "association/results.parquet", str(trained.root))
    )
    model = tracking.load_model(trained.out["model_uri"], trained.uri)
    proto = results[results["feature_set"] == "prototype"]
    # the others carry a misleading class name; a merged near-duplicate is its keeper's case, tested once
    own = [p for p in model.provenance if p["own_class_source"] and p["merged_into"] == p["prototype"]]
    assert proto["feature_id"].nunique() == len(own) and 0 < len(own) < model.n_prototypes
    # a top hit links to its prototype's gallery image, which exists in the training's gallery run
    gallery = set(tracking.describe(str(proto["gallery_run_id"].iloc[0]), trained.uri)["artifacts"])
    top = proto.sort_values("p_value").head(5)
    assert set(top["gallery_image"]) <= gallery
    probs = results[results["feature_set"] == "class_prob"]
    untested = pd.read_csv(
        c.download_artifacts(str(out["run_id"]), "association/phecodes_untested.csv", str(trained.root)),
        dtype=str,
        keep_default_na=False,
    )
    same = dict(zip(untested["phecode"], untested["same_cases_as"], strict=True))
    for dx in PLANTED_DX:
        code = same.get(dx.phecode) or dx.phecode  # tested at the most specific code with the same cases
        hit = probs[(probs["phecode"] == code) & (probs["prototype_class"] == dx.pattern)].iloc[0]
        assert hit["significant_bonf"] and hit["beta"] > 0, (dx.name, hit["p_value"])
    # the study option for ECGs the model is unsure about: flag counts them, drop leaves their admissions out
    from ecgproto.phenotype.study import PhenotypeStudy, study_report

    flagged = PhenotypeStudy(config.model_copy(update={"uncertain_ecgs": "flag", "uncertainty_percentile": 50.0}))
    flag = flagged.run(store, cohort.mimic_hosp, model, progress=False)
    dropped = PhenotypeStudy(config.model_copy(update={"uncertain_ecgs": "drop", "uncertainty_percentile": 50.0}))
    drop = dropped.run(store, cohort.mimic_hosp, model, progress=False)
    assert flag.uncertain is not None and flag.uncertain >= 10 and drop.uncertain == flag.uncertain
    assert drop.cohort.n == flag.cohort.n - flag.uncertain  # every flagged admission left out, nothing else
    step = drop.cohort.flow[drop.cohort.flow["step"].str.startswith("ECG not more uncertain than 50%")]
    assert len(step) == 1 and int(step["n"].iloc[0]) == drop.cohort.n
    assert study_report(flag, flagged.config).metrics["uncertain_ecgs_flagged"] == flag.uncertain
    assert study_report(drop, dropped.config).metrics["uncertain_ecgs_dropped"] == flag.uncertain
    # from an activation store (`ecgproto score`): the uncertainty is stored with the scores, no model needed
    from ecgproto.phenotype.features import prototype_table
    from ecgproto.scoring import score_store

    acts = score_store(store, model, trained.root / "activations", prototype_table(model))
    stored = flagged.run(store, cohort.mimic_hosp, None, progress=False, activations=acts)
    assert stored.uncertain is not None and abs(stored.uncertain - flag.uncertain) <= 2  # batches differ: ties


def test_same_seed_gives_identical_training_on_cpu(demo_root: Path, tmp_path: Path) -> None:
    store = _store(demo_root, tmp_path)
    runs = []
    for i in range(2):
        ctx = stages.TrainContext.open(store.path, _one_branch_config(), tmp_path / f"work{i}")
        result = stages.train_joint(ctx, "rhythm_1d")
        runs.append((result.history, torch.load(ctx.path("rhythm_1d", "joint.pt"))))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_a_stage_killed_mid_training_resumes_to_the_same_result(demo_root: Path, tmp_path: Path) -> None:
    store = _store(demo_root, tmp_path)
    straight = stages.TrainContext.open(store.path, _one_branch_config(), tmp_path / "straight")
    expected = stages.train_joint(straight, "rhythm_1d")

    class Killed(Exception):
        pass

    def kill_after_first_epoch(epoch: int, metrics: dict) -> None:
        if epoch == 0:
            raise Killed  # the process dies right after the epoch-0 checkpoint was written

    broken = stages.TrainContext.open(store.path, _one_branch_config(), tmp_path / "broken")
    with pytest.raises(Killed):
        stages.train_joint(broken, "rhythm_1d", kill_after_first_epoch)
    resumed = stages.train_joint(broken, "rhythm_1d")
    assert resumed.resumed_from == 1
    assert resumed.history == expected.history
    a, b = torch.load(straight.path("rhythm_1d", "joint.pt")), torch.load(broken.path("rhythm_1d", "joint.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_prototypes_carry_their_purity_consistency_stability_and_near_duplicates(trained: SimpleNamespace) -> None:
    """The planted inferior MI (Q waves in II, III, aVF in every beat) yields a prototype whose nearest training ECGs
    are IMI ECGs and whose match survives ECG-level noise; the same prototype pushed onto a normal ECG's beat has a
    low purity."""
    from ecgproto.train.data import SplitData
    from ecgproto.train.quality import prototype_quality

    model = persist.load(Path(trained.out["work_dir"]) / "model.pt")
    prov = pd.DataFrame(model.provenance)
    distinct = prov[prov["merged_into"] == prov["prototype"]]
    for column in ("purity", "consistency", "stability"):
        assert distinct[column].between(-1, 1).all() and distinct[column].notna().all(), column
    # distinct cases: no near-duplicate is left in any branch; a merged prototype names a distinct one of its branch
    assert not distinct["duplicate"].any()
    assert len(distinct) < len(prov)  # the demo's whole-record branches collapse some of a class's prototypes
    merged = prov[prov["merged_into"] != prov["prototype"]]
    keepers = prov.set_index("prototype").loc[merged["merged_into"]]
    assert (keepers["branch"].to_numpy() == merged["branch"].to_numpy()).all()
    assert (keepers["merged_into"].to_numpy() == keepers.index.to_numpy()).all()
    imi = prov[(prov["class"] == "IMI") & (prov["branch"] == "morphology_2d_local")].sort_values("purity")
    best = imi.iloc[-1]
    assert best["purity"] >= 0.8 and best["stability"] >= 0.9, imi[["leads", "purity", "stability"]]
    # the same prototype, projected onto a beat of an ECG without IMI instead
    branch = model.branches["morphology_2d_local"]
    train = SplitData(trained.store, "train")
    j = int(best["index_in_branch"])
    labels = load_label_set()
    normal = int(np.flatnonzero(train.labels[:, labels.codes.index("NORM")] > 0)[0])
    x = torch.as_tensor(train.signals(np.array([normal])))
    beats = torch.as_tensor(train.beats(np.array([normal])))
    with torch.no_grad():
        latent = branch.latent_windows(x, beats)[0, int(branch.prototypes.group[j])]
        branch.prototypes.prototypes[j] = latent
    moved = prototype_quality(branch, train, labels.branch_indices("morphology_2d_local"), model.fs)
    assert moved.loc[j, "purity"] <= 0.3 < best["purity"]
    # shown where a reviewer looks: the gallery title, the fusion run's overview, the training run's summaries
    c = tracking.client(trained.uri)
    parent = c.get_run(trained.out["run_id"])
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    fusion = next(r for r in children if r.data.tags["mlflow.runName"] == "fusion")
    artifacts = set(tracking.describe(fusion.info.run_id, trained.uri)["artifacts"])
    assert {"prototype_quality.png", "prototype_quality.csv"} <= artifacts
    assert 0 < fusion.data.metrics["quality.morphology_2d_local.purity_mean"] <= 1
    # the training run leads with its headline: the test-fold figures, not the per-branch quality rows
    assert "test.macro_auroc" in parent.data.metrics and not any(k.startswith("quality.") for k in parent.data.metrics)
    assert parent.data.tags["mlflow.note.content"].startswith("**Test fold (fold 10)**")
    contexts = {i.tags[0].value for i in c.get_run(parent.info.run_id).inputs.dataset_inputs}
    assert contexts == {"training", "validation", "test"}
    _, figure = next(iter(prototype_gallery(model)))
    assert "purity" in figure.axes[0].get_title(loc="left")


@pytest.mark.slow
def test_every_prediction_has_a_calibrated_probability_an_uncertainty_and_a_match_range(
    trained: SimpleNamespace,
) -> None:
    from ecgproto.explain import explain

    model = persist.load(Path(trained.out["work_dir"]) / "model.pt")
    assert model.fusion_heads is not None and torch.isfinite(model.uncertainty_quantiles).all()
    m = trained.store.manifest
    val = m[m["split"] == "val"]["row"].to_numpy()
    x = torch.as_tensor(np.asarray(trained.store.signals[np.sort(val)]))
    beats = torch.as_tensor(np.asarray(trained.store.beats[np.sort(val)], dtype=np.int64))
    with torch.no_grad():
        u = model.uncertainty(model.similarities(x, beats))
    assert ((u["low"] <= u["probability"] + 1e-6) & (u["probability"] <= u["high"] + 1e-6)).all()
    assert float(u["spread"].max()) > 0  # the bootstrap heads do disagree somewhere
    assert 35 <= float(u["percentile"].mean()) <= 65  # the validation ECGs are the reference: spread around 50
    result = explain(model, np.asarray(trained.store.signals[val[0]]))
    for label in result["labels"]:
        lo, hi = label["probability_range"]
        assert lo - 1e-6 <= label["calibrated_probability"] <= hi + 1e-6
        for e in label["evidence"]:
            low, high = e["similarity_under_noise"]
            assert low - 1e-5 <= e["similarity"] <= high + 1e-5
    assert 0 <= result["uncertainty"]["validation_percentile"] <= 100
    # the evaluate run: reliability and coverage figures, selective prediction by three scores
    run = tracking.describe(trained.out["evaluate_run_id"], trained.uri)
    assert {"evaluation/reliability.png", "evaluation/coverage.png", "evaluation/selective.csv"} <= set(
        run["artifacts"]
    )
    metrics = trained.out["metrics"]
    assert metrics["fused.mean_ece_scaled"] <= metrics["fused.mean_ece"] + 0.01
    kept = metrics["selective.total.macro_auroc_coverage_80"]
    assert kept >= metrics["selective.total.macro_auroc_coverage_100"] - 0.005
