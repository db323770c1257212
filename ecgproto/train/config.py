"""Training configuration: the model, the optimisation of each stage, loss weights, the baseline.

Defaults follow ProtoECGNet's published settings (the `reference` preset); `TrainConfig.small()` is the
CPU-sized run (real records on CPU, the tests), `TrainConfig.demo()` the same on the short schedule the
generated demo data need.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ecgproto.model.config import ModelConfig


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not a silent default

    epochs: int = Field(ge=1, description="upper bound; early stopping may end sooner")
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1)
    patience: int = Field(10, ge=1, description="epochs without a better validation macro-AUROC before stopping")
    schedule: str = Field("cosine", description="cosine | onecycle | constant")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="adam (weight decay as L2) or adamw (decoupled)")


class LossWeights(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clustering: float = 0.004
    separation: float = 0.0004
    diversity: float = 250.0
    contrastive: float = 300.0
    l1: float = Field(1e-4, description="L1 on a branch head's weights to other classes' prototypes (last layer)")
    fusion_l1: float = Field(
        1e-4,
        description="L1 on the fusion's weights from prototypes of other labels: a label's evidence stays with "
        "its own prototypes unless others add enough to pay for it",
    )
    fusion_pos_weight_power: float = Field(
        1.0,
        ge=0,
        le=1,
        description="the fusion's BCE weighs a label's positives by w ** power (w: the positive-class weight the "
        "branches use); 1 = the reference, 0 = unweighted",
    )
    distill: float = Field(
        0.0,
        ge=0,
        le=1,
        description="the black box trained beside the model as a teacher: the BCE of the joint stages and of the "
        "fusion aims at (1 - distill) x the labels + distill x the black box's scores of the training records "
        "(trained first; the clustering and separation terms keep the labels). The model at prediction time is "
        "the prototype network alone. 0 = the labels only (the reference); needs the baseline enabled",
    )


class BaselineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    blocks: tuple[int, int, int, int] = (2, 2, 2, 2)
    stage: StageConfig = Field(
        default_factory=lambda: StageConfig(
            epochs=40, lr=1e-2, weight_decay=1e-2, batch_size=128, patience=40, schedule="onecycle", optimizer="adamw"
        )
    )


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 20261123
    model: ModelConfig = Field(default_factory=ModelConfig)
    joint: StageConfig = Field(
        default_factory=lambda: StageConfig(epochs=200, lr=1e-4, weight_decay=1.7e-4, batch_size=32, patience=10)
    )
    last_layer: StageConfig = Field(
        default_factory=lambda: StageConfig(epochs=50, lr=1e-3, batch_size=256, patience=10)
    )
    fusion: StageConfig = Field(default_factory=lambda: StageConfig(epochs=100, lr=1e-3, batch_size=256, patience=10))
    loss: LossWeights = Field(default_factory=LossWeights)
    time_roll: bool = Field(True, description="augment training records with a random circular time shift")
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    eval_batch_size: int = Field(256, ge=1)
    bootstrap: int = Field(1000, ge=10, description="bootstrap resamples for the 95% CIs of the test fold")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")
    device: str = Field("auto", description="auto | cpu | cuda")
    amp: bool = Field(True, description="bf16 autocast on CUDA")
    world_size: int = Field(
        1,
        ge=1,
        description="ranks for the joint stages and the baseline (torch DDP via "
        "torchrun: one GPU per rank, or gloo on CPU); 1 = one process",
    )

    @model_validator(mode="after")
    def _teacher_trained(self) -> TrainConfig:
        if self.baseline_teaches and not self.baseline.enabled:
            raise ValueError(
                f"loss.distill = {self.loss.distill} learns from the black box's scores: enable the baseline "
                "(baseline.enabled) or set loss.distill to 0"
            )
        return self

    @property
    def baseline_teaches(self) -> bool:
        """Whether the black box is the branches' and the fusion's teacher (`loss.distill` > 0): then it trains
        first, before every joint stage."""
        return self.loss.distill > 0

    def without_baseline(self) -> TrainConfig:
        """This configuration without the black box, and so without its teacher scores (`loss.distill` 0: the
        model trains on the labels alone)."""
        c = self.model_copy(deep=True)
        c.baseline.enabled = False
        c.loss.distill = 0.0
        return c

    @classmethod
    def small(cls) -> TrainConfig:
        """The CPU configuration (minutes on 2 cores for the real PTB-XL subset, docs/benchmarks.md): `--small` and the
        tests."""
        return cls(
            model=ModelConfig.small(),
            # 30 epochs, patience half the run: shorter schedules stopped every branch still improving, and the
            # validation fold of a small dataset is noisy (docs/experiments.md)
            joint=StageConfig(epochs=30, lr=3e-3, weight_decay=1.7e-4, batch_size=64, patience=15),
            last_layer=StageConfig(epochs=30, lr=1e-2, batch_size=256, patience=5),
            # a linear layer over cached similarities: cheap epochs, but it needs the steps
            fusion=StageConfig(epochs=300, lr=1e-2, batch_size=64, patience=20),
            # the reference fusion L1 kept other labels' prototypes out where they help; the square root of the
            # positive-class weights ranks better in the fusion than the full weights or none (docs/experiments.md)
            # the black box, trained first, teaches every branch and the fusion half-way (docs/design.md): the
            # branches learn graded evidence the 0/1 statements lack
            loss=LossWeights(fusion_l1=1e-5, fusion_pos_weight_power=0.5, distill=0.5),
            # the same 30 epochs as the prototype stages: the black box gets the same budget
            baseline=BaselineConfig(
                widths=(16, 32, 64, 96),
                blocks=(1, 1, 1, 1),
                stage=StageConfig(
                    epochs=30,
                    lr=1e-2,
                    weight_decay=1e-2,
                    batch_size=64,
                    patience=30,
                    schedule="onecycle",
                    optimizer="adamw",
                ),
            ),
            bootstrap=200,
        )

    @classmethod
    def large(cls) -> TrainConfig:
        """`small()`'s design (beat prototypes, the teacher, the fusion weighting, calibrated heads) at GPU widths:
        wider backbones and latents, larger batches. Not yet measured on the full PTB-XL, so `auto` does not pick it
        (see `resolve_preset`)."""
        c = cls.small()
        for name, branch in c.model.branches.items():
            wide = branch.backbone.model_copy(update={"widths": tuple(2 * w for w in branch.backbone.widths)})
            c.model.branches[name] = branch.model_copy(update={"latent_dim": 128, "backbone": wide})
        c.joint = c.joint.model_copy(update={"batch_size": 128})
        c.baseline = c.baseline.model_copy(update={"widths": (32, 64, 128, 192)})
        return c

    @classmethod
    def preset(cls, name: str) -> TrainConfig:
        """The named configuration (PRESETS; 'auto' is resolved first, by `resolve_preset`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown configuration {name!r}; choose one of {', '.join(PRESETS)}")
        return {"small": cls.small, "large": cls.large, "reference": cls, "demo": cls.demo}[name]()

    @classmethod
    def demo(cls) -> TrainConfig:
        """`small()` on the 12-epoch joint and baseline schedule the generated demo data need (their planted
        signals converge within it: fused test macro-AUROC 0.986 at 12 epochs, 0.983 at 30), so `make demo`
        takes a few minutes on 2 cores (docs/benchmarks.md). Real records get `small()`."""
        c = cls.small()
        c.joint = c.joint.model_copy(update={"epochs": 12, "patience": 4})
        c.baseline.stage = c.baseline.stage.model_copy(update={"epochs": 12, "patience": 12})
        return c


# Every named configuration, in one place: the CLI, the retraining file, the pipeline and the benchmarks take them
# from here, and `resolve_preset` is the only place that chooses one.
PRESETS: dict[str, str] = {
    "small": "the validated design (beat prototypes, the black box as teacher, calibrated fusion heads) at CPU "
    "widths; its full-PTB-XL figures are in docs/benchmarks.md; runs on a GPU too, only faster",
    "large": "the same design at GPU widths; not yet measured on the full PTB-XL",
    "reference": "ProtoECGNet's published sizes and pooling, to reproduce the paper only (not the design this "
    "project validated; a GPU, days on a CPU)",
    "demo": "small on the short schedule of the generated demo data",
}
# `auto` picks `large` on a GPU only once its full-PTB-XL figures (fold 10, with the GPU's name) are recorded
LARGE_VALIDATED = False


def resolve_preset(name: str, cuda: bool) -> tuple[str, str]:
    """'auto' (or a preset name) on a machine with or without CUDA -> (preset, why it was chosen)."""
    if name != "auto":
        if name not in PRESETS:
            raise ValueError(f"unknown configuration {name!r}; choose auto or one of {', '.join(PRESETS)}")
        return name, "asked for"
    if cuda and LARGE_VALIDATED:
        return "large", "a GPU is here, and large is validated on the full PTB-XL"
    if cuda:
        return "small", "a GPU is here, but only small has full-PTB-XL figures; it trains there too, only faster"
    return "small", "no GPU here: small is the validated CPU design"


def default_preset() -> str:
    """What `auto` resolves to on this machine (the flows' default when called without a configuration)."""
    import torch

    return resolve_preset("auto", torch.cuda.is_available())[0]
