"""Scheduled retraining with champion/challenger promotion.

`retrain_flow` re-ingests the training data (a cache hit when unchanged), trains and registers a new
model version, scores it and the current `champion` on the same test fold, and moves the `champion`
alias to the new version only if it is not worse by more than the configured tolerance; otherwise
the new version becomes `challenger` and the run says why. `ecgproto serve retrain.toml` serves the
flow as a Prefect deployment on the config's cron schedule.

Example config (TOML):

    [data]
    ptbxl = "/data/physionet.org/files/ptb-xl/1.0.3"
    [train]
    size = "auto"               # or small | large | reference
    device = "cuda"
    [registry]
    name = "ecgproto-protoecgnet"
    tolerance = 0.005           # negative: demand an improvement of at least that much
    [schedule]
    cron = "0 3 * * 1"          # Mondays 03:00
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.runtime import flow_run
from prefect.schedules import Cron
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ecgproto import tracking
from ecgproto.data.ingest import IngestConfig
from ecgproto.data.store import ArrayStore
from ecgproto.errors import ConfigError
from ecgproto.evaluation.promotion import PromotionDecision, decide, test_fold_auroc
from ecgproto.flows.ingest import ingest_flow
from ecgproto.flows.train import REGISTERED_NAME, train_flow
from ecgproto.model.persist import ModelFileError
from ecgproto.progress import stage_line
from ecgproto.report import StageReport
from ecgproto.train.config import PRESETS, TrainConfig, resolve_preset
from ecgproto.train.stages import resolve_device

CHAMPION, CHALLENGER = "champion", "challenger"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silent default


class DataSection(_Section):
    ptbxl: str = Field(description="PTB-XL-layout folder to (re)train on")
    store_root: str | None = None
    workers: int = Field(0, ge=0)


class TrainSection(_Section):
    size: str = Field("auto", description="a preset of ecgproto.train.config.PRESETS; auto: resolve_preset here")
    epochs: int | None = Field(None, ge=1, description="upper bound on joint-stage epochs per branch")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto | cpu | cuda[:N] | mps")
    seed: int | None = None
    baseline: bool = True
    work_root: str | None = None
    bootstrap: int | None = Field(None, ge=10)

    @field_validator("size")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value != "auto" and value not in PRESETS:
            raise ValueError(f"unknown configuration {value!r}; choose auto or one of {', '.join(PRESETS)}")
        return value

    def config(self) -> TrainConfig:
        name, _ = resolve_preset(self.size, resolve_device(self.device).type == "cuda")
        c = TrainConfig.preset(name)
        c = c.model_copy(
            update={
                "device": self.device,
                **({"seed": self.seed} if self.seed is not None else {}),
                **({"bootstrap": self.bootstrap} if self.bootstrap is not None else {}),
            }
        )
        if self.epochs is not None:
            c.joint.epochs = self.epochs
            c.baseline.stage.epochs = self.epochs
        return c if self.baseline else c.without_baseline()


class RegistrySection(_Section):
    name: str = Field(REGISTERED_NAME, min_length=1)
    tolerance: float = Field(
        0.005,
        ge=-1.0,
        le=1.0,
        allow_inf_nan=False,
        description="promote unless worse than the champion by more than this (AUROC)",
    )


class ScheduleSection(_Section):
    cron: str = "0 3 * * 1"
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=value)  # the parser `ecgproto serve` will use
        except ValidationError as exc:
            raise ValueError(
                f"{value!r} is not a cron expression (minute hour day month weekday, e.g. '0 3 * * 1')"
            ) from exc
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(value)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{value!r} is not a time zone name (e.g. 'UTC', 'Europe/Berlin')") from exc
        return value


class RetrainConfig(_Section):
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    tracking_uri: str | None = None

    @classmethod
    def load(cls, path: str | Path) -> RetrainConfig:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: retraining config not found - write one (see `ecgproto retrain --help`)")
        try:
            return cls.model_validate(tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc}) - fix that line") from exc
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: " + ("unknown key" if e["type"] == "extra_forbidden" else e["msg"])
                for e in exc.errors()[:5]
            )
            raise ConfigError(f"{path}: {problems} - see `ecgproto retrain --help`") from exc


@task(name="compare-and-promote")
def compare_and_promote(
    run_id: str, store: str, name: str, version: str, tolerance: float, uri: str | None
) -> dict[str, Any]:
    """Score the new version and the champion on the same test fold; move the alias accordingly."""
    stage_line(f"promote: version {version} and the champion of {name}, both scored on the same test fold")
    data = ArrayStore.open(store)
    challenger = test_fold_auroc(tracking.load_model(f"models:/{name}/{version}", uri), data)
    champion_version = tracking.alias_version(name, CHAMPION, uri)
    champion = None
    if champion_version == version:
        # Unchanged data and config: training was a cache hit and registered nothing new.
        decision = PromotionDecision(
            True,
            f"version {version} is already the champion (same data and config: nothing retrained)",
            challenger,
            challenger,
            tolerance,
        )
        alias = CHAMPION
    else:
        unreadable = None
        if champion_version is not None:
            try:
                champion = test_fold_auroc(tracking.load_model(f"models:/{name}@{CHAMPION}", uri), data)
            except ModelFileError as exc:  # saved by an older ecgproto (a pickle): never loaded, so not comparable
                unreadable = str(exc)
        decision = decide(challenger, champion, tolerance)
        if unreadable:
            decision = PromotionDecision(
                True,
                f"the champion (version {champion_version}) cannot be loaded safely "
                f"(saved by an older ecgproto); replaced: {unreadable}",
                challenger,
                None,
                tolerance,
            )
        alias = CHAMPION if decision.promote else CHALLENGER
        tracking.set_alias(name, alias, version, uri, tags={"promotion": alias, "promotion_reason": decision.reason})
        tracking.describe_model_version(
            name, version, f"Promotion: **{alias}**, because {decision.reason}.", uri, append=True
        )
    report = StageReport(
        metrics={"challenger_macro_auroc": challenger, **({"champion_macro_auroc": champion} if champion else {})},
        tags={
            "promotion": alias,
            "promotion_reason": decision.reason,
            "model_version": version,
            "previous_champion_version": champion_version or "",
        },
        documents={
            "promotion.json": {
                **decision.as_dict(),
                "model": name,
                "version": version,
                "previous_champion_version": champion_version,
            }
        },
        description=(
            f"**Promotion** of {name} version {version}: now **{alias}**, because {decision.reason}. Both scored on "
            f"the same test fold: this version {challenger:.4f}"
            + (f", the previous champion (version {champion_version}) {champion:.4f}" if champion else "")
            + "."
        ),
    )
    tracking.log_report(run_id, report, uri)
    return {**decision.as_dict(), "alias": alias, "version": version, "previous_champion_version": champion_version}


@flow(name="retrain", log_prints=True)
def retrain_flow(config_path: str | None = None, config: RetrainConfig | None = None) -> dict[str, Any]:
    """Retrain on the current data and promote under the champion/challenger rule."""
    if config is None:
        if config_path is None:
            raise ValueError("give config_path (a retrain TOML file) or config")
        config = RetrainConfig.load(config_path)
    uri = config.tracking_uri
    # the stage runs below carry their errors; this one only the type (ingest messages may name a record)
    with tracking.stage_run(
        "retrain", uri=uri, tags={"prefect_flow_run_id": str(flow_run.id)}, error_detail=False
    ) as parent:
        tracking.log_report(parent, StageReport(params={"retrain": config.model_dump()}), uri)
        ingested = ingest_flow(
            str(Path(config.data.ptbxl).resolve()),
            IngestConfig(workers=config.data.workers),
            config.data.store_root,
            uri,
            parent,
        )
        trained = train_flow(
            ingested["store"],
            config.train.config(),
            work_root=config.train.work_root,
            tracking_uri=uri,
            parent_run_id=parent,
            register_as=config.registry.name,
        )
        tracking.set_tags(
            parent, {"dataset_hash": ingested["dataset_hash"], "model_version": str(trained["model_version"])}, uri
        )
        outcome = compare_and_promote(
            parent,
            ingested["store"],
            config.registry.name,
            str(trained["model_version"]),
            config.registry.tolerance,
            uri,
        )
    print(f"version {outcome['version']} -> {outcome['alias']}: {outcome['reason']}")
    return {"run_id": parent, **outcome}


def deployment(config_path: str | Path):  # noqa: ANN201 (a Prefect RunnerDeployment)
    """The scheduled deployment `ecgproto serve` runs: the config's cron, the config file as parameter."""
    path = str(Path(config_path).resolve())
    cfg = RetrainConfig.load(path)
    return retrain_flow.to_deployment(
        name="ecgproto-retrain",
        schedules=[Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone)],
        parameters={"config_path": path},
        description="retrain on the current data; promote to champion if not worse",
    )
