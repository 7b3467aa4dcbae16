"""`lora.init` on checkpoints: the statistics `quantize` stores equal to the ones recomputed from
the original model, `finetune --max-steps 0` saving the initialized adapter, its exact merge,
what `auto` picks, and every refusal. The math: test_quailora_init.py."""

import json
import shutil

import pytest
import torch
import yaml
from typer.testing import CliRunner

from helpers import progress_that_ctrl_cs_at, tiny_config_dict
from qalora_cli.cli.app import app
from qalora_cli.config.loader import validate
from qalora_cli.lora.init_stats import STATS_FORMAT, STATS_NAME, load_stats, quantized_weights, recompute_stats
from qalora_cli.lora.inject import inject_qalora
from qalora_cli.lora.qalora_linear import QALoraLinear
from qalora_cli.models.quantized_io import load_quantized
from qalora_cli.recipes import finetune as finetune_recipe
from qalora_cli.recipes.quantize import run as quantize

runner = CliRunner()


# ---------- the statistics: stored by quantize, recomputed from the original model ----------

@pytest.fixture(scope="module")
def qbase(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qi") / "int3"
    d = tiny_config_dict(tiny_model_dir, out, bits=3, group_size=16, act_order=True)
    d["lora"] = {"rank": RANK}  # the statistics' corrected stream is corrected at this rank (lora/init_stats.py)
    quantize(validate(d, "t"), show_progress=False)
    return out


# below the 8 groups of the tiny model's down_proj: the rank matters
RANK = 4


def ft_dict(tiny_model_dir, qbase, adapter_dir, init="quailora", rank=RANK, **train):
    d = tiny_config_dict(tiny_model_dir, qbase, bits=3, group_size=16, act_order=True)
    d["lora"] = {"rank": rank, "alpha": 16, "dropout": 0.0, "init": init}
    d["data"] = {"source": "builtin", "builtin_size": 160, "max_length": 192, "template": "raw",
                 "eval_max_examples": 16}
    t = {"adapter_dir": str(adapter_dir), "device": "cpu", "micro_batch_size": 4, "batch_size": 8,
         "max_steps": 0, "exact_match_examples": 0, "mixed_precision": "no"}
    t.update(train)
    d["train"] = t
    return d


def test_stored_statistics_equal_the_recomputed_ones(tiny_model_dir, qbase):
    stored = load_stats(qbase)
    assert stored is not None and len(stored) == 14
    cfg = validate(ft_dict(tiny_model_dir, qbase, "unused"), "t")
    model, _ = load_quantized(qbase, dtype=torch.float32)
    adapters = inject_qalora(model, cfg.lora)
    # quantize took them on the model corrected at its own config's lora.rank
    again = recompute_stats(cfg, cfg.model, quantized_weights(adapters), rank=RANK)
    for name, s in stored.items():
        r = again[name]
        assert s.C.shape == (adapters[name].out_features, adapters[name].groups)
        # Equal: the corrected stream runs W~ with the checkpoint's fp16 scales in both passes (only the
        # quantized stream, which GPTQ reads, has float32 ones in the quantize pass)
        for a, b in ((s.C, r.C), (s.G, r.G), (s.R_mean, r.R_mean)):
            assert float((a - b).norm()) <= 1e-5 * float(b.norm()), name
        assert s.rhr == pytest.approx(r.rhr, rel=1e-5)
    # the file is safetensors with its format named
    from safetensors import safe_open

    with safe_open(qbase / STATS_NAME, "pt") as f:
        assert f.metadata()["format"] == "qalora-init-stats"


def _layer_gram(model, batches) -> dict[str, torch.Tensor]:
    """2/N sum x x^T (float64) of the inputs each QA-LoRA layer receives when `model` runs `batches`."""
    grams, tokens = {}, {}

    def hook(name):
        def f(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.t() @ x
            tokens[name] = tokens.get(name, 0) + x.shape[0]
        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, QALoraLinear)]
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {n: 2 * g / tokens[n] for n, g in grams.items()}


@pytest.mark.parametrize("rank", [2, 64])
def test_corrected_statistics_are_taken_on_the_inputs_of_the_initialized_model(tiny_model_dir, qbase, rank):
    """StatsCollector(rank=r): each layer's statistics come from the inputs the model with every adapter
    initialized from them gives it (the corrected stream is that model), checked by running it."""
    from qalora_cli.data.calibration import calibration_batches
    from qalora_cli.lora.init_stats import initialize_adapters

    cfg = validate(ft_dict(tiny_model_dir, qbase, "unused", rank=rank), "t")
    model, _ = load_quantized(qbase, dtype=torch.float32)
    torch.manual_seed(0)
    adapters = inject_qalora(model, cfg.lora)
    stats = recompute_stats(cfg, cfg.model, quantized_weights(adapters), rank=rank)
    initialize_adapters(cfg, qbase, adapters, given=(stats, "corrected"))
    assert any(bool(m.lora_B.detach().any()) for m in adapters.values())
    model.eval()
    from transformers import AutoTokenizer

    calib = calibration_batches(cfg.calibration, AutoTokenizer.from_pretrained(tiny_model_dir))
    H = _layer_gram(model, calib.split(cfg.quantize.batch_size))
    local = recompute_stats(cfg, cfg.model, quantized_weights(adapters))

    def off(s, name, ref):  # relative distance; the streams accumulate H in float32: ~1e-4
        return float((s[name].G.double() - ref).norm()) / float(ref.norm())

    for name, m in adapters.items():
        E = torch.nn.functional.one_hot(m.pool.g_idx.long(), m.groups).double()
        G_ref = E.t() @ H[name] @ E
        assert off(stats, name, G_ref) < 1e-3, name
        # past the first layers, the uncorrected model's inputs are measurably other ones (about 1-9% here)
        if not name.startswith("model.layers.0.self_attn.") or name.endswith("o_proj"):
            assert off(local, name, G_ref) > 3e-3, name


def test_corrected_statistics_leave_the_quantized_checkpoint_unchanged(tiny_model_dir, tmp_path):
    """The corrected stream is a third one beside GPTQ's: codes, scales and zeros are the same with it."""
    from safetensors.torch import load_file

    outs = {}
    for stats in (False, True):
        d = tiny_config_dict(tiny_model_dir, tmp_path / str(stats), bits=3, group_size=16, act_order=True)
        d["output"]["init_stats"] = stats
        quantize(validate(d, "t"), show_progress=False)
        outs[stats] = load_file(tmp_path / str(stats) / "model.safetensors")
    assert outs[False].keys() == outs[True].keys()
    for k in outs[False]:
        assert torch.equal(outs[False][k], outs[True][k]), k


def _copy_without_stats(qbase, dst):
    shutil.copytree(qbase, dst)
    (dst / STATS_NAME).unlink()
    return dst


def test_max_steps_0_saves_the_init_and_it_merges_exactly(tiny_model_dir, qbase, tmp_path):
    reports = {}
    for init in ("zero", "svd", "quailora"):
        rep = finetune_recipe.run(validate(ft_dict(tiny_model_dir, qbase, tmp_path / init, init=init), "t"),
                                  show_progress=False)
        assert rep["steps"] == 0 and rep["after"] == rep["before"]
        assert rep["init"]["method"] == init and rep["init"]["step0_eval_loss"] == rep["before"]["eval_loss"]
        assert (tmp_path / init / "adapter_model.safetensors").is_file()
        reports[init] = rep
    q = reports["quailora"]["init"]
    assert q["stats"] == STATS_NAME and 0 <= q["mean_remaining_error"] < 1
    assert q["stats_inputs"] == f"corrected-sequential rank {RANK}"
    assert q["mean_remaining_error"] <= reports["svd"]["init"]["mean_remaining_error"] + 1e-9
    assert all(row["remaining_error"] >= row["full_rank_remaining_error"] - 1e-9 for row in q["layers"])
    assert reports["quailora"]["before"]["eval_loss"] != reports["zero"]["before"]["eval_loss"]

    # the fallback (no stored statistics: recomputed from the original model) gives the same adapter
    bare = _copy_without_stats(qbase, tmp_path / "bare")
    rep = finetune_recipe.run(validate(ft_dict(tiny_model_dir, bare, tmp_path / "fallback"), "t"),
                              show_progress=False)
    assert rep["init"]["stats"].startswith("recomputed from")
    assert rep["init"]["stats_inputs"] == f"recomputed, corrected-sequential rank {RANK}"
    from safetensors.torch import load_file

    a = load_file(tmp_path / "quailora" / "adapter_model.safetensors")
    b = load_file(tmp_path / "fallback" / "adapter_model.safetensors")
    for k in (k[: -len(".lora_A")] for k in a if k.endswith(".lora_A")):  # the update B A (factors: up to signs)
        ua, ub = a[f"{k}.lora_B"] @ a[f"{k}.lora_A"], b[f"{k}.lora_B"] @ b[f"{k}.lora_A"]
        assert float((ua - ub).norm()) <= 1e-4 * float(ua.norm())  # the same statistics (test above)

    # qalora merge of the untrained, initialized adapter: exact (float zero points), verified
    out = tmp_path / "merged"
    r = runner.invoke(app, ["merge", "--config", "smollm2-135m-int4", "--model", str(qbase), "--adapter",
                            str(tmp_path / "quailora"), "--output", str(out), "merge.ppl_tokens=600",
                            "merge.verify_tokens=32", "merge.device=cpu"])
    assert r.exit_code == 0, r.output
    v = json.loads((out / "merge_report.json").read_text())["verification"]
    assert v["verdict"] == "pass" and v["relative"] < 1e-5
    # the merged model's loss on the held-out task equals the init's step-0 loss
    rep = finetune_recipe.run(validate(ft_dict(tiny_model_dir, out, tmp_path / "on-merged", init="zero"), "t"),
                              show_progress=False)
    assert rep["before"]["eval_loss"] == pytest.approx(reports["quailora"]["before"]["eval_loss"], rel=1e-4)


def test_init_then_training_runs_and_resumes(tiny_model_dir, qbase, tmp_path):
    rep = finetune_recipe.run(validate(ft_dict(tiny_model_dir, qbase, tmp_path / "a", max_steps=2,
                                               learning_rate=1e-3, eval_every=2, save_every=2), "t"),
                              show_progress=False)
    assert rep["steps"] == 2 and rep["init"]["method"] == "quailora" and rep["after"]["eval_loss"] > 0


def _with_stats_inputs(base, dst, inputs, target):
    """A copy of `base` whose statistics say they were taken on `inputs`, quantized for `target`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, dst)
    tensors = load_file(dst / STATS_NAME)
    save_file(tensors, dst / STATS_NAME, metadata={"format": STATS_FORMAT, "version": "1", "inputs": inputs})
    rep = json.loads((dst / "quantize_report.json").read_text())
    (dst / "quantize_report.json").write_text(json.dumps(dict(rep, target=target)))
    return dst


def test_auto_init_is_quailora_where_the_base_stores_fitting_statistics_else_zero(tiny_model_dir, qbase,
                                                                                   tmp_path, monkeypatch):
    from safetensors.torch import load_file

    def run(base, name, init="auto", **train):
        return finetune_recipe.run(validate(ft_dict(tiny_model_dir, base, tmp_path / name, init=init, **train), "t"),
                                   show_progress=False)

    assert validate(tiny_config_dict(tiny_model_dir, qbase), "t").lora.init == "auto"  # the default
    auto, zero = run(qbase, "auto"), run(qbase, "zero", "zero")
    run(qbase, "quailora", "quailora")
    assert auto["init"]["method"] == "quailora" and "stores statistics that fit it" in auto["init"]["auto"]
    a, b = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("auto", "quailora"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the very same adapter
    # no statistics: zero, without the slow recompute from the original model (still on disk here)
    bases = tmp_path / "bases"
    bare = run(_copy_without_stats(qbase, bases / "bare"), "bare")
    assert bare["init"] == {"method": "zero", "step0_eval_loss": zero["before"]["eval_loss"],
                            "auto": f"'{bases / 'bare'}' stores no {STATS_NAME}"}
    # statistics of the quantized model's own inputs suit a local-target (GPTQ) base only
    quantized_inputs = "quantized-sequential"
    gptaq = run(_with_stats_inputs(qbase, bases / "gptaq", quantized_inputs, "float"), "on-gptaq")
    assert gptaq["init"]["method"] == "zero" and "quantize.target float" in gptaq["init"]["auto"]
    gptq = run(_with_stats_inputs(qbase, bases / "gptq", quantized_inputs, "local"), "on-gptq")
    assert gptq["init"]["method"] == "quailora" and gptq["init"]["stats_inputs"] == quantized_inputs
    # the baselines start from PEFT's B = 0 whatever the base stores
    qlora_cfg = validate(dict(ft_dict(tiny_model_dir, qbase, tmp_path / "qlora"), finetune={"method": "lora"},
                              lora={"rank": RANK, "alpha": 16, "dropout": 0.0}), "t")
    assert finetune_recipe.run(qlora_cfg, show_progress=False)["init"]["method"] == "zero"
    # --resume keeps the init of the run it continues: a zero run, cut at step 1, resumed as auto
    with monkeypatch.context() as m, progress_that_ctrl_cs_at(1) as progress:
        m.setattr(finetune_recipe, "training_progress", progress)
        cut = run(qbase, "cut", "zero", max_steps=2, save_every=1, eval_every=2)
    assert cut["interrupted"] and cut["steps"] == 1
    cfg = validate(ft_dict(tiny_model_dir, qbase, tmp_path / "cut", init="auto", max_steps=2, save_every=1,
                           eval_every=2), "t")
    resumed = finetune_recipe.run(cfg, resume=True, show_progress=False)
    assert resumed["steps"] == 2 and resumed["init"]["method"] == "zero"
    assert resumed["init"]["auto"] == "the init of the run resumed"


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_model_dir, qbase, tmp_path):
    def ft(d, *args):
        f = tmp_path / "ft.yaml"
        f.write_text(yaml.safe_dump(d))
        r = runner.invoke(app, ["finetune", "--config", str(f), *args])
        return r.exit_code, r.output.strip()

    out = tmp_path / "adapter"
    # no statistics, and the original model recorded by the checkpoint is gone
    bare = _copy_without_stats(qbase, tmp_path / "bare")
    rep = json.loads((bare / "quantize_report.json").read_text())
    rep["model"] = str(tmp_path / "deleted-model")
    (bare / "quantize_report.json").write_text(json.dumps(rep))
    for init in ("quailora", "svd"):
        code, text = ft(ft_dict(tiny_model_dir, bare, out, init=init))
        assert code == 2 and len(text.splitlines()) == 1, text
        assert f"lora.init={init} needs" in text and "qalora quantize" in text and "cannot be found" in text
    # no statistics and no quantize report at all
    (bare / "quantize_report.json").unlink()
    code, text = ft(ft_dict(tiny_model_dir, bare, out))
    assert code == 2 and "no quantize_report.json" in text and "qalora quantize" in text
    # a corrupt statistics file
    (bare / STATS_NAME).write_bytes(b"not safetensors")
    code, text = ft(ft_dict(tiny_model_dir, bare, out))
    assert code == 2 and "corrupt statistics" in text
    # statistics of another checkpoint (another group size)
    other = tmp_path / "g32"
    quantize(validate(tiny_config_dict(tiny_model_dir, other, bits=3, group_size=32), "t"), show_progress=False)
    shutil.copy(other / STATS_NAME, bare / STATS_NAME)
    code, text = ft(ft_dict(tiny_model_dir, bare, out))
    assert code == 2 and "re-run `qalora quantize`" in text and "groups" in text
    # an unknown init, a negative step count
    code, text = ft(ft_dict(tiny_model_dir, qbase, out, init="loftq"))
    assert code == 2 and "lora.init" in text and "quailora" in text
    code, text = ft(ft_dict(tiny_model_dir, qbase, out), "--max-steps", "-1")
    assert code == 2 and "max_steps" in text
    assert not out.exists()  # nothing written by any failure
    # quantize can leave the statistics out
    no = tmp_path / "nostats"
    quantize(validate(dict(tiny_config_dict(tiny_model_dir, no, bits=3, group_size=16),
                           output={"dir": str(no), "init_stats": False}), "t"), show_progress=False)
    assert not (no / STATS_NAME).exists()
