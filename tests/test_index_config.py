"""Index configuration: choose_config's defaults, thresholds and overrides (retrieval.index.config)."""

import pytest

from retrieval.errors import ConfigError
from retrieval.index import BRUTE_FORCE_MAX_ELEMENTS, RANDOM_INIT_MIN_ROWS, choose_config
from tests.helpers.index_data import D


def test_choose_config_thresholds():
    assert BRUTE_FORCE_MAX_ELEMENTS == 15_625 * D
    assert choose_config(15_624, D, "cosine").method == "brute_force"
    assert choose_config(15_625, D, "cosine").method == "tree_ah"
    assert choose_config(800, 1280, "cosine").method == "tree_ah"  # 1.02M numbers
    assert choose_config(20_000, 32, "cosine").method == "brute_force"  # 640k numbers
    config = choose_config(20_000, D, "cosine")
    assert config.method == "tree_ah" and config.tune
    assert config.num_leaves == 141  # round(sqrt(20000))
    assert config.training_sample_size == 20_000
    assert config.anisotropic_quantization_threshold == 0.2
    assert choose_config(20_000, D, "squared_l2").anisotropic_quantization_threshold is None
    huge = choose_config(10_000_000, D, "dot_product")
    assert huge.training_sample_size == 250_000 and huge.num_leaves == 3162
    # k-means++ (reproducible) below RANDOM_INIT_MIN_ROWS, random initialisation (faster) above.
    assert config.deterministic_training and not huge.deterministic_training
    assert choose_config(RANDOM_INIT_MIN_ROWS - 1, D, "cosine").deterministic_training
    assert not choose_config(RANDOM_INIT_MIN_ROWS, D, "cosine").deterministic_training
    assert choose_config(10_000_000, D, "cosine", deterministic_training=True).deterministic_training


def test_choose_config_overrides():
    fixed = choose_config(50_000, D, "cosine", leaves_to_search=7)
    assert fixed.leaves_to_search == 7 and not fixed.tune
    assert choose_config(50_000, D, "cosine", leaves_to_search=7, tune=True).tune
    assert choose_config(500, D, "cosine", method="tree_ah").num_leaves == 10  # 500 // 50
    with pytest.raises(ConfigError, match="Unknown IndexConfig field.*leaves; allowed: method"):
        choose_config(50_000, D, "cosine", leaves=3)
    with pytest.raises(ConfigError, match=r"num_leaves only apply to method='tree_ah'.*n\*d=6400 < 1000000"):
        choose_config(100, D, "cosine", num_leaves=4)
    with pytest.raises(ConfigError, match=r"leaves_to_search \(500\) must be <= num_leaves \(224\)"):
        choose_config(50_000, D, "cosine", leaves_to_search=500)
