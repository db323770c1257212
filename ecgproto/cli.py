"""`ecgproto` command line: parse options, call a flow or library function, print where to look."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ecgproto.settings import (
    DEFAULT_MODEL_URI,
    DEFAULT_UI_PORT,
    MODEL_NAME,
    configure_environment,
    demo_dir,
    store_root,
)

if TYPE_CHECKING:  # imported where used: `ecgproto --help` stays fast
    from ecgproto.data.ingest import IngestConfig


def _ranged(kind: type, lo: float | None = None, hi: float | None = None) -> Callable[[str], float]:
    """An argparse type: a number of `kind` in [lo, hi], checked before any work starts (a bad value is one line
    naming the option and the range, exit code 2)."""
    what = "an integer" if kind is int else "a number"
    if lo is not None and hi is not None:
        rule = f"{what} from {lo:g} to {hi:g}"
    elif lo is not None:
        rule = f"{what} >= {lo:g}"
    else:
        rule = f"{what} <= {hi:g}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}; give {rule}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi) or value != value:  # NaN too
            raise argparse.ArgumentTypeError(f"{text} is out of range; give {rule}")
        return value

    parse.__name__ = rule  # what argparse names in its own messages
    return parse


def _device(text: str) -> str:
    """An argparse type for --device: auto, cpu, mps, cuda or cuda:N, and cuda only where this torch sees a GPU."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; give auto, cpu, cuda, cuda:N or mps")
    if text.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
            raise argparse.ArgumentTypeError(f"{text}: {why}; use --device cpu (or auto)")
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} GPU(s)")
    return text


def _device_option(q: argparse.ArgumentParser, default: str = "auto", what: str = "") -> None:
    q.add_argument("--device", type=_device, default=default, help=f"auto | cpu | cuda[:N] | mps{what}")


class _Parser(argparse.ArgumentParser):
    """Usage errors (an unknown option, a value out of range) as the one line every ecgproto error is, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _demo_config(args: argparse.Namespace):  # noqa: ANN202
    from ecgproto.data.demo.generate import DemoConfig

    kw = {"seed": args.seed, "n_ptbxl": args.n_ptbxl, "n_mimic_subjects": args.mimic_subjects, "workers": args.workers}
    if args.small:
        kw.update(n_ptbxl=300, n_mimic_subjects=60, n_hr=10)
    return DemoConfig(**{k: v for k, v in kw.items() if v is not None})


def _ingest_config(args: argparse.Namespace):  # noqa: ANN202
    from ecgproto.data.ingest import IngestConfig
    from ecgproto.data.preprocess import PreprocessConfig

    return IngestConfig(
        layout=args.layout,
        workers=args.workers or 0,
        min_likelihood=args.min_likelihood,
        allow_outside_root=getattr(args, "allow_outside_root", False),
        labels_csv=str(Path(args.labels).resolve()) if getattr(args, "labels", None) else None,
        preprocess=PreprocessConfig(fs=args.fs, allow_resample=not args.no_resample, dtype=args.dtype),
    )


def _store_of(source: Path, config: IngestConfig, store_root: str) -> Path:
    """`source` itself when it is a store; else the dataset folder's store, ingested first (a cache hit if done
    before; a wrong folder is one line before any flow starts)."""
    if (source / "store.json").exists():
        return source
    from ecgproto.data.layouts import check_root
    from ecgproto.flows.ingest import ingest_flow

    check_root(source, config.layout)
    return Path(ingest_flow(str(source), config, store_root)["store"])


def _model_option(q: argparse.ArgumentParser, more: str = "") -> None:
    q.add_argument(
        "--model",
        default=DEFAULT_MODEL_URI,
        help=f"MLflow model URI: models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/model{more}",
    )


def _config_options(q: argparse.ArgumentParser) -> None:
    from ecgproto.train.config import PRESETS

    q.add_argument(
        "--config",
        choices=("auto", *PRESETS),
        default="auto",
        help="; ".join(f"{k}: {v}" for k, v in PRESETS.items()) + "; auto: small (the one with full-PTB-XL "
        "figures), on any device, and says why",
    )
    q.add_argument("--small", action="store_true", help="the same as --config small")


def _ingest_options(
    group: argparse.ArgumentParser | argparse._ArgumentGroup,
    layouts: tuple[str, ...] = ("auto", "ptbxl", "mimic_ecg", "challenge", "wfdb"),
) -> None:
    """The ingest settings, for `ingest` and for the commands that ingest a dataset folder first."""
    group.add_argument("--layout", choices=layouts, default=layouts[0], help="dataset layout")
    group.add_argument("--fs", type=_ranged(int, 50, 2000), default=100, help="model sampling rate in Hz")
    group.add_argument(
        "--no-resample", action="store_true", help="quarantine records at other rates instead of resampling"
    )
    group.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="stored sample type")
    group.add_argument(
        "--min-likelihood", type=_ranged(float, 0, 100), default=0.0, help="scp code likelihood that counts as positive"
    )
    group.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="read records whose index path leads outside the dataset folder (default: quarantined)",
    )
    group.add_argument("--workers", type=_ranged(int, 1, 512), help="processes (default: one per core)")
    if "wfdb" in layouts:
        group.add_argument(
            "--labels",
            metavar="CSV",
            help="a WFDB folder's labels: columns record (path below the folder, no extension) and scp_codes "
            "(e.g. 'AFIB,CRBBB'); records it does not list are quarantined as unlabelled",
        )


def _train_config(args: argparse.Namespace):  # noqa: ANN202
    """`--config`: small (the CPU configuration) or reference (ProtoECGNet's sizes, for a GPU); auto picks by
    the device and says so, since the reference configuration takes days on a few CPU cores."""
    from ecgproto.train.config import TrainConfig, resolve_preset
    from ecgproto.train.stages import resolve_device

    choice, why = resolve_preset("small" if args.small else args.config, resolve_device(args.device).type == "cuda")
    if args.config == "auto" and not args.small:
        print(f"ecgproto: training the {choice} configuration ({why}; choose with --config)", file=sys.stderr)
    return TrainConfig.preset(choice)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from ecgproto.data.demo.faults import plant_faults
    from ecgproto.data.demo.generate import generate_demo

    data = generate_demo(Path(args.out), _demo_config(args))
    print(f"demo data written in {data.seconds:.1f} s under {data.root}")
    print(f"  PTB-XL layout:      {data.ptbxl}")
    if data.mimic_ecg:
        print(f"  MIMIC-IV-ECG:       {data.mimic_ecg}\n  MIMIC-IV hosp:      {data.mimic_hosp}")
    print(f"  ground truth:       {data.ground_truth}")
    if args.faults:
        planted = plant_faults(data.ptbxl)
        print(f"  planted {len(planted)} bad records (ecg_id -> expected quarantine reason): {planted}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from ecgproto import tracking
    from ecgproto.data.layouts import check_root
    from ecgproto.flows.ingest import ingest_flow

    config = _ingest_config(args)
    check_root(Path(args.root), config.layout)  # a typo in the path is one line, before a flow run starts
    flow = ingest_flow
    if args.dask:
        from ecgproto.flows.scale import runner

        flow = ingest_flow.with_options(task_runner=runner(args.dask))
    out = flow(str(Path(args.root).resolve()), config, args.store, sharded=bool(args.dask))
    print(f"store: {out['store']}\nMLflow run: {tracking.run_url(out['run_id'])}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from ecgproto import tracking
    from ecgproto.flows.score import score_flow

    flow = score_flow
    if args.dask:
        from ecgproto.flows.scale import runner

        flow = score_flow.with_options(task_runner=runner(args.dask))
    store = Path(args.store).resolve()
    out = flow(
        str(store),
        args.model,
        args.out or str(store.parent),
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        device=args.device,
        loader_workers=args.loader_workers,
        sharded=bool(args.dask),
        processes=args.processes,
    )
    print(f"activations: {out['activations']}\nMLflow run: {tracking.run_url(str(out['run_id']))}")
    from ecgproto.scoring import ActivationStore

    if "calibrated" in ActivationStore.open(out["activations"]).kinds:
        print("stored per ECG: prototype similarities, probabilities (served and calibrated), uncertainty")
    else:
        print("stored per ECG: prototype similarities, probabilities (this model carries no calibration)")
    print(f"use them in a study: ecgproto associate {args.store} --hosp HOSP --activations {out['activations']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ecgproto import tracking
    from ecgproto.flows.pipeline import pipeline_flow

    out = pipeline_flow(demo=True, demo_config=_demo_config(args), store_root=args.store, train_model=not args.no_train)
    print("\nThe demo pipeline finished.")
    for key, value in out.items():
        print(f"  {key:22s} {value}")
    print("\nOpen the MLflow UI:  .venv/bin/ecgproto ui   (or: make ui), then the pipeline run:")
    print(f"  {tracking.run_url(out['parent_run_id'])}")
    if "model_uri" in out:
        print(
            "  (its description: the result, and links to what to open next; training: the 'train' child run,\n"
            "   its branch/stage runs, the prototype gallery under 'fusion', evaluation/summary.md and\n"
            "   explanations/ under 'evaluate')"
        )
    if "associate_run_id" in out:
        print(
            "  (association: the 'associate' child run: association/results.parquet|.tsv, top_hits, comparison/,\n"
            "   figures/manhattan_*.png, heatmap, ROC curves; top hits link to the gallery images under 'fusion')"
        )
        example = Path(demo_dir()) / "ptbxl" / "records100" / "00000" / "00001_lr"
        print(f"\nExplain one ECG with the registered model:\n  .venv/bin/ecgproto explain {example}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ecgproto import tracking
    from ecgproto.flows.train import train_flow

    store = _store_of(Path(args.source).resolve(), _ingest_config(args), args.store)
    config = _train_config(args)
    updates = {
        "device": args.device,
        "seed": args.seed if args.seed is not None else config.seed,
        "world_size": args.world_size,
    }
    config = config.model_copy(update=updates)
    if args.epochs is not None:
        config.joint.epochs = args.epochs
    if args.no_baseline:
        config = config.without_baseline()
    out = train_flow(str(store), config, register_as=args.register or None)
    print(f"\nmodel: {out['model_uri']} (registered version {out['model_version']})")
    print(f"MLflow run: {tracking.run_url(out['run_id'])}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ecgproto import tracking
    from ecgproto.flows.evaluate import evaluate_flow

    store = _store_of(Path(args.source).resolve(), _ingest_config(args), args.store)
    out = evaluate_flow(str(store), args.model, device=args.device, bootstrap=args.bootstrap)
    print(f"{out['summary']}\nMLflow run: {tracking.run_url(out['run_id'])}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    import json

    from ecgproto import tracking
    from ecgproto.explain import explain, explanation_figure, load_record_for_model

    model = tracking.load_model(args.model)
    signal = load_record_for_model(args.record)
    try:
        result = explain(model, signal, top_k=args.top_k, codes=args.label or None)
    except ValueError as exc:
        print(f"ecgproto: explain: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.record).name
    (out / f"{name}.explanation.json").write_text(json.dumps(result, indent=2))
    explanation_figure(model, signal, result, title=name).savefig(out / f"{name}.explanation.png", dpi=80)
    for lab in result["labels"]:
        lo, hi = lab["probability_range"]
        print(
            f"{lab['code']:6s} p={lab['probability']:.2f} (calibrated {lab['calibrated_probability']:.2f}, "
            f"heads {lo:.2f}-{hi:.2f})  "
            + ", ".join(
                f"{e['name']} {e['contribution']:+.2f} (sim {e['similarity']:.2f}, "
                f"{e['similarity_under_noise'][0]:.2f}-{e['similarity_under_noise'][1]:.2f} under noise)"
                for e in lab["evidence"]
            )
        )
    u = result["uncertainty"]
    where = (
        f", more uncertain than {u['validation_percentile']:.0f}% of the validation ECGs"
        if u["validation_percentile"] == u["validation_percentile"]
        else ""
    )
    print(f"uncertainty: {u['total_bits']:.3f} bits per label ({u['epistemic_bits']:.3f} from the heads){where}")
    print(f"written: {out / (name + '.explanation.png')} and .json")
    return 0


def cmd_associate(args: argparse.Namespace) -> int:
    from ecgproto import tracking
    from ecgproto.data.ingest import IngestConfig
    from ecgproto.flows.associate import associate_flow
    from ecgproto.phenotype.cohort import CohortConfig
    from ecgproto.phenotype.study import StudyConfig

    source = Path(args.cohort).resolve()
    mm = Path(args.machine_measurements) if args.machine_measurements else None
    cohort = IngestConfig(layout="mimic_ecg", workers=args.workers or 0)  # the model's rate and sample type
    store = _store_of(source, cohort, args.store)
    if store != source:  # a MIMIC-IV-ECG folder, ingested: its machine measurements sit beside its records
        mm = mm or (source / "machine_measurements.csv" if (source / "machine_measurements.csv").exists() else None)
    config = StudyConfig(
        phecode_version=args.phecodes,
        device=args.device,
        min_cases=args.min_cases,
        min_controls=args.min_controls,
        cohort=CohortConfig(admissions=args.admissions, strict=args.strict, window_before_days=args.window_days),
        uncertain_ecgs=args.uncertain_ecgs,
        uncertainty_percentile=args.uncertainty_percentile,
    )
    if args.no_nlp:
        config.feature_sets = tuple(f for f in config.feature_sets if f != "nlp_concept")
    out = associate_flow(
        str(store),
        str(Path(args.hosp).resolve()),
        args.model or None,
        str(mm) if mm else None,
        config,
        activations=str(Path(args.activations).resolve()) if args.activations else None,
    )
    print(out["summary"])
    print(
        f"MLflow run: {tracking.run_url(str(out['run_id']))}  ("
        + (
            "table: association/results.parquet, figures under figures/)"
            if out["tested"]
            else "cohort_flow.csv, phecodes_untested.csv, nothing_tested.json)"
        )
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ecgproto import tracking
    from ecgproto.flows.pipeline import pipeline_flow

    config = _train_config(args).model_copy(update={"device": args.device})
    if args.epochs is not None:
        config.joint.epochs = args.epochs
    if (args.mimic_ecg is None) != (args.hosp is None):
        print("ecgproto run: give both --mimic-ecg and --hosp for the association stage, or neither", file=sys.stderr)
        return 2
    out = pipeline_flow(
        train_root=str(Path(args.ptbxl).resolve()),
        cohort_root=str(Path(args.mimic_ecg).resolve()) if args.mimic_ecg else None,
        hosp_root=str(Path(args.hosp).resolve()) if args.hosp else None,
        store_root=args.store,
        train_config=config,
    )
    for key, value in out.items():
        print(f"  {key:22s} {value}")
    print(f"MLflow run: {tracking.run_url(out['parent_run_id'])}")
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from ecgproto.flows.retrain import RetrainConfig, retrain_flow

    RetrainConfig.load(args.config)  # a bad config fails here, in one line, before any flow starts
    out = retrain_flow(config_path=str(Path(args.config).resolve()))
    print(f"model version {out['version']} is now '{out['alias']}': {out['reason']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from prefect import serve

    from ecgproto.flows.retrain import RetrainConfig, deployment

    cfg = RetrainConfig.load(args.config)
    print(
        f"serving 'retrain/ecgproto-retrain' on cron '{cfg.schedule.cron}' ({cfg.schedule.timezone}); Ctrl-C to stop.\n"
        "Scheduled runs need a Prefect server: `prefect server start` and PREFECT_API_URL=http://127.0.0.1:4200/api."
    )
    serve(deployment(args.config))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from ecgproto import tracking

    command = tracking.ui_command(port=args.port)
    print(f"serving the MLflow UI at {tracking.experiment_url(f'http://127.0.0.1:{args.port}')}  (Ctrl-C to stop)")
    if args.port != DEFAULT_UI_PORT and "ECGPROTO_UI_URL" not in os.environ:
        print(
            f"  set ECGPROTO_UI_URL=http://127.0.0.1:{args.port} so the run links other commands print point here",
            file=sys.stderr,
        )
    os.execvp(command[0], command)
    return 0


RETRAIN_EXAMPLE = """example retrain.toml (every key is checked; an unknown one is an error):

    [data]
    ptbxl = "/data/physionet.org/files/ptb-xl/1.0.3"
    [train]
    size = "auto"               # or small | large | reference (see ecgproto train --help)
    device = "cuda"             # auto | cpu | cuda[:N] | mps
    epochs = 30                 # optional upper bound on joint-stage epochs
    [registry]
    name = "ecgproto-protoecgnet"
    tolerance = 0.005           # promote unless worse than the champion by more (AUROC)
    [schedule]
    cron = "0 3 * * 1"          # Mondays 03:00 (for `ecgproto serve`)
    timezone = "UTC"
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help (`(default: ...)`; not for flags and options without one), epilogs as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or isinstance(action, argparse._StoreTrueAction):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ecgproto",
        description=(
            "Interpretable prototype models and digital phenotypes for 12-lead ECGs. "
            "Every stage runs as a Prefect flow and logs an MLflow run (see `ecgproto ui`)."
        ),
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback (and Prefect's error logs) when a command fails; also ECGPROTO_DEBUG=1",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def demo_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--seed", type=_ranged(int, 0, 2**32 - 1), help="random seed (default 20261123)")
        q.add_argument("--n-ptbxl", type=_ranged(int, 50, 10_000_000), help="PTB-XL-layout records (default 2000)")
        q.add_argument(
            "--mimic-subjects",
            type=_ranged(int, 0, 10_000_000),
            help="MIMIC-layout subjects, ~2.4 ECGs each (default 1500; 0: none)",
        )
        q.add_argument("--small", action="store_true", help="a small demo (300 records, 60 subjects) for quick checks")
        q.add_argument("--workers", type=_ranged(int, 1, 512), help="processes (default: one per core)")

    q = sub.add_parser("demo-data", help="write the synthetic demo datasets (PTB-XL and MIMIC layouts)")
    q.add_argument("--out", default=str(demo_dir()), help="output folder")
    q.add_argument("--faults", action="store_true", help="also corrupt a few records in every way ingest must survive")
    demo_options(q)
    q.set_defaults(func=cmd_demo_data)

    q = sub.add_parser("ingest", help="ingest a PTB-XL or MIMIC-IV-ECG folder into the cached array store")
    q.add_argument("root", help="the dataset folder as downloaded (holds ptbxl_database.csv or record_list.csv)")
    q.add_argument("--store", default=str(store_root()), help="store folder")
    _ingest_options(q)
    q.add_argument(
        "--dask",
        metavar="SPEC",
        help="shard the records over Dask: 'local', 'local:N' (N worker "
        "processes here) or a scheduler address tcp://HOST:8786 whose workers see ROOT and --store "
        "(needs the scale extra)",
    )
    q.set_defaults(func=cmd_ingest)

    q = sub.add_parser(
        "score",
        help="score every ECG of a store with a registered model into float16 activation "
        "shards (prototype similarities, label probabilities); optionally on a Dask cluster",
    )
    q.add_argument("store", help="a store folder from `ecgproto ingest` (e.g. a MIMIC-IV-ECG cohort)")
    _model_option(q)
    q.add_argument("--out", help="folder for the activation store (default: the store folder's parent)")
    q.add_argument(
        "--shard-size", type=_ranged(int, 1), default=65_536, help="ECGs per shard: one task, one resume checkpoint"
    )
    q.add_argument("--batch-size", type=_ranged(int, 1, 65_536), default=256, help="ECGs per forward pass")
    _device_option(q, what=" (bf16 autocast on CUDA)")
    q.add_argument(
        "--loader-workers", type=_ranged(int, 0, 64), default=0, help="read-ahead processes per scoring task"
    )
    q.add_argument(
        "--processes",
        type=_ranged(int, 0, 256),
        default=0,
        help="on a CPU without --dask: shards scored at once, one single-threaded process each (0: one per core; "
        "1: this process)",
    )
    q.add_argument(
        "--dask",
        metavar="SPEC",
        help="spread the shards: 'local', 'local:N' or tcp://HOST:8786 "
        "(workers must see the store and --out; needs the scale extra)",
    )
    q.set_defaults(func=cmd_score)

    q = sub.add_parser("demo", help="generate the demo data and run the whole pipeline on it")
    q.add_argument("--store", default=str(store_root()), help="store folder")
    q.add_argument("--no-train", action="store_true", help="stop after ingest (skip training and registration)")
    demo_options(q)
    q.set_defaults(func=cmd_demo)

    q = sub.add_parser("train", help="train the prototype model (and the baseline) from a store or a PTB-XL folder")
    q.add_argument("source", help="a store folder from `ecgproto ingest`, or a PTB-XL folder (ingested first)")
    _config_options(q)
    q.add_argument(
        "--epochs",
        type=_ranged(int, 1, 10_000),
        help="upper bound on joint-stage epochs per branch (early stopping may end sooner)",
    )
    _device_option(q, what=" (bf16 autocast on CUDA)")
    q.add_argument("--seed", type=_ranged(int, 0, 2**32 - 1), help="random seed (default 20261123)")
    q.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the black-box 1D ResNet baseline (and with it its scores as the branches' soft targets: the "
        "model then trains on the labels alone)",
    )
    q.add_argument(
        "--world-size",
        type=_ranged(int, 1, 1024),
        default=1,
        help="DDP ranks for the joint stages and the baseline "
        "(torchrun on this machine: one GPU each, or gloo on CPU); 1 = one process",
    )
    q.add_argument("--register", default=MODEL_NAME, help="MLflow registered model name ('' to skip)")
    q.add_argument("--store", default=str(store_root()), help="store folder when SOURCE is a dataset")
    _ingest_options(q.add_argument_group("ingest, when SOURCE is a PTB-XL folder"), layouts=("ptbxl",))
    q.set_defaults(func=cmd_train)

    q = sub.add_parser(
        "evaluate",
        help="external validation: a trained model on another labelled set (a PhysioNet Challenge folder, "
        "another PTB-XL): per-label AUROC, AUPRC, calibration beside its own test fold",
    )
    q.add_argument("source", help="a labelled dataset folder (ingested first) or a store folder from `ecgproto ingest`")
    _model_option(q)
    _device_option(q)
    q.add_argument(
        "--bootstrap", type=_ranged(int, 10, 100_000), default=200, help="bootstrap resamples for the 95%% CIs"
    )
    q.add_argument("--store", default=str(store_root()), help="store folder when SOURCE is a dataset")
    _ingest_options(q.add_argument_group("ingest, when SOURCE is a dataset folder"))
    q.set_defaults(func=cmd_evaluate)

    q = sub.add_parser("explain", help="explain one ECG: predicted labels and the prototypes behind them (PNG + JSON)")
    q.add_argument("record", help="a WFDB record path without extension (e.g. records100/00000/00001_lr)")
    _model_option(q)
    q.add_argument("--top-k", type=_ranged(int, 1, 20), default=3, help="prototypes shown per predicted label")
    q.add_argument(
        "--label",
        action="append",
        metavar="CODE",
        help="explain this SCP label (repeatable), predicted or not; default: the predicted labels",
    )
    q.add_argument("--out", default="explanations", help="output folder")
    q.set_defaults(func=cmd_explain)

    q = sub.add_parser("associate", help="associate a model's prototypes with discharge phecodes in a MIMIC-IV cohort")
    q.add_argument("cohort", help="a MIMIC-IV-ECG folder (holds record_list.csv; ingested first) or its store folder")
    q.add_argument("--hosp", required=True, help="the MIMIC-IV hosp folder (patients, admissions, diagnoses_icd)")
    _model_option(q, "; '' = NLP only")
    q.add_argument(
        "--machine-measurements", help="machine_measurements.csv for NLP concepts (default: in the cohort folder)"
    )
    q.add_argument("--no-nlp", action="store_true", help="skip the NLP concept feature set")
    q.add_argument("--phecodes", choices=["1.2", "X"], default="1.2", help="Phecode 1.2 or PhecodeX")
    q.add_argument(
        "--admissions",
        choices=["first", "all"],
        default="first",
        help="first eligible admission per subject (default) or all admissions (then each subject is one "
        "row: its ECG features averaged, a case if any admission has the phecode)",
    )
    q.add_argument(
        "--min-cases", type=_ranged(int, 1), default=20, help="test a phecode only with this many case subjects"
    )
    q.add_argument("--min-controls", type=_ranged(int, 1), default=20, help="... and this many control subjects")
    q.add_argument("--strict", action="store_true", help="only ECGs inside [admittime, dischtime]")
    q.add_argument(
        "--window-days",
        type=_ranged(float, 0, 3650),
        default=7.0,
        help="an ECG up to this many days before admission counts",
    )
    _device_option(q, "cpu", " (bf16 autocast on CUDA) for scoring the cohort")
    q.add_argument(
        "--uncertain-ecgs",
        choices=["keep", "flag", "drop"],
        default="keep",
        help="ECGs whose prediction the model is unsure about (more uncertain than --uncertainty-percentile of "
        "its validation ECGs): keep them unchecked (default), flag (count them in the run), or drop (leave "
        "their admissions out, a step of the cohort flow)",
    )
    q.add_argument(
        "--uncertainty-percentile",
        type=_ranged(float, 0, 100),
        default=95.0,
        help="the validation-fold percentile of uncertainty above which an ECG counts as uncertain (default 95)",
    )
    q.add_argument(
        "--activations",
        help="an activation store from `ecgproto score` of this model on this cohort "
        "store: used instead of scoring here",
    )
    q.add_argument("--store", default=str(store_root()), help="store folder when COHORT is a dataset")
    q.add_argument(
        "--workers", type=_ranged(int, 1, 512), help="ingest processes when COHORT is a dataset (default: one per core)"
    )
    q.set_defaults(func=cmd_associate)

    q = sub.add_parser(
        "run", help="the whole pipeline on your data: ingest -> train -> evaluate -> register -> associate"
    )
    q.add_argument("--ptbxl", required=True, help="PTB-XL folder (holds ptbxl_database.csv)")
    q.add_argument("--mimic-ecg", help="MIMIC-IV-ECG folder for the association stage (holds record_list.csv)")
    q.add_argument("--hosp", help="MIMIC-IV hosp folder (patients, admissions, diagnoses_icd)")
    _config_options(q)
    q.add_argument("--epochs", type=_ranged(int, 1, 10_000), help="upper bound on joint-stage epochs per branch")
    _device_option(q)
    q.add_argument("--store", default=str(store_root()), help="store folder")
    q.set_defaults(func=cmd_run)

    q = sub.add_parser(
        "retrain",
        help="retrain once from a config file and apply the champion/challenger rule",
        epilog=RETRAIN_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("config", help="retraining config (TOML; see `ecgproto retrain --help`)")
    q.set_defaults(func=cmd_retrain)

    q = sub.add_parser("serve", help="serve scheduled retraining (Prefect deployment on the config's cron)")
    q.add_argument("config", help="retraining config (TOML; see `ecgproto retrain --help`)")
    q.set_defaults(func=cmd_serve)

    q = sub.add_parser("ui", help="serve the MLflow UI for the local tracking store on 127.0.0.1")
    q.add_argument("--port", type=_ranged(int, 1, 65_535), default=DEFAULT_UI_PORT)
    q.set_defaults(func=cmd_ui)
    for parser in (p, *sub.choices.values()):  # --help shows every default; examples keep their layout
        parser.formatter_class = _HelpFormatter
    return p


def main(argv: list[str] | None = None) -> int:
    configure_environment()
    args = build_parser().parse_args(argv)
    from ecgproto import cli_messages

    debug = cli_messages.debug_requested(args.debug)
    if not debug:
        cli_messages.quiet_engine_errors()
    from ecgproto.housekeeping import stop_orphaned_prefect_servers

    for pid in stop_orphaned_prefect_servers(os.environ["PREFECT_HOME"]):
        print(f"ecgproto: stopped a Prefect server (pid {pid}) left running by a killed earlier run", file=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("ecgproto: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  one line for the user; the traceback with --debug
        if debug:
            raise
        code, text = cli_messages.describe(exc)
        print(f"ecgproto: {text}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
