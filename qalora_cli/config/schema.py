"""The typed run config. Every key is validated; unknown keys are rejected.

Sections: model, quantize, calibration, output (the quantize stage); lora, data, train (the
finetune stage); merge. Later stages add theirs beside these.
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
    target: Literal["local", "float"] = Field(
        "float", description="what each layer's output is matched to on its inputs from the quantized layers "
                             "before it: local = its own float weight's (GPTQ); float = the float model's output for the "
                             "same tokens, so earlier layers' errors are corrected too (GPTAQ's asymmetric calibration)")
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
    source: Literal["builtin", "mix", "hub", "files"] = Field(
        "builtin", description="builtin: Python's help topics (even half); mix: the same plus text the model "
                               "generates itself (generated_fraction of the samples); hub; files")
    dataset: str | None = Field(None, description="hub dataset id (source: hub)")
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    paths: list[str] = Field(default_factory=list, description="text files: .txt, .json, .jsonl, .csv, .parquet")
    num_samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=16)
    seed: int = 0
    generated_fraction: float = Field(0.5, ge=0, le=1, description="source mix: share of the samples that are "
                                                                   "text sampled from the model itself")
    generated_top_p: float = Field(0.95, gt=0, le=1, description="source mix: nucleus sampling of that text")

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
    init_stats: bool = Field(True, description="quantize: write qalora_init/quailora_stats.safetensors in the "
                                               "checkpoint, the per-layer statistics lora.init svd/quailora start from")
    init_stats_inputs: Literal["corrected", "quantized"] = Field(
        "corrected", description="the inputs those statistics are taken on: corrected = the model as lora.init "
                                 "quailora at lora.rank corrects it, layer after layer, each aimed at the float "
                                 "model's output (the corrections then add up instead of piling up); quantized = the "
                                 "quantized model's own, each layer aimed at its own float weight (a quicker pass)")


class LoraSection(Section):
    """QA-LoRA adapters. Defaults follow the paper and its code: rank 64, alpha 16."""
    rank: int = Field(64, ge=1)
    alpha: float = Field(16, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="'all-linear' (every quantized linear of the decoder blocks, as the paper) "
                                  "or module names, e.g. [q_proj, v_proj]")
    group_size: int | None = Field(None, description="pooling group size; it must equal the checkpoint's "
                                                     "(default: the checkpoint's)")
    init: Literal["auto", "zero", "svd", "quailora"] = Field(
        "auto", description="where the adapters start: zero (B = 0, the quantized model itself); svd (weight-only: "
                            "rank-r SVD of the per-group mean of the quantization residual); quailora (calibrated: "
                            "the rank-r group-constant correction that best cancels the quantization error on the "
                            "calibration inputs); auto: quailora where the checkpoint stores statistics that suit "
                            "it (`qalora quantize` writes them), zero elsewhere. svd and quailora read "
                            "qalora_init/quailora_stats.safetensors in the checkpoint, else recompute it from the "
                            "original model")


class DataSection(Section):
    """Instruction data for fine-tuning, through `datasets`."""
    source: str = Field("builtin", description="'builtin' (the embedded record-extraction task), a local "
                                               ".json/.jsonl/.csv/.parquet file or folder, or a hub dataset id")
    hub_config: str | None = Field(None, description="the hub dataset's configuration name")
    split: str = "train"
    eval_split: str | None = Field(None, description="the source's split for evaluation; when unset, "
                                                     "eval_fraction of the training split is held out")
    eval_fraction: float = Field(0.05, gt=0, lt=1)
    eval_max_examples: int = Field(200, ge=1)
    format: Literal["auto", "alpaca", "prompt_completion", "inputs_targets", "chat"] = Field(
        "auto", description="alpaca: instruction/input/output; prompt_completion: prompt/completion; "
                            "inputs_targets: FLAN's inputs/targets; chat: messages; auto: from the columns")
    template: Literal["auto", "alpaca", "chat", "raw"] = Field(
        "auto", description="how a record becomes text: the Alpaca prompt, the tokenizer's chat template, or "
                            "raw concatenation; auto: alpaca for alpaca records, chat for messages, else raw")
    max_length: int = Field(512, ge=8, description="tokens per example (prompt + response)")
    overlong: Literal["truncate", "skip"] = Field("truncate", description="what to do with longer examples")
    packing: bool = Field(False, description="concatenate examples into max_length sequences")
    max_examples: int | None = Field(None, ge=1, description="use at most this many training records")
    seed: int = 0
    builtin_size: int = Field(2400, ge=20, description="records the embedded generator makes")


class FinetuneSection(Section):
    """What is fine-tuned: the paper's method or one of its baselines, on the same data, steps and evaluation."""
    method: Literal["qalora", "qlora", "lora"] = Field(
        "qalora", description="qalora: QA-LoRA adapters on the frozen GPTQ checkpoint (train.quantized_model); "
                              "qlora: PEFT LoRA (16-bit adapters) on the model section's float model loaded in "
                              "bitsandbytes NF4 with double quantization; lora: PEFT LoRA on the float model held "
                              "in 16 bits (the upper bound). qlora/lora take rank, alpha, dropout and targets from "
                              "the lora section and write a PEFT adapter plus qalora_base.json")


class TrainSection(Section):
    """The fine-tuning loop. Batch 16 (through accumulation) and max grad norm 0.3 follow the paper.
    Learning rate 2e-4 follows the paper's code and QLoRA (the paper's text says 2e-5, which with
    scaling alpha/rank = 0.25 barely moves the adapters in a short run; docs/BENCHMARKS.md)."""
    quantized_model: str | None = Field(None, description="the quantized checkpoint to train on "
                                                          "(default: output.dir, the quantize stage's output)")
    adapter_dir: str | None = Field(None, description="where the adapter goes (default: output.dir + '-qalora')")
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda, cuda:N")
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = Field(
        "auto", description="auto: bf16 on CUDA (fp16 where bf16 is missing) and on CPUs that multiply bf16 "
                                "natively (AVX512-BF16, AMX), else no: emulated bf16 is slower than float32")
    micro_batch_size: int = Field(4, ge=1, description="examples per forward pass on each process")
    batch_size: int = Field(16, ge=1, description="examples per optimizer step, over accumulation and processes")
    learning_rate: float = Field(2e-4, gt=0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_steps: int = Field(200, ge=0, description="0: no training, the initialized adapter is saved (lora.init)")
    max_grad_norm: float = Field(0.3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    optimizer: Literal["auto", "adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        "auto", description="auto: paged_adamw_32bit on CUDA with bitsandbytes (as QLoRA and the paper's code), "
                            "else torch AdamW")
    gradient_checkpointing: bool = False
    kernel: Literal["auto", "torch", "triton", "gptqmodel"] = Field(
        "auto", description="the quantized layers' kernel: auto (triton on CUDA, else torch) or one by name")
    eval_every: int = Field(50, ge=1, description="held-out loss every N steps")
    save_every: int = Field(50, ge=1, description="a resumable checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    seed: int = 0
    exact_match_examples: int = Field(64, ge=0, description="held-out examples answered greedily before and "
                                                            "after training (exact-match accuracy); 0: skip")
    max_new_tokens: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _batch(self) -> "TrainSection":
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        return self


class MergeSection(Section):
    """Folding the adapter into the quantized model, and the check that follows."""
    format: Literal["qalora", "gptq", "gguf", "mlx", "float"] = Field(
        "qalora", description="qalora: float zero points, exact; float: a qlora/lora (PEFT) adapter merged into "
                              "the float model (the source's dtype), a plain Hugging Face folder for `qalora "
                              "quantize` (QLoRA w/ GPTQ); gptq: integer zero points (rounded, the loss reported); "
                              "gguf: Q4_1 for llama.cpp and ollama (bits 4, group 32, contiguous groups); "
                              "mlx: an mlx-lm folder, affine with biases -s z' (bits 2/3/4/8, group 32/64/128, "
                              "contiguous groups)")
    quantized_model: str | None = Field(None, description="the quantized base (default: train.quantized_model, "
                                                          "else output.dir)")
    adapter_dir: str | None = Field(None, description="the adapter (default: train.adapter_dir, else "
                                                      "output.dir + '-qalora')")
    dir: str | None = Field(None, description="where the merged model goes (default: output.dir + '-merged', "
                                              "+ '-gptq', '-gguf' or '-mlx' for those formats)")
    verify: bool = Field(True, description="reload the output and compare it with the unmerged model")
    verify_prompts: int = Field(4, ge=1, description="held-out prompts whose logits are compared")
    verify_tokens: int = Field(64, ge=4, description="tokens per prompt")
    generate_tokens: int = Field(16, ge=0, description="greedy tokens generated from 2 prompts by both models")
    ppl_tokens: int = Field(4096, ge=0, description="held-out tokens for the perplexity of both models (0: skip)")
    device: str = Field("auto", description="where verification runs: auto, cpu, cuda, cuda:N")
    gguf_float_type: Literal["F16", "F32"] = Field("F16", description="gguf: type of the unquantized 2-D tensors")
    mlx_dtype: Literal["float16", "float32"] = Field(
        "float16", description="mlx: dtype of the scales and biases (bfloat16 is not offered: it rounds -s z' by "
                               "several percent of a step)")
    rounding: Literal["scales", "codes", "scales+codes", "nearest"] = Field(
        "scales", description="gptq: how the fractional zero points become integers. All round z' to z_int, "
                              "then fit on calibration inputs so each layer's output matches the exact merge: "
                              "scales: each (group, row) fp16 scale refitted, codes kept; codes: codes re-chosen "
                              "by GPTQ's error feedback on the fixed grid; scales+codes: both, in that order; "
                              "nearest: nothing refitted (fast, loses most of the fine-tune)")
    calibration: Literal["data", "text", "mix"] = Field(
        "data", description="gptq refit: inputs from the adapter's own training data (recorded in its "
                            "adapter_config.json, else this config's data section), the calibration text "
                            "(calibration section), or half of each")
    calibration_samples: int = Field(128, ge=2, description="gptq refit: windows of calibration_seq_len tokens")
    calibration_seq_len: int = Field(256, ge=16)
    heldout_samples: int = Field(16, ge=0, description="gptq refit: further windows, never used to choose codes, "
                                                       "on which each layer's output error is reported")
    refit_target: Literal["exact", "local"] = Field(
        "local", description="gptq refit: exact: each layer aims at the exact merge's output on the exact model's "
                             "inputs (errors of earlier layers are corrected), or, local, at its own exact "
                             "weight on the re-rounded model's inputs (plain sequential GPTQ)")
    refit_sequential: bool = Field(True, description="gptq refit: within a block, q/k/v, o, gate/up and down in turn, "
                                                      "each on the inputs the refitted layers before it give (as "
                                                      "quantize's true_sequential); false: all of a block's layers "
                                                      "from one pass (fewer forward passes)")
    codes_act_order: bool = Field(True, description="gptq codes: choose codes in decreasing order of the "
                                                      "input Hessian's diagonal (as GPTQ's act-order)")
    distill_steps: int = Field(32, ge=0, description="gptq refit: then tune the fp16 scales end to end for this many "
                                                    "steps so the model's next-token distribution matches the exact "
                                                    "merge's on the calibration windows (0: layer-wise refit only). "
                                                    "Holds the exact merge beside the refitted model")
    distill_lr: float = Field(1e-3, gt=0, description="gptq distillation: Adam's step on each scale's relative change")
    distill_batch: int = Field(4, ge=1, description="gptq distillation: calibration windows per step")
    distill_schedule: Literal["constant", "warmup_cosine"] = Field(
        "warmup_cosine", description="gptq distillation: the learning rate over the steps: warmup_cosine (linear "
                                     "warm-up over the first quarter, then cosine to 0: Adam's first steps move every "
                                     "scale by about the full rate whatever its gradient), or constant. On SmolLM2 INT4, "
                                     "32 warmup_cosine steps ended nearer the exact merge than 64 constant ones")


class RunConfig(Section):
    model: ModelSection
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    output: OutputSection
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    train: TrainSection = Field(default_factory=TrainSection)
    merge: MergeSection = Field(default_factory=MergeSection)
