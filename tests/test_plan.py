"""`dynalign plan`: the memory planner (dynalign/plan.py). Pure arithmetic: no Ray, no engines."""

from __future__ import annotations

import pytest

from dynalign.config import ConfigError, load_config
from dynalign.plan import learner_rank_memory, model_of, plan
from tests.conftest import REPO

RUN_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
# The GPU each config's header names, in GiB (nvidia-smi totals): the smallest one it claims to fit.
DOCUMENTED_GPU_GIB = {"gpu_1x.yaml": 22.5,  # L4 / A10G, "24 GB"
                      "gpu_8x.yaml": 79.6, "paper_gpt-oss-20b_2x8.yaml": 79.6,  # H100 80 GB
                      "paper_gpt-oss-20b_lora_1x8.yaml": 79.6}


def config_for(name: str, tiny_model_path: str, *overrides: str):
    """configs/NAME with the tiny model where it names the tiny model (built per session, not in outputs/)."""
    config = load_config(REPO / "configs" / name, overrides)
    if config.model.path == "outputs/tiny-model":
        config = load_config(REPO / "configs" / name, [f"model.path={tiny_model_path}", *overrides])
    return config


def test_every_run_config_is_covered():
    assert {"smoke.yaml", "smollm2_cpu.yaml", "gpu_1x.yaml", "gpu_8x.yaml"} <= set(RUN_CONFIGS)


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_every_config_fits_its_documented_hardware(name, tiny_model_path):
    config = config_for(name, tiny_model_path)
    result = plan(config, gpu_memory_gib=DOCUMENTED_GPU_GIB.get(name), host_memory_gib=None)
    assert result.refusal is None, result.refusal
    result.check()
    assert result.rows and all(row.fits for row in result.rows)
    roles = {row.role for row in result.rows}
    assert {"rollout engine", "learner rank"} <= roles
    assert sum(row.units for row in result.rows if row.role == "learner rank") == config.learner.num_ranks
    if name in DOCUMENTED_GPU_GIB:
        assert all(row.devices for row in result.rows) and result.host_needed > 0
    else:
        assert all(not row.devices for row in result.rows)


def test_lora_ranks_hold_gradients_and_optimizer_state_for_the_adapter_alone():
    """gpt-oss-20b, rank 16 on q, k, v, o: per layer 16 x ((2880 + 4096) x 2 + (2880 + 512) x 2)
    parameters, 24 layers: 7,962,624. A rank keeps the frozen base weights (ZeRO-3: its share) and
    gradients and Adam state for the adapter only; the engines stage only the adapter in a sync."""
    from dynalign.plan import lora_params

    lora = load_config(REPO / "configs/paper_gpt-oss-20b_lora_1x8.yaml")
    assert lora_params(lora) == 16 * 24 * ((2880 + 4096) * 2 + (2880 + 512) * 2) == 7_962_624
    full = load_config(REPO / "configs/paper_gpt-oss-20b_lora_1x8.yaml", ["learner.lora.rank=0"])
    assert lora_params(full) == 0
    with_lora, without = learner_rank_memory(lora), learner_rank_memory(full)
    assert with_lora["weights"] == pytest.approx(without["weights"], rel=1e-3)  # the frozen base stays
    assert with_lora["gradients"] * 1000 < without["gradients"] and with_lora["optimizer"] * 1000 < without["optimizer"]
    assert plan(lora, gpu_memory_gib=79.6, host_memory_gib=None).host_needed < 2**30  # an adapter, not 2 x 39 GiB


@pytest.mark.parametrize(("path", "expected"), [
    ("outputs/models/smollm2-135m-instruct", 134_515_008),  # resolves to configs/architectures/ if not fetched
    ("Qwen/Qwen2.5-7B-Instruct", 7.6e9),
    ("openai/gpt-oss-20b", 20.9e9),
])
def test_parameter_counts_match_the_real_models(path, expected):
    config = load_config(None, [f"model.path={path}"])
    arch = model_of(config)
    assert arch.counted == "meta device"
    if isinstance(expected, int):
        assert arch.params == expected and arch.tied
    else:
        assert abs(arch.params - expected) / expected < 0.02 and not arch.tied


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero_arithmetic(dtype):
    config = load_config(REPO / "configs/smollm2_cpu.yaml", [f"model.learner_dtype={dtype}"])
    p = model_of(config).params
    state = ("weights", "gradients", "optimizer")
    for ranks in (2, 4, 8):
        zero0 = learner_rank_memory(config, world_size=ranks, zero_stage=0, beta=0.0)
        zero3 = learner_rank_memory(config, world_size=ranks, zero_stage=3, beta=0.0)
        width = 4 if dtype == "float32" else 2
        # ZeRO-3 partitions all of it; a ZeRO optimizer also keeps an fp32 partition of the weights
        # (DeepSpeed does so in fp32 training too): 1/N of ZeRO-0 plus 4P/N for fp32.
        master = 4 * p if dtype == "float32" else 0
        assert abs(sum(zero3[k] for k in state) - (sum(zero0[k] for k in state) + master) / ranks) <= 3
        assert zero0["weights"] == zero0["gradients"] == p * width
        assert zero0["optimizer"] == p * (8 if dtype == "float32" else 12)
        # beta > 0: one reference copy per rank under ZeRO-0, 1/N of one under ZeRO-3
        assert learner_rank_memory(config, ranks, 0, 0.1)["total"] - zero0["total"] == p * width
        assert learner_rank_memory(config, ranks, 3, 0.1)["total"] - zero3["total"] == p * width // ranks
        zero1 = learner_rank_memory(config, world_size=ranks, zero_stage=1, beta=0.0)
        zero2 = learner_rank_memory(config, world_size=ranks, zero_stage=2, beta=0.0)
        assert zero1["optimizer"] == (zero0["optimizer"] + master) // ranks and zero1["gradients"] == zero0["gradients"]
        assert zero2["gradients"] == zero0["gradients"] // ranks and zero2["weights"] == zero0["weights"]
    # one rank runs ZeRO-1/2 as stage 0 (zero_stage_for)
    assert learner_rank_memory(config, 1, 2, 0.0) == learner_rank_memory(config, 1, 0, 0.0)
    memory = learner_rank_memory(config)
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")


def test_gradient_checkpointing_and_smaller_micro_batches_need_less():
    base = load_config(REPO / "configs/gpu_8x.yaml")
    without = load_config(REPO / "configs/gpu_8x.yaml", ["learner.gradient_checkpointing=false"])
    assert learner_rank_memory(without)["activations"] > learner_rank_memory(base)["activations"]


def test_a_config_that_cannot_fit_is_refused_in_one_line():
    config = load_config(REPO / "configs/gpu_8x.yaml")
    result = plan(config, gpu_memory_gib=16)
    assert result.refusal and "\n" not in result.refusal
    assert result.refusal.startswith(("rollout engine on GPU", "learner rank on GPU"))
    assert "rollout.gpu_memory_utilization" in result.refusal
    with pytest.raises(ConfigError, match="of 13.60 GiB"):
        result.check()
    # The learner alone too big: the message names the learner and the options that would fit it.
    shared = load_config(REPO / "configs/gpu_1x.yaml", ["rollout.sleep_while_learning=false"])
    refusal = plan(shared, gpu_memory_gib=22.5).refusal
    assert refusal.startswith("learner rank on GPU 0 needs ") and "rollout.sleep_while_learning=true" in refusal


def test_cpu_configs_are_checked_against_host_memory(tiny_model_path):
    config = config_for("smollm2_cpu.yaml", tiny_model_path)
    refusal = plan(config, host_memory_gib=2).refusal
    assert refusal and refusal.startswith(("rollout engine on host memory", "learner rank on host memory"))
    assert "\n" not in refusal and ("learner." in refusal or "rollout." in refusal)


def test_unknown_model_is_one_line():
    with pytest.raises(ConfigError, match="no config.json there and no architecture file"):
        model_of(load_config(None, ["model.path=nobody/no-such-model"]))


def test_cli_prints_the_table_and_exits_0_or_1(tiny_model_path, capsys):
    from dynalign.cli import main

    assert main(["plan", "--config", str(REPO / "configs/smoke.yaml"), f"model.path={tiny_model_path}"]) == 0
    out = capsys.readouterr().out
    assert "role" in out and "learner rank x2" in out and "rollout engine" in out
    assert out.strip().splitlines()[-1] == "fits"
    assert main(["plan", "--config", str(REPO / "configs/gpu_8x.yaml"), "--gpu-memory-gib", "16"]) == 1
    captured = capsys.readouterr()
    assert "NO" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dynalign: error: rollout engine on GPU 0-1 needs ")
    assert main(["plan", "--config", str(REPO / "configs/gpu_8x.yaml"), "--gpu-memory-gib", "-1"]) == 2
