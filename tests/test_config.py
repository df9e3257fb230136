from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hylo.trainer.config import CONFIG_DIR, Config, ConfigError, check_batch_layout, load_config, to_yaml


def test_tiny_yaml_is_the_embedded_default():
    from_yaml = OmegaConf.to_container(OmegaConf.structured(load_config(CONFIG_DIR / "tiny.yaml")))
    assert from_yaml == OmegaConf.to_container(OmegaConf.structured(Config()))


def _leaves(node, prefix=""):
    """(dotted key, value) of every leaf a YAML file sets."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "config" and prefix == "deepspeed.":  # raw DeepSpeed passthrough: a dict value of its own
                yield prefix + key, value
            else:
                yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(node, list) and node and all(isinstance(item, dict) for item in node):  # data.sources
        for i, item in enumerate(node):
            yield from _leaves(item, f"{prefix}{i}.")
    else:
        yield prefix[:-1], node


def test_every_bundled_config_loads_with_every_value_it_sets(tmp_path):
    paths = sorted(Path(CONFIG_DIR).glob("*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        cfg = load_config(path)
        resolved = OmegaConf.structured(cfg)
        for key, value in _leaves(OmegaConf.to_container(OmegaConf.load(path))):
            if key == "checkpoint.async":  # a Python keyword: the field is async_save
                key = "checkpoint.async_save"
            got = OmegaConf.select(resolved, key)
            got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
            assert got == value, f"{path.name}: {key} = {got!r}, the file says {value!r}"
        written = tmp_path / path.name  # the resolved config a run saves loads back to the same config
        written.write_text(to_yaml(cfg))
        assert OmegaConf.structured(load_config(written)) == resolved, path.name


def test_overrides_are_typed():
    cfg = load_config(None, ["train.steps=7", "model.pattern=[full,swa,swa]", "train.lr=1e-4"])
    assert cfg.train.steps == 7 and cfg.model.pattern == ["full", "swa", "swa"] and cfg.train.lr == 1e-4


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.setps=10"])
    msg = str(err.value)
    assert "train.setps" in msg and "Allowed keys under 'train'" in msg and "Did you mean 'train.steps'" in msg


def test_unknown_section_and_yaml_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.d_modle'.*d_model"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(None, ["trian.steps=3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"bad value for config key 'train.steps'.*abc"):
        load_config(None, ["train.steps=abc"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.pattern=[full,rnn]", "'rnn' is not a layer type"),
        ("model.n_heads=3", "not divisible by model.n_heads=3"),
        ("model.n_kv_heads=3", "multiple of model.n_kv_heads=3"),
        ("train.dtype=fp8", "train.dtype='fp8' is not one of"),
        ("model.window=0", "model.window=0 must be positive"),
        ("train.seq_len=0", "train.seq_len must be positive"),
        ("notakeyvalue", "not of the form key=value"),
        ("model.mlp=relu", "model.mlp='relu' is not one of"),
        ("model.attn.pinned=-1", "model.attn.pinned=-1 must be >= 0"),
        ("train.attention_dq=fast", "train.attention_dq='fast' is not one of"),
    ],
)
def test_inconsistent_values(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


def test_atomic_dq_conflicts_with_deterministic():
    with pytest.raises(ConfigError, match="train.attention_dq=atomic .* train.deterministic=true"):
        load_config(None, ["train.deterministic=true", "train.attention_dq=atomic"])


def test_missing_config_file_lists_bundled():
    with pytest.raises(ConfigError, match=r"does not exist.*tiny.yaml"):
        load_config("configs/nope.yaml")


def test_batch_layout():
    cfg = load_config(None, ["train.batch_size=16", "train.micro_batch_size=4"])
    assert check_batch_layout(cfg, 2) == (4, 2)
    with pytest.raises(ConfigError, match="not divisible by the 3 data-parallel ranks"):
        check_batch_layout(cfg, 3)
    cfg = load_config(None, ["train.batch_size=16", "train.micro_batch_size=3"])
    with pytest.raises(ConfigError, match="must divide the per-rank batch 8"):
        check_batch_layout(cfg, 2)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.pattern=[rat]", "model.rat.qk_groups=3"],
         "model.n_heads=4 must be a multiple of model.rat.qk_groups=3"),
        (["model.pattern=[swa,rat]", "model.rat.chunk_size=0"], "model.rat.chunk_size=0 must be >= 1"),
        (["model.pattern=[tnl]", "model.tnl.hidden=130"], "model.tnl.hidden=130 must be divisible by model.n_heads=4"),
        (["model.pattern=[based]", "model.based.feature_dim=0"], "model.based.feature_dim=0 must be >= 1"),
        (["model.rat.chunk=8"], "unknown config key 'model.rat.chunk'.*Did you mean 'model.rat.chunk_size'"),
        (["model.rat.backend=sdpa"], "model.rat.backend='sdpa' is not one of"),
        (["model.attn.backend=sdpa"], "model.attn.backend=sdpa runs plain attention only"),  # sinks are on
        (["model.tnl.backend=flash"], "model.tnl.backend='flash' is not one of"),
        (["model.pattern=[full]", "parallel.cp=2", "model.attn.backend=sdpa", "model.attn.sink=false"],
         "model.attn.backend=sdpa cannot run context-parallel attention"),
        (["model.pattern=[rat]", "parallel.cp=2", "model.rat.backend=naive"],
         "model.rat.backend=naive takes whole sequences only"),
    ],
)
def test_layer_settings_are_checked(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)
