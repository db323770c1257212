"""Model configuration: one pydantic model per branch and one for the whole network.

Defaults are the reference design, ProtoECGNet's published sizes (widths 64-512, 5/18/7 prototypes per class,
latent 512); `ModelConfig.small()` is the CPU-sized variant the demo and the tests train.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BranchKind = Literal["global_1d", "local_2d", "global_2d"]


class BackboneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not a silent default

    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    blocks: tuple[int, int, int, int] = (2, 2, 2, 2)
    stem_kernel: int = 7
    # 2D only: the last `lead_mixing_stages` stages convolve over neighbouring leads (kernel 3 on the
    # lead axis, Cabrera order); earlier stages are per-lead, so a feature column keeps its lead.
    lead_mixing_stages: int = Field(1, ge=0, le=4)


class BranchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: BranchKind
    prototypes_per_class: int = Field(ge=1)
    latent_dim: int = 512
    window: int = Field(
        3,
        ge=1,
        description="local_2d: prototype length in feature columns (beat pooling: the beat window, this is not used)",
    )
    window_leads: int = Field(
        1,
        ge=1,
        le=12,
        description="local_2d: prototype height in lead rows (Cabrera order; "
        "3 = an anatomical neighbourhood such as II, aVF, III). Beat pooling: the size of "
        "the lead groups, which do not overlap (3: aVL-I-aVR, II-aVF-III, V1-V3, V4-V6)",
    )
    scale: float = Field(description="similarity = scale * cosine (reference: floor(sqrt(512*T))/T)")
    similarity: Literal["cosine", "exp_cosine"] = Field(
        "cosine",
        description="'cosine' (reference): scale * c; 'exp_cosine': scale * (2 exp(c - 1) - 1), "
        "which rewards nearness, so the trained prototypes stay near real latents and projection costs less (see "
        "ecgproto.model.prototypes). For branches with one window per record or per beat group; under "
        "lead_mean the mean of an exp over a strip is dominated by its far windows",
    )
    pool: Literal["max", "lead_mean", "beat"] = Field(
        "max",
        description="how windows are pooled into one similarity, in training, evaluation and explanation alike "
        "(see ecgproto.model.prototypes). 'max' is the reference; 'lead_mean': per lead row the mean over time, then "
        "the best row (the reference's local branch here); 'beat' "
        "(local_2d): the latent of each detected beat's window per lead group, averaged over the record's beats, each "
        "prototype compared with its own lead group only (see ecgproto.model.branch)",
    )
    beat_window_s: tuple[float, float] = Field(
        (0.48, 0.80),
        description="beat pooling: seconds before and after a beat's R peak that its window spans "
        "(P-wave onset to T-wave end at usual PR and QT intervals)",
    )
    beats: int = Field(8, ge=1, description="beat pooling: beats per record, evenly spaced, whose latents are averaged")
    train_beats: int = Field(
        4,
        ge=1,
        description="beat pooling, joint stage: a random subset of this many beats per record and step "
        "(half the cost of `beats`, and each step sees other beats of the record)",
    )
    beat_jitter_s: float = Field(0.02, ge=0, description="beat pooling, joint stage: random shift of each beat window")
    whole_beat_group: bool = Field(
        False,
        description="beat pooling: besides the lead groups, one group of all 12 leads, so a prototype can be "
        "a whole 12-lead beat (the axis, or voltage summed over limb and chest leads, spans the groups)",
    )
    dropout: float = 0.0
    head_negative: float = Field(
        0.0,
        description="initial (and, in the joint stage, frozen) head weight to other classes' prototypes. "
        "Reference -0.5: with many classes the summed negative votes invert majority classes (measured on the demo: "
        "SR validation AUROC 0.07 at -0.5 vs 0.91 at 0); the last-layer stage learns the cross-class weights",
    )
    lead_embedding: bool = Field(
        True,
        description="local_2d: add a learned per-lead offset to the features so a local prototype knows "
        "which lead it is on (the per-lead convolutions share weights across leads)",
    )
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)

    @model_validator(mode="after")
    def _row_and_beat_pooling_are_local(self) -> BranchConfig:
        if self.pool == "beat" and self.kind != "local_2d":
            raise ValueError(f"pool={self.pool!r} compares latents of lead rows: a local_2d option, not {self.kind}")
        if self.pool == "beat" and 12 % self.window_leads:
            raise ValueError(
                f"beat pooling splits the 12 leads into groups of window_leads; {self.window_leads} "
                "does not divide 12 (choose 1, 2, 3, 4, 6 or 12)"
            )
        if self.beat_window_s[0] < 0 or self.beat_window_s[1] <= 0:
            raise ValueError(f"beat_window_s {self.beat_window_s}: both parts are seconds >= 0 around the R peak")
        return self


class FusionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    normalise: bool = Field(True, description="divide each branch's similarities by its scale (each block in [-1, 1])")
    heads: int = Field(
        8,
        ge=0,
        description="bootstrap fusion heads beside the main one, for each prediction's uncertainty (their spread); "
        "0: no uncertainty",
    )


def _reference_branches() -> dict[str, BranchConfig]:
    return {
        "rhythm_1d": BranchConfig(kind="global_1d", prototypes_per_class=5, scale=10.0),
        "morphology_2d_local": BranchConfig(
            kind="local_2d", prototypes_per_class=18, window=3, scale=13.0, dropout=0.35, pool="lead_mean"
        ),
        "global_2d": BranchConfig(kind="global_2d", prototypes_per_class=7, scale=4.0, dropout=0.35),
    }


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_leads: int = 12
    n_samples: int = 1000
    fs: float = 100.0
    branches: dict[str, BranchConfig] = Field(default_factory=_reference_branches)
    fusion: FusionConfig = Field(default_factory=FusionConfig)

    @classmethod
    def small(cls) -> ModelConfig:
        """CPU-sized: narrow backbones, fewer prototypes; same structure as the reference."""
        c = cls()
        narrow = BackboneConfig(widths=(16, 32, 64, 96), blocks=(1, 1, 1, 1))
        narrow_2d = BackboneConfig(widths=(8, 16, 32, 64), blocks=(1, 1, 1, 1))
        # exp_cosine on the one-window branches: prototypes stay near real ECGs, so projection costs little
        c.branches["rhythm_1d"] = c.branches["rhythm_1d"].model_copy(
            update={
                "prototypes_per_class": 3,
                "latent_dim": 64,
                "backbone": narrow,
                "similarity": "exp_cosine",
                "scale": 3.0,
            }
        )
        # beat windows on the local branch: a prototype is one real beat in one lead group, or all 12 leads (see
        # docs/design.md)
        c.branches["morphology_2d_local"] = c.branches["morphology_2d_local"].model_copy(
            update={
                "prototypes_per_class": 5,
                "latent_dim": 64,
                "dropout": 0.1,
                "pool": "beat",
                "window_leads": 3,
                "whole_beat_group": True,
                "similarity": "exp_cosine",
                "scale": 3.0,
                "backbone": narrow_2d.model_copy(update={"lead_mixing_stages": 0}),
            }
        )
        # the global branch (NORM, DIG, EL) on the 1D backbone: as accurate in the fused model as the 2D backbone at
        # a quarter of its training time on a CPU (docs/experiments.md)
        c.branches["global_2d"] = c.branches["global_2d"].model_copy(
            update={
                "kind": "global_1d",
                "prototypes_per_class": 3,
                "latent_dim": 64,
                "backbone": narrow,
                "similarity": "exp_cosine",
                "scale": 3.0,
                "dropout": 0.0,
            }
        )
        return c
