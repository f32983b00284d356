import pytest

from megatron_prime.config import ConfigError, config_from_dict, load_config, validate, validate_parallel
from megatron_prime.training.validation import gpus_per_node, validate_run
from tests.helpers import make_tiny_hf


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("parallel:\n  tp: 2\nalgorithm:\n  beta: 0.1\noptim:\n  policy:\n    lr: 1.0e-6\n")
    cfg = load_config(str(path), ["parallel.pp=2", "algorithm.estimator=rloo", "data.train_files=a.parquet",
                                  "optim.prm.lr=3e-6"])
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert cfg.algorithm.beta == 0.1 and cfg.algorithm.estimator == "rloo"
    assert cfg.optim.policy.lr == 1e-6 and cfg.optim.prm.lr == 3e-6  # "3e-6" is a string to PyYAML
    assert cfg.data.train_files == ["a.parquet"]


def test_ints_widen_to_floats_but_not_the_reverse():
    assert config_from_dict({"algorithm": {"beta": 1}}).algorithm.beta == 1.0
    with pytest.raises(ConfigError, match=r"parallel.tp.*0.5.*int"):
        config_from_dict({"parallel": {"tp": 0.5}})


@pytest.mark.parametrize(
    "override, message",
    [
        ("parallel.tq=2", r"unknown config key 'parallel.tq'.*allowed keys here: cp, distributed_optimizer"),
        ("rollout.engine=tgi", r"rollout.engine.*'tgi'.*one of 'hf', 'sglang', 'vllm'"),
        ("model.dtype=float64", r"model.dtype"),
        ("train.steps=many", r"train.steps.*'many'.*int"),
        ("parallel", r"expected KEY=VALUE"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, [override])


def test_validate_names_key_value_and_rule():
    with pytest.raises(ConfigError, match=r"algorithm.filter_low/filter_high.*\(0.9, 0.2\)"):
        validate(config_from_dict({}, ["algorithm.filter_low=0.9", "algorithm.filter_high=0.2"]))
    with pytest.raises(ConfigError, match=r"train.mini_batch_responses.*must divide"):
        validate(config_from_dict({}, ["train.prompts_per_step=3", "train.mini_batch_responses=8"]))


def test_parallel_layout_checked_against_model(tmp_path):
    make_tiny_hf("qwen2", str(tmp_path / "m"))  # 4 heads, 2 KV groups, 2 layers
    base = [f"model.hf_path={tmp_path / 'm'}"]
    validate_run(config_from_dict({}, base + ["parallel.tp=2", "parallel.pp=2", "train.prompts_per_step=4",
                                                    "train.mini_batch_responses=16"]),
                 world_size=4)
    with pytest.raises(ConfigError, match=r"parallel.tp.*= 4.*KV groups \(2\); try one of 1, 2"):
        validate_run(config_from_dict({}, base + ["parallel.tp=4"]), world_size=None)
    with pytest.raises(ConfigError, match=r"parallel.pp.*= 3.*layers \(2\); try one of 1, 2"):
        validate_run(config_from_dict({}, base + ["parallel.pp=3"]), world_size=None)
    with pytest.raises(ConfigError, match=r"world size \(6\)"):
        validate_run(config_from_dict({}, base + ["parallel.tp=2", "parallel.pp=2"]), world_size=6)
    with pytest.raises(ConfigError, match=r"attention heads \(4\)"):
        validate_parallel(config_from_dict({}, ["parallel.tp=3"]).parallel, num_layers=2, num_heads=4, num_kv_heads=4)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.estimator=vtrace"], r"algorithm.estimator.*'vtrace'.*one of grpo, prime_official, prime_rloo"),
        (["algorithm.estimator=gae"], r"PPO with a learned value model \(GAE\) is not offered"),
        (["algorithm.process_return=min", "algorithm.gamma=0.9"], r"algorithm.process_return.*needs algorithm.gamma=1"),
        (["algorithm.process_return=max"], r"algorithm.process_return.*one of 'sum', 'min'"),
        (["rollout.mode=remote"], r"rollout.remote_urls"),
        (["rollout.mode=remote", "rollout.remote_urls=[http://h:30000]"], r"rollout.engine.*'hf'.*use rollout.engine=sglang"),
        (["rollout.tp=2"], r"rollout.tp.*= 2.*hf engine runs on one device"),
        (["rollout.engine=sglang", "rollout.tp=4"], r"rollout.tp.*= 4.*must divide the world size \(6\)"),
        (["rollout.max_restarts=-1"], r"rollout.max_restarts"),
    ],
)
def test_rollout_and_estimator_checked_up_front(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_run(config_from_dict({}, overrides + ["train.prompts_per_step=6", "train.mini_batch_responses=24"]),
                     world_size=6)


@pytest.mark.parametrize("overrides", [
    ["rollout.engine=sglang", "rollout.tp=2"],
    ["rollout.engine=vllm", "rollout.tp=3"],
    ["rollout.engine=sglang", "rollout.mode=remote", "rollout.remote_urls=[http://h:30000]", "rollout.tp=8"],
])
def test_rollout_layouts_accepted(overrides):
    validate_run(config_from_dict({}, overrides + ["train.prompts_per_step=6", "train.mini_batch_responses=24"]),
                 world_size=6, ranks_per_node=6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.lora.rank=-1"], r"model.lora.rank.*must be >= 0"),
        (["model.lora.prm_rank=8"], r"model.lora.prm_rank.*needs model.lora.rank > 0"),
        (["model.lora.rank=8", "model.lora.prm_rank=0"], r"model.lora.prm_rank.*must be >= 1"),
        (["model.lora.rank=8", "model.lora.alpha=0"], r"model.lora.alpha.*must be > 0"),
        (["model.lora.rank=8", "model.lora.targets=[]"], r"model.lora.targets.*at least one"),
        (["model.lora.rank=8", "model.lora.targets=[q_proj]"], r"model.lora.targets\[0\].*'q_proj'.*'linear_qkv'"),
        (["model.lora.rank=8", "model.ref_path=/some/ref"], r"model.ref_path.*one shared base, model.hf_path"),
        (["model.lora.rank=8", "model.prm_hf_path=/x"], r"model.prm_hf_path.*must be unset"),
        (["rollout.lora_sync=adapter"], r"rollout.lora_sync.*needs model.lora.rank > 0"),
        (["model.lora.rank=8", "rollout.lora_sync=adapter"], r"rollout.lora_sync.*hf engine takes full weights"),
        (["model.lora.rank=8", "rollout.lora_sync=adapter", "rollout.engine=sglang", "rollout.mode=remote",
          "rollout.remote_urls=[http://h:1]"], r"rollout.lora_sync.*colocated engines only"),
    ],
)
def test_lora_settings_checked_up_front(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_run(config_from_dict({}, overrides), world_size=1)


def test_lora_settings_accepted():
    cfg = config_from_dict({}, ["model.lora.rank=16", "model.lora.targets=[linear_fc1,linear_fc2]",
                                "rollout.engine=vllm", "rollout.lora_sync=adapter"])
    validate_run(cfg, world_size=1)
    assert cfg.model.lora.ranks == {"policy": 16, "prm": 16}
    assert config_from_dict({}, ["model.lora.rank=16", "model.lora.prm_rank=8"]).model.lora.ranks["prm"] == 8


def test_config_imports_nothing_of_ours():
    """config is the bottom layer: importing it imports no other megatron_prime module but errors
    (the user-error base, which itself imports nothing of ours)."""
    import subprocess
    import sys

    code = ("import sys, megatron_prime.config; "
            "print(sorted(m for m in sys.modules if m.startswith('megatron_prime') and m != 'megatron_prime.config'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['megatron_prime', 'megatron_prime.errors']"


# Layouts refused before they go wrong (each names the setting and what would work).
TINY = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2}


@pytest.mark.parametrize(
    "overrides, world_size, per_node, message",
    [
        (["parallel.tp=2", "parallel.pp=2"], 6, None, r"tp\*pp\*cp = 4 must divide the world size \(6\)"),
        (["parallel.tp=4"], 4, None, r"parallel.tp' = 4.*KV groups \(2\); try one of 1, 2"),
        (["parallel.tp=3"], 3, None, r"parallel.tp' = 3.*attention heads \(4\); try one of 1, 2"),
        (["rollout.engine=sglang", "rollout.tp=16"], 16, 8,
         r"rollout.tp' = 16.*GPUs of one node: must divide the GPUs per node \(8\); try one of 1, 2, 4, 8"),
        (["rollout.engine=sglang", "rollout.tp=3", "train.prompts_per_step=6", "train.mini_batch_responses=24"], 24, 8,
          r"rollout.tp' = 3.*must divide the GPUs per node \(8\)"),
        (["rollout.engine=vllm", "rollout.tp=4"], 6, None, r"rollout.tp' = 4.*must divide the world size \(6\)"),
        (["parallel.cp=2"], 2, None, r"parallel.cp' = 2.*does not split sequences"),
        (["parallel.ep=2"], 2, None, r"parallel.ep' = 2.*must be 1 for a dense model"),
        (["train.prompts_per_step=3", "train.mini_batch_responses=4"], 8, None,
         r"train.prompts_per_step' = 3.*12 responses must split evenly over the 8 data-parallel ranks"
         r".*try prompts_per_step a multiple of 2"),
        (["train.prompts_per_step=16", "train.mini_batch_responses=4"], 8, None,
         r"train.mini_batch_responses' = 4.*over the 8 data-parallel ranks \(world size 8 / \(tp 1 x pp 1\)\); "
         r"try 8, 16, 32, 64"),
        (["checkpoint.interval=0"], 1, None, r"checkpoint.interval' = 0.*must be >= 1"),
        (["model.fp8=e4m3"], 1, None, r"model.fp8' = 'e4m3'.*has not run on a GPU yet.*model.dtype=bf16"),
        (["model.fp8=hybrid", "model.transformer_engine='on'"], 1, None, r"model.fp8' = 'hybrid'"),
    ],
)
def test_layouts_refused_before_they_go_wrong(overrides, world_size, per_node, message):
    cfg = config_from_dict({}, overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size, model_shape=_Shape(**TINY), gpus_per_node=per_node)


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (["parallel.ep=3"], 6, r"parallel.ep' = 3.*must divide the number of experts \(4\); try one of 1, 2, 4"),
        (["parallel.ep=4", "parallel.tp=2", "parallel.sequence_parallel=true"], 4, r"parallel.ep' = 4.*must divide DP = 2"),
        (["parallel.tp=2"], 2, r"parallel.sequence_parallel.*must be true for a mixture-of-experts model at "
                               r"parallel.tp=2"),
        (["model.lora.rank=8"], 2, r"model.lora.targets.*experts, which take no LoRA.*leave out linear_fc1"),
    ],
)
def test_expert_layouts_refused(overrides, world_size, message):
    with pytest.raises(ConfigError, match=message):
        validate(config_from_dict({}, overrides), world_size, model_shape=_Shape(**TINY, num_experts=4))
    validate(config_from_dict({}, ["parallel.ep=2", "model.lora.rank=8", "model.lora.targets=[linear_qkv,linear_proj]"]),
             2, model_shape=_Shape(**TINY, num_experts=4))


@pytest.mark.parametrize("overrides, experts, message", [
    (["rollout.engine=hf"], 4, r"replay_engine_routes.*needs rollout.engine=sglang"),
    (["rollout.engine=vllm"], 4, r"replay_engine_routes.*needs rollout.engine=sglang.*model runner V2"),
    (["rollout.engine=sglang", "algorithm.routing_replay=false"], 4, r"needs algorithm.routing_replay=true"),
    (["rollout.engine=sglang"], 0, r"replay_engine_routes.*for mixture-of-experts models; this model is dense"),
])
def test_engine_routes_need_sglang_replay_and_experts(overrides, experts, message):
    cfg = config_from_dict({}, ["algorithm.replay_engine_routes=true", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, 1, model_shape=_Shape(**TINY, num_experts=experts))
    validate(config_from_dict({}, ["algorithm.replay_engine_routes=true", "rollout.engine=sglang"]), 1,
             model_shape=_Shape(**TINY, num_experts=4))


def test_sft_batch_split_over_data_parallel_ranks():
    cfg = config_from_dict({}, ["sft.batch_size=6", "train.prompts_per_step=4", "train.mini_batch_responses=16"])
    validate(cfg, 4)  # PRIME's batch splits; SFT's is not checked for a PRIME run
    with pytest.raises(ConfigError, match=r"sft.batch_size' = 6.*4 data-parallel ranks.*multiple of 4"):
        validate(cfg, 4, stage="sft")
    validate(config_from_dict({}, ["sft.batch_size=8"]), 4, stage="sft")


def test_accepted_layouts():
    validate(config_from_dict({}, ["parallel.tp=2", "parallel.pp=2", "train.prompts_per_step=16",
                                   "train.mini_batch_responses=32", "rollout.engine=sglang", "rollout.tp=4"]),
             16, model_shape=_Shape(**TINY), gpus_per_node=8)
    # remote servers are not bound to the trainer's nodes
    validate(config_from_dict({}, ["rollout.engine=sglang", "rollout.mode=remote",
                                   "rollout.remote_urls=[http://h:30000]", "rollout.tp=16"]), 8, gpus_per_node=8)


def test_gpus_per_node_from_the_launcher():
    assert gpus_per_node({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert gpus_per_node({"SLURM_NTASKS_PER_NODE": "8"}) == 8
    assert gpus_per_node({"SLURM_TASKS_PER_NODE": "8(x4)"}) == 8
    assert gpus_per_node({}) is None


class _Shape:
    def __init__(self, num_layers, num_heads, num_kv_heads, num_experts=0):
        self.num_layers, self.num_heads, self.num_kv_heads = num_layers, num_heads, num_kv_heads
        self.num_experts = num_experts
