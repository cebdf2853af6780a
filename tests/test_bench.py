"""The benchmark scripts work: ``privatune bench.run --quick`` runs all eight
benchmarks end to end (tiny BERT and Llama, tiny data, real Opacus, peft and Flower) and
writes JSON of the expected shape with sane values. The numbers themselves are not checked:
benchmarks are scripts, not timed tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from privatune.common.config import resolve
from privatune.simulations.bench import causal_lm as bench_causal_lm
from privatune.simulations.bench import gpu as bench_gpu
from privatune.simulations.bench import grid as bench_grid
from privatune.simulations.bench import lora as bench_lora
from privatune.simulations.bench import overhead as bench_overhead
from privatune.simulations.bench import run as bench
from privatune.simulations.bench import utility as bench_utility
from privatune.simulations.scenario import load_scenario

pytestmark = pytest.mark.benchmark


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    printed: list[str] = []
    assert bench.main(["--quick", "--out", str(out)], echo=printed.append) == 0
    return out, "\n".join(printed)


def load(out: Path, name: str) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    assert data["benchmark"] == name and data["quick"] is True
    assert data["machine"]["cpu_count"] >= 1 and data["wall_seconds"] > 0
    return data


def test_writes_every_benchmark_plots_and_a_table(quick_run):
    out, printed = quick_run
    for name in bench.BENCHMARKS:
        assert (out / f"{name}.json").is_file()
    assert (out / "overhead.png").stat().st_size > 0
    assert (out / "utility.png").stat().st_size > 0
    assert (out / "aggregation.png").stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert summary.strip() in printed
    headings = (
        "DP overhead",
        "Traffic",
        "Simulation scale",
        "Privacy-utility",
        "LoRA-aware",
        "DP-SGD on a GPU",
        "Causal-LM DP step",
        "LoRA on the top layers",
        "LoRA against the probe",
    )
    for heading in headings:
        assert f"### {heading}" in summary


def test_lora_times_the_top_layers_against_all_layers_in_one_run(quick_run):
    data = load(quick_run[0], "lora")
    assert set(data["paths"]) == set(bench_lora.PATHS)
    reference = data["paths"]["all layers"]
    assert reference["epoch_ratio_to_all_layers"] == 1.0
    for cell in data["paths"].values():
        assert all(t > 0 for t in cell["epoch_seconds"]) and cell["input_seconds"] > 0
    assert (quick_run[0] / "lora.png").stat().st_size > 0


def test_overhead_compares_dp_modes_to_plain_steps(quick_run):
    data = load(quick_run[0], "overhead")
    (cell,) = data["cells"]
    assert set(cell["modes"]) == set(bench_overhead.MODES)
    plain = cell["modes"]["plain"]
    assert plain["time_ratio"] == 1.0 and plain["step_peak_mib"] >= 0
    assert len(plain["step_seconds"]) == data["grid"]["reps"] * data["grid"]["steps"]
    hooks = cell["modes"]["hooks"]  # the mode client/train.py uses must work
    assert hooks["step_seconds_median"] > 0 and hooks["time_ratio"] > 0
    for mode in cell["modes"].values():
        assert "error" in mode or mode["time_ratio"] > 0
    assert data["best_mode"] in data["worst_time_ratio"]


def test_gpu_benchmark_times_every_mode(quick_run, tmp_path):
    data = load(quick_run[0], "gpu")
    (cell,) = data["cells"]  # quick: the tiny BERT on the CPU, fp32 only
    assert set(cell["modes"]) == set(bench_gpu.MODES)
    assert cell["modes"]["plain"]["time_ratio"] == 1.0
    for mode in ("plain", "hooks", "fused"):  # the modes client/train.py offers must work
        assert cell["modes"][mode]["samples_per_second"] > 0
    assert cell["best_dp_mode"] in cell["modes"]
    assert (quick_run[0] / "gpu.png").stat().st_size > 0
    if not torch.cuda.is_available():  # the full run says why it measured nothing
        full = bench_gpu.run(quick=False, out_dir=tmp_path)
        assert full["skipped"] and "Not measured" in bench_gpu.table(full)


def test_causal_lm_benchmark_times_plain_hooks_and_fused_steps(tmp_path):
    """``--only causal-lm`` with its size options, alone: the tiny Llama's step in each
    mode, and the DP modes really ran DP-SGD (every step is on their accountant)."""
    printed: list[str] = []
    flags = ["--causal-lm-batch", "3", "--causal-lm-steps", "1"]
    argv = ["--quick", "--only", "causal-lm", "--out", str(tmp_path), *flags]
    assert bench.main(argv, echo=printed.append) == 0
    data = load(tmp_path, "causal-lm")
    grid = data["grid"]
    assert grid == {**bench_causal_lm.QUICK, "batch_size": 3, "steps": 1}
    (cell,) = data["cells"]  # quick: the CPU, fp32 only
    modes = cell["modes"]
    assert set(modes) == set(bench_causal_lm.MODES) and modes["plain"]["time_ratio"] == 1.0
    for m in modes.values():  # on the CPU, the step's CPU time is there too
        assert m["samples_per_second"] == pytest.approx(3 / m["step_seconds_median"], rel=1e-2)
        assert m["tokens_per_second"] == pytest.approx(
            m["samples_per_second"] * grid["seq_len"], rel=1e-2
        )
        assert m["step_cpu_seconds_median"] > 0 and m["cpu_ratio"] > 0
    assert modes["plain"]["mechanism"] is None
    steps = grid["warmup"] + grid["steps"]
    for mode in ("hooks", "fused"):
        assert modes[mode]["mechanism"] == {
            "noise_multiplier": 1.0,
            "sample_rate": 1.0,
            "steps": steps,
        }
    ratio = modes["fused"]["step_seconds_median"] / modes["hooks"]["step_seconds_median"]
    assert cell["fused_over_hooks"] == pytest.approx(ratio, rel=1e-2)
    assert data["cpu_torch_threads"] == 1
    assert "### Causal-LM DP step (tiny random Llama" in "\n".join(printed)


def test_traffic_ratio_comes_from_measured_message_bytes(quick_run):
    data = load(quick_run[0], "traffic")
    per = data["per_client_per_round"]
    records = data["record_bytes"]
    # per client and round: the adapter goes out twice (train, evaluate) and back once
    assert (
        2 * records["adapter_float32"] < per["bytes_sent"] < 2 * records["adapter_float32"] + 4096
    )
    assert records["adapter_float32"] < per["bytes_received"] < records["adapter_float32"] + 4096
    assert per["lora_total"] == pytest.approx(per["bytes_sent"] + per["bytes_received"])
    assert records["adapter_float16"] < records["adapter_float32"] < records["full_model_float32"]
    assert data["ratio_full_to_lora"] == pytest.approx(
        per["full_fedavg_total"] / per["lora_total"], rel=1e-2
    )
    assert data["ratio_full_to_lora_float16"] > data["ratio_full_to_lora"] > 1
    # float16 transport, measured on its own federation: the adapter records shrink by half
    # their tensor bytes in both directions, the rest of the messages stays
    tensors = records["adapter_float32"] - records["adapter_float16"]
    assert per["float16_bytes_sent"] == pytest.approx(per["bytes_sent"] - 2 * tensors, abs=64)
    assert per["float16_bytes_received"] == pytest.approx(per["bytes_received"] - tensors, abs=64)
    assert 0 < data["float16_effect"]["final_adapter_relative_difference"] < 0.05


def test_scale_measures_rounds_memory_and_overhead_share(quick_run):
    data = load(quick_run[0], "scale")
    (size,) = data["sizes"]
    assert size["status"] == "ok" and size["institutions"] == data["grid"]["sizes"][0]
    assert size["peak_rss_mib"] > 0 and size["rounds_per_minute"] > 0
    (round_,) = size["rounds"]
    assert round_["clients"] == size["sampled_per_round"]
    assert 0 < round_["busiest_worker_train_seconds"] < round_["seconds"]
    assert 0 < round_["outside_training_share"] < 1


def test_scale_splits_the_default_scenarios_round_time(quick_run):
    scenario = load(quick_run[0], "scale")["default_scenario"]
    assert scenario["status"] == "ok" and scenario["scenario"] == "hospitals-small"
    (round_,) = scenario["rounds"]
    assert round_["clients"] == load_scenario("hospitals-small").institutions  # all of them
    assert round_["central_eval_seconds"] > 0  # timed by the server, read from metrics.jsonl
    parts = scenario["shares"]
    assert list(parts) == ["client training", "client evaluation", "central evaluation", "the rest"]
    assert all(0 <= p < 1 for p in parts.values()) and sum(parts.values()) == pytest.approx(
        1, abs=2e-3
    )  # shares rounded to 3 places
    assert parts["client training"] > 0 and parts["the rest"] > 0


def test_utility_reports_accuracy_and_f1_per_setting(quick_run):
    data = load(quick_run[0], "utility")
    names = [s["setting"] for s in data["settings"]]
    assert names == ["centralised", "centralised DP eps 8", "federated iid DP eps 8"]
    for s in data["settings"]:
        assert 0 <= s["accuracy"] <= 1 and 0 <= s["macro_f1"] <= 1
    assert data["settings"][0]["epsilon"] is None
    assert 0 < data["majority_class"]["accuracy"] <= 1  # the learned-nothing line
    guess = data["frequency_guess"]  # the learned-nothing-from-the-text line
    assert guess["accuracy"] <= data["majority_class"]["accuracy"]
    assert guess["macro_f1"] == pytest.approx(1 / 3)  # every class occurs in the test sample
    for s in data["settings"][1:]:
        assert 0 < s["epsilon"] <= 8.0 + 1e-6
    # the federation's canary twin: a measured lower bound beside the ledgers' claim
    audit = data["settings"][-1]["measured"]
    assert audit["canaries"] == bench_utility.QUICK["canaries"]
    assert 0 < audit["claimed_epsilon"] <= 8.0 + 1e-6
    assert 0 <= audit["epsilon_lower"] <= audit["claimed_epsilon"]


def test_federated_settings_without_dp_let_clients_train(tmp_path):
    """Without DP a client's epsilon is infinite; a finite budget would make it refuse."""
    scenario = load_scenario("hospitals-small")
    flats = {
        eps: bench_grid.setting_flat(tmp_path, tmp_path / "run", scenario, eps, 2, False, {})
        for eps in (None, 3.0)
    }
    plain, private = (resolve(flats[eps]) for eps in (None, 3.0))
    assert not plain.dp.enabled and plain.privacy.allow_non_private
    assert private.dp.enabled and private.dp.target_epsilon == 3.0
    assert private.privacy.max_epsilon >= 3.0 and plain.federation.rounds == 2


def test_rejects_an_unknown_benchmark():
    with pytest.raises(SystemExit):
        bench.main(["--only", "speed"])


def test_aggregation_compares_the_three_modes_on_measured_bytes(quick_run):
    data = load(quick_run[0], "aggregation")
    by_mode = {s["mode"]: s for s in data["settings"]}
    assert set(by_mode) == {"fedavg", "ffa", "exact"}
    for s in data["settings"]:
        assert 0 <= s["macro_f1"] <= 1 and 0 < s["epsilon"] <= 8.0 + 1e-6
    # FFA sends B and the head only: fewer bytes than fedavg's A, B and head
    received = {mode: s["bytes_received_per_round"] for mode, s in by_mode.items()}
    assert received["ffa"] < received["fedavg"]
    assert 0 <= by_mode["exact"]["mean_truncation_energy_lost"] < 1
    assert by_mode["fedavg"]["mean_truncation_energy_lost"] is None


@pytest.mark.parametrize("name", ["hospitals-small-probe", "banks-small-probe"])
def test_a_probe_grid_trains_the_probe_on_the_grids_own_split(tmp_path, name):
    flat = bench_grid.setting_flat(
        tmp_path / "data-iid", tmp_path / "run", load_scenario(name), 8.0, None, False, {}
    )
    cfg = resolve(flat)
    assert cfg.data.dir == str(tmp_path / "data-iid")  # not the scenario's data/<name> files
    assert cfg.data.test_path == str(tmp_path / "data-iid" / "test.csv")
    assert (cfg.train.trainable, cfg.model.pooling) == ("head", "mean")


def test_the_utility_table_compares_each_run_with_its_own_split_without_dp(tmp_path):
    def run(name, f1):
        return {"setting": name, "accuracy": 0.5, "macro_f1": f1, "epsilon": None, "rounds": 3}

    result = {
        "scenario": "medical (MedMCQA)",
        "grid": {"partitions": ("iid", "scenario")},
        "rounds": 3,
        "delta": 1e-5,
        "settings": [
            run("centralised", 0.6),
            run("federated iid", 0.5),
            run("federated iid DP eps 8", 0.45),
            run("federated scenario", 0.4),
            {**run("federated scenario DP eps 1", 0.2), "measured": {"epsilon_lower": 0.12}},
            run("federated scenario DP eps 8", 0.3),
        ],
        "majority_class": {"accuracy": 0.3, "macro_f1": 0.05},
        "frequency_guess": {"accuracy": 0.1, "macro_f1": 0.1},
        "target_share": 0.9,
    }
    shares = bench_utility.shares(result)
    assert shares["federated iid DP eps 8"] == pytest.approx((0.9, 4.5))
    assert shares["federated scenario DP eps 8"] == pytest.approx((0.75, 3.0))
    shown = bench_utility.table(result)
    # the last column: the measured epsilon
    assert (
        "| federated non-IID (the scenario's split) DP eps 1 "
        "| 0.500 | 0.200 | 0.50 | 2.0 | - | 0.12 |" in shown
    )
    bench_utility.plot(result, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
