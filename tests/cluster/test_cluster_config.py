"""ray_cluster.yaml passes Ray's own cluster-config validation (the JSON schema `ray up` checks)."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = Path(__file__).resolve().parents[2] / "ray_cluster.yaml"


def test_cluster_config_is_valid_for_ray():
    config = yaml.safe_load(CONFIG.read_text())
    prepared = prepare_config(config)  # fills in the provider's defaults, as `ray up` does before validating
    validate_config(prepared)  # Ray's JSON schema; raises on any error
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"].get("GPU", 0) == 0  # no training on the head
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in gpu)  # GPU nodes autoscale
    assert any("[pipeline]" in command for command in prepared["setup_commands"])
    text = CONFIG.read_text().lower()
    assert not any(secret in text for secret in ("aws_secret", "password", "token:"))


def test_a_broken_config_is_refused():
    config = yaml.safe_load(CONFIG.read_text())
    config["available_node_types"]["worker.gpu"]["min_worker"] = 0  # typo
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(config))
