"""Does the ranking of presses transfer between models and datasets: Kendall's τ with a bootstrap over windows,
"best" only where separated, the chart; on small tables written here (no model, no torch)."""

import itertools
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from kvlib.analysis import transfer

PRESSES = ["knorm", "snapkv", "streaming_llm", "tova"]


def brute_tau_b(x, y) -> float:
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        if sx == 0 and sy == 0:
            continue
        if sx == 0:
            ties_x += 1
        elif sy == 0:
            ties_y += 1
        elif sx == sy:
            concordant += 1
        else:
            discordant += 1
    return (concordant - discordant) / math.sqrt(
        (concordant + discordant + ties_x) * (concordant + discordant + ties_y)
    )


def test_kendall_tau_matches_its_definition_with_ties_and_in_batches():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(20, 7)).astype(float)  # many ties
    y = rng.integers(0, 4, size=(20, 7)).astype(float)
    batch = transfer.kendall_tau(x, y)
    assert batch.shape == (20,)
    for row in range(20):
        assert batch[row] == pytest.approx(brute_tau_b(x[row], y[row]))
    order = np.arange(6.0)
    assert transfer.kendall_tau(order, order * 3) == pytest.approx(1.0)
    assert transfer.kendall_tau(order, -order) == pytest.approx(-1.0)
    assert math.isnan(transfer.kendall_tau(order, np.ones(6)))


def write_table(folder, model, dataset, costs, windows=12, noise=0.02, seed=0, kv_quant=None):
    """A model's metrics and per-window records: each press's suffix NLL per token is the baseline's plus its cost
    (per ratio), with per-window noise."""
    rng = np.random.default_rng(seed)
    base = 3.0 + rng.normal(0, 0.2, windows)
    rows = [{"kind": "ppl", "method": "none", "compression_ratio": 0.0, "window": w, "nll_sum": 100 * base[w],
             "n_tokens": 100} for w in range(windows)]  # fmt: skip
    for (method, ratio), cost in costs.items():
        for w in range(windows):
            nll = 100 * (base[w] + cost + rng.normal(0, noise))
            rows.append({"kind": "ppl", "method": method, "compression_ratio": ratio, "window": w, "nll_sum": nll,
                         "n_tokens": 100})  # fmt: skip
    rows.append({"kind": "latency", "method": "none", "compression_ratio": 0.0, "window": math.nan, "nll_sum": math.nan,
                 "n_tokens": math.nan})  # fmt: skip
    records = pd.DataFrame(rows)
    if kv_quant is not None:
        records["kv_quant"] = kv_quant
    records.to_csv(folder / f"{model}_{dataset}_kv_windows.csv", index=False)
    pd.DataFrame([{"model": model, "dataset": dataset, "method": "none"}]).to_csv(
        folder / f"{model}_{dataset}_kv_metrics.csv", index=False
    )


def costs(order: list[str], ratios=(0.5, 0.7), step=0.1) -> dict:
    return {(m, r): step * (1 + i) * r for r in ratios for i, m in enumerate(order)}


@pytest.fixture
def results(tmp_path):
    write_table(tmp_path, "model-a", "pg19", costs(PRESSES), seed=1)
    write_table(tmp_path, "model-b", "pg19", costs(PRESSES), seed=2)  # same order as A
    write_table(tmp_path, "model-c", "pg19", costs(PRESSES[::-1]), seed=3)  # the reverse
    write_table(tmp_path, "model-a", "wikitext", costs(PRESSES), seed=4)
    return tmp_path


def test_tau_per_ratio_for_every_pair_of_models_and_of_datasets(results):
    table = transfer.agreement_table(results, samples=500)
    models = table[table["comparison"] == "models"]
    assert set(zip(models["a"], models["b"], strict=True)) == {("model-a", "model-b"), ("model-a", "model-c"),
                                                               ("model-b", "model-c")}  # fmt: skip
    assert sorted(models["compression_ratio"].unique()) == [0.5, 0.7]
    same = models[(models["a"] == "model-a") & (models["b"] == "model-b")]
    assert (same["tau"] == 1.0).all() and (same["tau_low"] > 0.5).all()
    reverse = models[models["b"] == "model-c"]
    assert (reverse["tau"] == -1.0).all() and (reverse["tau_high"] < -0.5).all()
    datasets = table[table["comparison"] == "datasets"]
    assert list(datasets["shared"].unique()) == ["model-a"] and (datasets["tau"] == 1.0).all()
    assert (table["n_presses"] == len(PRESSES)).all() and (table["n_windows_a"] == 12).all()


def test_noise_larger_than_the_gaps_gives_a_wide_interval(tmp_path):
    write_table(tmp_path, "a", "pg19", costs(PRESSES, step=0.001), noise=0.3, seed=1)
    write_table(tmp_path, "b", "pg19", costs(PRESSES, step=0.001), noise=0.3, seed=2)
    row = transfer.agreement_table(tmp_path, samples=500).iloc[0]
    assert row["tau_high"] - row["tau_low"] > 1.0


def test_bootstrap_is_seeded_and_each_table_draws_its_own_windows(results):
    first = transfer.agreement_table(results, seed=3, samples=300)
    again = transfer.agreement_table(results, seed=3, samples=300)
    pd.testing.assert_frame_equal(first, again)
    a = transfer.table_seed(0, "model-a", "pg19").generate_state(2)
    b = transfer.table_seed(0, "model-b", "pg19").generate_state(2)
    assert not np.array_equal(a, b)


def test_precisions_are_compared_separately_and_missing_means_float(tmp_path):
    write_table(tmp_path, "a", "pg19", costs(PRESSES), seed=1)  # written before precisions: no kv_quant column
    write_table(tmp_path, "b", "pg19", costs(PRESSES), seed=2, kv_quant="none")
    table = transfer.agreement_table(tmp_path, samples=200)
    assert set(table["kv_quant"]) == {"none"} and len(table) == 2


def test_best_only_where_the_interval_separates_it(tmp_path):
    clear = {("knorm", 0.5): 0.01, ("snapkv", 0.5): 0.5, ("tova", 0.5): 0.6}
    close = {("knorm", 0.5): 0.100, ("snapkv", 0.5): 0.101, ("tova", 0.5): 0.6}
    write_table(tmp_path, "clear", "pg19", clear, seed=1)
    write_table(tmp_path, "close", "pg19", close, noise=0.05, seed=2)
    groups = transfer.all_groups(tmp_path, samples=500)
    found = transfer.conclusions(groups).set_index("model")
    assert found.loc["clear", "best"] == "knorm" and found.loc["clear", "separated"]
    assert not found.loc["close", "separated"] and found.loc["close", "tied"] == ["snapkv"]
    lines = "\n".join(transfer.conclusion_lines(transfer.conclusions(groups)))
    assert "best: **knorm**" in lines and "no single best: knorm leads" in lines


def test_section_and_chart(results):
    section = transfer.agreement_section(results, samples=200)
    assert "Kendall" in section and "model-a vs model-c" in section and "**model-b**" in section
    deltas = transfer.delta_table(transfer.all_groups(results, samples=200))
    assert set(deltas.columns) >= {"model", "dataset", "method", "ppl_delta", "ci_low", "ci_high"}
    assert (deltas["ci_low"] <= deltas["ppl_delta"]).all() and (deltas["ppl_delta"] <= deltas["ci_high"]).all()
    spec = transfer.transfer_chart(deltas, "model-a", "model-c", "pg19").to_dict()
    assert len(spec["hconcat"]) == 2  # one panel per ratio
    assert len(spec["hconcat"][0]["layer"]) == 4  # diagonal, two interval bars, points
    with pytest.raises(ValueError, match="no press measured on both"):
        transfer.transfer_chart(deltas, "model-a", "nobody", "pg19")
    assert transfer.agreement_section(results.parent / "empty-nothing-here", samples=10) == ""


def test_transfer_analysis_imports_without_torch():
    code = "import kvlib.analysis.transfer, sys; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow  # about 35 s on 2 busy cores: five small perplexity runs
def test_a_third_model_is_one_preset_entry_and_the_agreement_covers_all_three(tmp_path, data_dir, smollm2_tokenizer):
    """Three tiny models of different families (one hybrid) as `models` entries of a preset: the same planning
    (study_jobs) and measuring code as the offline study, then the agreement table for every pair of models."""
    from dataclasses import replace

    from tiny_models import CONFIGS
    from transformers import AutoModelForCausalLM

    from kvlib import pipeline, study

    shares = []
    for seed, arch in enumerate(("gpt_neox", "llama", "gemma3")):
        config = CONFIGS[arch]()
        config.vocab_size = len(smollm2_tokenizer)  # the study reads real text through the saved tokenizer
        model = AutoModelForCausalLM.from_config(config)
        folder = tmp_path / "models" / f"tiny-{arch}"
        model.save_pretrained(folder)
        smollm2_tokenizer.save_pretrained(folder)
        shares.append(pipeline.ModelShare(str(folder), settings={"seed": seed}))
    shares[2].grid = {"datasets": ["pg19"], "sweeps": {"latency": None}}  # a share may be smaller than the others'
    # A variant plans the baseline the main grid measures too: the run's cell count holds it once.
    shares[0].grid = {"variants": [{"kind": "ppl", "datasets": ["pg19"], "methods": ["knorm"], "ratios": [0.5],
                                    "prefill_chunk": 64}]}  # fmt: skip
    settings = study.Settings(model="", data_dir=str(data_dir), max_length=128, max_samples=3, n_ppl=3,
                              pg19_max_chars=50_000, output_dir=str(tmp_path / "out"))  # fmt: skip
    preset = pipeline.Preset(settings, methods=["knorm", "streaming_llm", "random"], ratios=[0.5], models=shares)

    prepare, measure, _ = pipeline.study_jobs(preset, settings, tmp_path / "out")
    assert {job.target.parent.parent.name for job in prepare} == {"tiny-gpt_neox", "tiny-llama", "tiny-gemma3"}
    assert len(prepare) == 5 and all(job.label.startswith("tiny-") for job in measure)
    (variant,) = [job for job in measure if job.target.name.startswith("variant")]
    assert variant.pending == 1  # knorm read in chunks; its uncompressed baseline is the main grid's
    timed = {job.label.split("/")[0] for job in measure if job.notebook == "03_latency.ipynb"}
    assert timed == {"tiny-gpt_neox", "tiny-llama"}  # None leaves a kind out of a model's share
    for model_preset, model_settings in pipeline.model_runs(preset, settings):
        for dataset in model_preset.datasets:
            study.run(replace(model_settings, dataset=dataset), model_preset.methods, model_preset.ratios, ["ppl"],
                      log=lambda line: None)  # fmt: skip

    table = transfer.agreement_table(tmp_path / "out", samples=100)
    models = table[table["comparison"] == "models"]
    pairs = {(row.shared, row.a, row.b) for row in models.itertuples()}
    assert pairs == {("pg19", "tiny-gemma3", "tiny-gpt_neox"), ("pg19", "tiny-gemma3", "tiny-llama"),
                     ("pg19", "tiny-gpt_neox", "tiny-llama"), ("wikitext", "tiny-gpt_neox", "tiny-llama")}  # fmt: skip
    assert (models["n_presses"] == 3).all() and models["tau"].between(-1, 1).all()
    datasets = table[table["comparison"] == "datasets"]
    assert set(datasets["shared"]) == {"tiny-gpt_neox", "tiny-llama"}


def test_offline_preset_compares_two_models_on_shared_ratios_and_datasets():
    """Each model's share must overlap the others' where the agreement is computed: Gemma's perplexity ratios and
    datasets are among SmolLM2's, and its presses are all of them."""
    from kvlib import pipeline, study

    preset = pipeline.presets()["offline"]
    runs = pipeline.model_runs(preset, preset.settings)
    (smollm2, smollm2_settings), (gemma, gemma_settings) = runs
    assert [smollm2_settings.model, gemma_settings.model] == ["smollm2", "gemma3-270m"]
    assert set(gemma.ratios) <= set(smollm2.ratios) and set(gemma.datasets) == set(smollm2.datasets)
    assert gemma.methods == smollm2.methods == list(study.DEFAULT_METHODS)
    assert "scaling" not in gemma.sweeps and gemma_settings.n_ppl == smollm2_settings.n_ppl
    assert gemma.sweeps["latency"] is None  # a press prunes 3 of its 18 layers: no decode gain to time
