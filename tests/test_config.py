import pytest

from megatron_prime.config import ConfigError, config_from_dict, load_config, validate, validate_parallel
from tests.hf_models import make_tiny_hf


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
    validate(config_from_dict({}, base + ["parallel.tp=2", "parallel.pp=2"]), world_size=4)
    with pytest.raises(ConfigError, match=r"parallel.tp.*= 4.*KV groups \(2\)"):
        validate(config_from_dict({}, base + ["parallel.tp=4"]))
    with pytest.raises(ConfigError, match=r"parallel.pp.*= 3.*layers \(2\)"):
        validate(config_from_dict({}, base + ["parallel.pp=3"]))
    with pytest.raises(ConfigError, match=r"world size \(6\)"):
        validate(config_from_dict({}, base + ["parallel.tp=2", "parallel.pp=2"]), world_size=6)
    with pytest.raises(ConfigError, match=r"attention heads \(4\)"):
        validate_parallel(config_from_dict({}, ["parallel.tp=3"]).parallel, num_layers=2, num_heads=4, num_kv_heads=4)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.estimator=ppo"], r"algorithm.estimator.*'ppo'.*one of gae, grpo, prime_official, prime_rloo"),
        (["algorithm.estimator=gae"], r"GAE needs a value model"),
        (["rollout.mode=remote"], r"rollout.remote_urls"),
        (["rollout.mode=remote", "rollout.remote_urls=[http://h:30000]"], r"rollout.engine.*'hf'.*use rollout.engine=sglang"),
        (["rollout.tp=2"], r"rollout.tp.*= 2.*hf engine runs on one device"),
        (["rollout.engine=sglang", "rollout.tp=4"], r"rollout.tp.*= 4.*must divide the world size \(6\)"),
        (["rollout.max_restarts=-1"], r"rollout.max_restarts"),
    ],
)
def test_rollout_and_estimator_checked_up_front(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(config_from_dict({}, overrides), world_size=6)


@pytest.mark.parametrize("overrides", [
    ["rollout.engine=sglang", "rollout.tp=2"],
    ["rollout.engine=vllm", "rollout.tp=3"],
    ["rollout.engine=sglang", "rollout.mode=remote", "rollout.remote_urls=[http://h:30000]", "rollout.tp=8"],
])
def test_rollout_layouts_accepted(overrides):
    validate(config_from_dict({}, overrides), world_size=6)
