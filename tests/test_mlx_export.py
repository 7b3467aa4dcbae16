"""`qalora merge --format mlx`: MLX's packing against mx.quantize / mx.dequantize, the merged
folder loaded and run by mlx_lm.load against the unmerged torch model, its weights against a
float64 dense reference built here, and every refusal (exit 2, nothing written)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from helpers import (corrupt_one_layer, make_adapter, make_tiny_llama, make_tokenizer, merge_cli,  # noqa: E402
                     tiny_config_dict)
from qalora_cli.config.loader import validate  # noqa: E402
from qalora_cli.errors import UserError  # noqa: E402
from qalora_cli.export import mlx_merge  # noqa: E402
from qalora_cli.export.checkpoint_reader import CheckpointReader  # noqa: E402
from qalora_cli.export.mlx_merge import MLX_RELATIVE_TOLERANCE, check_mlx_compatible, mlx_layer, pack_mlx  # noqa: E402
from qalora_cli.lora.adapter_io import attach_adapter, read_adapter  # noqa: E402
from qalora_cli.models.quantized_io import load_quantized  # noqa: E402
from qalora_cli.quant.gptq_format import decode_qzeros  # noqa: E402
from qalora_cli.quant.pack import unpack_rows  # noqa: E402
from qalora_cli.quant.result import QuantizedWeight  # noqa: E402
from qalora_cli.recipes.quantize import run as quantize  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)


def half_ulp16(x: np.ndarray) -> np.ndarray:
    return 0.5 * np.spacing(np.abs(x).astype(np.float16)).astype(np.float64)


# --- the packing ------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_is_mx_quantize_s_bit_for_bit(bits, group):
    """mx.quantize packs its own codes; the codes are recovered from mx.dequantize in float64
    (q = (w - b) / s), packed by pack_mlx, and must give mx.quantize's words exactly."""
    w = mx.random.normal((8, 4 * 128), key=mx.random.key(bits * 1000 + group))
    packed, s, b = mx.quantize(w, group_size=group, bits=bits)
    deq = np.array(mx.dequantize(packed, s, b, group_size=group, bits=bits)).astype(np.float64)
    s64 = np.repeat(np.array(s).astype(np.float64), group, axis=1)
    b64 = np.repeat(np.array(b).astype(np.float64), group, axis=1)
    codes = np.rint((deq - b64) / np.where(s64 == 0, 1, s64))
    assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1
    assert codes.max() == 2 ** bits - 1  # the top code occurs, so every bit is exercised
    ours = pack_mlx(torch.from_numpy(codes.astype(np.int32)), bits)
    assert ours.dtype == torch.uint32 and tuple(ours.shape) == tuple(packed.shape)
    assert np.array_equal(ours.numpy(), np.array(packed))


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mx_dequantize_reads_our_layer_as_the_float64_formula(bits, group):
    """Random codes, fp16 scales and fractional zeros (a merge's): MLX's reader gives s q + b,
    with b = -s z' rounded once to fp16, and that is the exact weight within half an fp16 ulp of b."""
    gen = torch.Generator().manual_seed(bits + group)
    out, n_in = 16, 256
    top = 2 ** bits - 1
    qw = QuantizedWeight(codes=torch.randint(0, top + 1, (out, n_in), generator=gen, dtype=torch.int32),
                         scales=(0.005 + 0.03 * torch.rand(n_in // group, out, generator=gen)).half().float(),
                         zeros=-2 + (top + 4) * torch.rand(n_in // group, out, generator=gen, dtype=torch.float64),
                         g_idx=torch.arange(n_in, dtype=torch.int32) // group, bits=bits, group_size=group)
    t = mlx_layer(qw, "float16", "layer")
    assert t["scales"].dtype == t["biases"].dtype == torch.float16
    got = np.array(mx.dequantize(mx.array(t["weight"].numpy()), mx.array(t["scales"].float().numpy()),
                                 mx.array(t["biases"].float().numpy()), group_size=group, bits=bits)).astype(np.float64)
    # the reference, written out: float64 s * q + b with b = fp16(-s z')
    s = qw.scales.double().numpy().T
    b_exact = -s * qw.zeros.numpy().T
    b16 = b_exact.astype(np.float16).astype(np.float64)
    expand = lambda g: np.repeat(g, group, axis=1)  # noqa: E731
    formula = expand(s) * qw.codes.double().numpy() + expand(b16)
    assert np.abs(got - formula).max() <= 2 * EPS32 * np.abs(formula).max()
    exact = expand(s) * (qw.codes.double().numpy() - expand(qw.zeros.numpy().T))
    bound = expand(half_ulp16(b16)) + 4 * EPS32 * (np.abs(formula) + expand(np.abs(b16)))
    assert (np.abs(got - exact) <= bound).all()
    assert np.abs(got - exact).max() > 1e-3 * expand(half_ulp16(b16)).max()  # b really was rounded
    # float32 storage: only float32 rounding left
    t32 = mlx_layer(qw, "float32", "layer")
    got32 = np.array(mx.dequantize(mx.array(t32["weight"].numpy()), mx.array(t32["scales"].numpy()),
                                   mx.array(t32["biases"].numpy()), group_size=group, bits=bits)).astype(np.float64)
    assert np.abs(got32 - exact).max() <= 4 * EPS32 * np.abs(exact).max() + 4 * EPS32 * np.abs(b_exact).max()


def test_scales_that_fp16_cannot_hold_are_refused():
    qw = QuantizedWeight(torch.zeros(4, 32, dtype=torch.int32), torch.full((1, 4), 0.1 + 1e-7),
                         torch.zeros(1, 4), torch.zeros(32, dtype=torch.int32), 4, 32)
    with pytest.raises(UserError, match="float32"):
        mlx_layer(qw, "float16", "x")
    mlx_layer(qw, "float32", "x")


# --- end to end -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlx_bases(tiny_model_dir, tmp_path_factory):
    """INT4 g32 on the shared tiny Llama; INT3 g64 (act-order with static groups) and INT8 g128
    on a wider one with tied embeddings, biases in q/k/v/o (as Qwen2 has) and RoPE theta 1e5
    (SmolLM2's: mlx-lm must be told it); and an act-order base with scattered groups."""
    root = tmp_path_factory.mktemp("mlx")
    tok = make_tokenizer()
    wide = make_tiny_llama(len(tok), hidden_size=128, intermediate_size=256, tie_word_embeddings=True,
                           attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    with torch.no_grad():
        for name, p in wide.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.1)  # zero at init: make them count
    wide.save_pretrained(root / "wide")
    tok.save_pretrained(root / "wide")
    out = {}
    for name, model, kw in [("int4", tiny_model_dir, {}), ("act", tiny_model_dir, dict(act_order=True)),
                            ("int3", root / "wide", dict(bits=3, group_size=64, act_order=True, static_groups=True)),
                            ("int8", root / "wide", dict(bits=8, group_size=128))]:
        quantize(validate(tiny_config_dict(model, root / name, **kw), "t"), show_progress=False)
        out[name] = root / name
        out[f"{name}-adapter"] = make_adapter(root / name, root / f"{name}-adapter", seed=1, b_std=0.2)
    return out


def dense_reference(base, adapter, layer: str) -> tuple[np.ndarray, int]:
    """The unmerged layer as a float64 matrix, from the GPTQ tensors and the adapter file:
    s (q - z) + (alpha / r) (B A)[:, group of k] / g. -> (W [out, in], group size)."""
    qc = json.loads((base / "config.json").read_text())["quantization_config"]
    bits, group = qc["bits"], qc["group_size"]
    cfg, tensors = read_adapter(adapter)
    with CheckpointReader(base) as r:
        s = r.get(f"{layer}.scales").double()
        g_idx = r.get(f"{layer}.g_idx").long()
        q = unpack_rows(r.get(f"{layer}.qweight"), bits, g_idx.numel()).t().double()
        z = decode_qzeros(r.get(f"{layer}.qzeros"), bits, s.shape[1]).double()
    w = s[g_idx].t() * (q - z[g_idx].t())
    if f"{layer}.lora_A" in tensors:
        ba = tensors[f"{layer}.lora_B"].double() @ tensors[f"{layer}.lora_A"].double()
        w = w + cfg["scaling"] * ba[:, g_idx] / group
    return w.numpy(), group


@torch.no_grad()
def torch_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    out = []
    for _ in range(n):
        nxt = int(model(input_ids=ids[None]).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([nxt])])
    return out


def mlx_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(ids.tolist()), model, max_tokens=n)]


@pytest.mark.parametrize("name, dtype", [("int4", "float16"), ("int3", "float32"), ("int8", "float16")])
def test_merged_folder_runs_in_mlx_lm_as_the_unmerged_model(mlx_bases, tmp_path, name, dtype):
    from mlx_lm import load

    base, adapter = mlx_bases[name], mlx_bases[f"{name}-adapter"]
    out = tmp_path / "mlx"
    r = merge_cli(base, adapter, out, "--format", "mlx", f"merge.mlx_dtype={dtype}")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "merge_report.json").read_text())
    assert report["verification"]["verdict"] == "pass" and report["mlx_weights"]["max_ratio_to_bound"] <= 1
    assert max(row["max_zero_move"] for row in report["layer_report"]) > 0.5  # beyond what integer zeros keep

    # The folder as mlx-lm expects it.
    base_cfg = json.loads((base / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    want_q = {"group_size": base_cfg["quantization_config"]["group_size"],
              "bits": base_cfg["quantization_config"]["bits"], "mode": "affine"}
    assert cfg["quantization"] == cfg["quantization_config"] == want_q
    assert cfg["tie_word_embeddings"] is base_cfg["tie_word_embeddings"]
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not (out / "quantize_config.json").exists()
    stored = mx.load(str(out / "model.safetensors"))
    assert not [k for k in stored if k.endswith((".qweight", ".qzeros", ".g_idx"))]
    with CheckpointReader(base) as r:  # the float tensors, linear biases included, as they were
        floats = [k for k in r.file_of if not k.endswith((".qweight", ".qzeros", ".g_idx", ".scales"))]
        # embeddings, final norm, 2 x 2 layer norms, an untied lm_head; the wide model's q/k/v/o biases
        assert len(floats) == 6 + (not cfg["tie_word_embeddings"]) + (8 if name != "int4" else 0)
        for k in floats:
            assert np.array_equal(np.array(stored[k]), r.get(k).numpy()), k

    # Every quantized weight, read by MLX, against the float64 dense reference built from the
    # GPTQ tensors and the adapter: within half an ulp of the stored bias (fp16 or fp32).
    layers = [k[: -len(".biases")] for k in stored if k.endswith(".biases")]
    assert len(layers) == 14
    for layer in layers:
        w, s, b = (stored[f"{layer}.{k}"] for k in ("weight", "scales", "biases"))
        assert w.dtype == mx.uint32 and s.dtype == b.dtype == getattr(mx, dtype)
        ref, group = dense_reference(base, adapter, layer)
        got = np.array(mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=group,
                                     bits=want_q["bits"])).astype(np.float64)
        b64 = np.repeat(np.array(b.astype(mx.float32)).astype(np.float64), group, axis=1)
        ulp = np.spacing(np.abs(b64).astype(np.dtype(dtype))).astype(np.float64)
        bound = 0.5 * ulp + 8 * EPS32 * (np.abs(ref) + np.abs(b64))
        assert (np.abs(got - ref) <= bound).all(), layer

    # mlx_lm.load runs it; the unmerged torch model (base + adapter, float32) is the reference.
    model, _ = load(str(out))
    model.set_dtype(mx.float32)  # lossless: the stored values, in float32 arithmetic
    ref_model, _ = load_quantized(base, dtype=torch.float32)
    attach_adapter(ref_model, *read_adapter(adapter))
    ids = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref_model(input_ids=ids).logits.double().numpy()
    got = np.array(model(mx.array(ids.numpy())).astype(mx.float32)).astype(np.float64)
    rel = np.abs(got - want).max() / np.abs(want).max()
    # float32 biases: float32 noise only; float16: the biases' rounding, within the tolerance
    assert rel <= (1e-5 if dtype == "float32" else MLX_RELATIVE_TOLERANCE), rel
    for p in ids[:2]:
        assert mlx_greedy(model, p, 8) == torch_greedy(ref_model, p, 8)
    if name == "int4":
        # MLX's CPU backend is too slow for the verification's perplexity, which is skipped there;
        # the probe still computes it where MLX has a GPU: its windows, against torch's.
        from qalora_cli.eval.perplexity import perplexity
        from qalora_cli.export.verify import Probe

        assert ("ppl_skipped" in report["verification"]) == (mx.default_device() == mx.cpu)
        text = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(1))
        probe = mlx_merge.run_mlx_probe(out, Probe([text[:16]], 0, text, ppl_seq_len=64))
        want = perplexity(ref_model, text, seq_len=64)["ppl"]
        assert probe["ppl"] == pytest.approx(want, rel=MLX_RELATIVE_TOLERANCE)


def test_a_sharded_base_and_an_adapter_on_some_layers(tiny_model_dir, tmp_path):
    """Shard by shard, with mlx's index; the layers without an adapter keep their integer zeros."""
    base = tmp_path / "sharded"
    data = tiny_config_dict(tiny_model_dir, base, method="rtn")
    data["output"]["max_shard_size"] = "40KB"
    quantize(validate(data, "t"), show_progress=False)
    adapter = make_adapter(base, tmp_path / "adapter", targets=["q_proj", "down_proj"], b_std=0.2)
    out = tmp_path / "mlx"
    r = merge_cli(base, adapter, out, "--format", "mlx", "merge.ppl_tokens=0")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "merge_report.json").read_text())
    assert report["verification"]["verdict"] == "pass" and len(report["layer_report"]) == 4
    n = len(set(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"].values()))
    files = sorted(p.name for p in out.glob("model*.safetensors"))
    assert n > 1 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    stored = {k: f for f in files for k in mx.load(str(out / f))}
    assert index == stored
    for layer in [k[: -len(".biases")] for k in stored if k.endswith(".biases")]:  # all 14, targets or not
        ref, group = dense_reference(base, adapter, layer)
        arrays = mx.load(str(out / stored[f"{layer}.weight"]))
        got = np.array(mx.dequantize(arrays[f"{layer}.weight"], arrays[f"{layer}.scales"].astype(mx.float32),
                                     arrays[f"{layer}.biases"].astype(mx.float32), group_size=group, bits=4))
        b = np.repeat(np.array(arrays[f"{layer}.biases"].astype(mx.float32)).astype(np.float64), group, axis=1)
        assert (np.abs(got - ref) <= half_ulp16(b) + 8 * EPS32 * (np.abs(ref) + np.abs(b))).all(), layer


def test_verification_catches_half_a_step_on_one_layer(mlx_bases, tmp_path, monkeypatch):
    """The check must be able to fail: zero points off by half a step in one layer (written so
    and checked so), against the unmerged model."""
    corrupt_one_layer(monkeypatch)
    out = tmp_path / "m"
    r = merge_cli(mlx_bases["int8"], mlx_bases["int8-adapter"], out, "--format", "mlx", "merge.ppl_tokens=0")
    assert r.exit_code == 2 and "verification failed" in r.output and not out.exists()


# --- refusals ---------------------------------------------------------------------------------

def refused(result, out, *words) -> str:
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error:") and "\n" not in line
    for w in words:
        assert w in line, line
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial-*"))
    return line


def test_act_order_scattered_groups_are_refused(mlx_bases, tmp_path):
    out = tmp_path / "m"
    r = merge_cli(mlx_bases["act"], mlx_bases["act-adapter"], out, "--format", "mlx")
    refused(r, out, "not contiguous", "quantize.static_groups=true")


def test_group_size_16_is_refused(tiny_model_dir, mlx_bases, tmp_path):
    base = tmp_path / "g16"
    quantize(validate(tiny_config_dict(tiny_model_dir, base, method="rtn", group_size=16), "t"), show_progress=False)
    out = tmp_path / "m"
    # refused before the adapter is matched to the base, so any adapter does
    refused(merge_cli(base, mlx_bases["int4-adapter"], out, "--format", "mlx"), out, "group size 16", "32, 64, 128")


@pytest.mark.parametrize("bits, group, shown", [(5, 32, "bits 5"), (4, -1, "group size -1"),
                                                (4, 256, "group size 256")])
def test_unsupported_settings_are_refused_in_one_line(tmp_path, bits, group, shown):
    with pytest.raises(UserError) as err:
        check_mlx_compatible(tmp_path, {"bits": bits, "group_size": group, "model_type": "llama"})
    assert "\n" not in str(err.value) and shown in str(err.value) and "2, 3, 4, 8" in str(err.value)


def test_missing_mlx_is_refused_with_the_install_line(mlx_bases, tmp_path, monkeypatch):
    monkeypatch.setattr(mlx_merge, "mlx_importable", lambda: False)
    out = tmp_path / "m"
    line = refused(merge_cli(mlx_bases["int4"], mlx_bases["int4-adapter"], out, "--format", "mlx"), out,
                   "pip install mlx mlx-lm")
    assert ("mlx-cpu" in line) == sys.platform.startswith("linux")


def test_an_architecture_mlx_lm_lacks_is_refused():
    with pytest.raises(UserError, match="no model type 'no_such_model'"):
        mlx_merge._check_architecture("no_such_model")
    mlx_merge._check_architecture("llama")
