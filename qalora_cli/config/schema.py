"""The typed run config. Every key is validated; unknown keys are rejected.

Sections: model, quantize, calibration, output. Later stages add theirs beside these.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    name_or_path: str = Field(description="Hugging Face folder, hub id, or .gguf file")
    gguf_file: str | None = Field(None, description="a GGUF file inside name_or_path (folder or hub repo)")
    package: str | None = Field(
        None, description="an installed Python package whose folder holds name_or_path (found, never imported)")
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


class QuantizeSection(Section):
    method: Literal["gptq", "rtn"] = "gptq"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(32, description="columns per group; -1 for one group per row (per-channel)")
    sym: bool = False
    act_order: bool = Field(False, description="GPTQ in decreasing Hessian-diagonal order; groups in g_idx "
                                              "(rtn ignores it)")
    static_groups: bool = Field(False, description="with act_order: keep groups contiguous")
    clip_search: bool = Field(False, description="shrink each group's range where that lowers its error")
    damp_percent: float = Field(0.01, gt=0, le=1)
    block_size: int = Field(128, ge=1)
    true_sequential: bool = Field(True, description="quantize q/k/v, o, gate/up, down in turn within a block")
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda, cuda:N, mps")
    batch_size: int = Field(8, ge=1, description="calibration samples per forward pass")

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError("must be a positive number of columns or -1 (per-channel)")
        return v

    @model_validator(mode="after")
    def _static(self) -> "QuantizeSection":
        if self.static_groups and not self.act_order:
            raise ValueError("static_groups only applies with act_order: true")
        return self


class CalibrationSection(Section):
    source: Literal["builtin", "hub", "files"] = "builtin"
    dataset: str | None = Field(None, description="hub dataset id (source: hub)")
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    paths: list[str] = Field(default_factory=list, description="text files: .txt, .json, .jsonl, .csv, .parquet")
    num_samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=16)
    seed: int = 0

    @model_validator(mode="after")
    def _source(self) -> "CalibrationSection":
        if self.source == "hub" and not self.dataset:
            raise ValueError("source 'hub' needs calibration.dataset (a hub dataset id)")
        if self.source == "files" and not self.paths:
            raise ValueError("source 'files' needs calibration.paths (one or more files)")
        return self


class OutputSection(Section):
    dir: str
    dtype: Literal["float16", "bfloat16"] = Field("float16", description="dtype of scales and unquantized tensors")
    max_shard_size: str = "4GB"
    overwrite: bool = False


class RunConfig(Section):
    model: ModelSection
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    output: OutputSection
