import glob
import importlib
import os

import pytest

from flaxformer_lite.config import ModelConfig
from flaxformer_lite.train import experiment

CONFIGS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py"))
    if not p.endswith("__init__.py")
)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_validates_and_builds_a_model_config(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    experiment.validate(config)
    cfg = experiment.model_config(config, vocab_size=1000)
    assert isinstance(cfg, ModelConfig) and cfg.vocab_size == 1000
    assert cfg.max_len >= config.max_length
    config.model.overrides.num_kv_heads = 1  # any ModelConfig field can be overridden
    assert experiment.model_config(config, vocab_size=1000).num_kv_heads == 1


def test_paper_hyperparameters_in_wmt_base():
    config = importlib.import_module("configs.wmt_base").get_config()
    assert (config.b1, config.b2, config.eps, config.warmup_steps) == (0.9, 0.98, 1e-9, 4000)
    assert config.schedule == "noam" and config.learning_rate == 1.0 and config.label_smoothing == 0.1
    cfg = experiment.model_config(config, 32000)
    assert (cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.num_encoder_layers, cfg.dropout_rate) == (
        512,
        8,
        2048,
        6,
        0.1,
    )
