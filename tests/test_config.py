import pytest

from es2.config import load_params
from es2.errors import ConfigError


def test_repo_params_parse_with_every_section():
    params = load_params("params.yaml")
    assert params.pairs.strategy in {"nearest", "random"}
    assert params.model.trust_remote_code is False


def test_unknown_key_is_refused_by_name_with_the_valid_keys(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("pairs:\n  seeed: 3\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert "unknown key 'pairs.seeed'" in str(err.value)
    assert "seed" in str(err.value) and "strategy" in str(err.value)


def test_unknown_section_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("trainer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'trainer'.*pairs"):
        load_params(path)


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("pairs:\n  seed: [1\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_params(path)


def test_wrong_type_and_bounds(tmp_path):
    with pytest.raises(ConfigError, match="'pairs.seed'"):
        load_params("params.yaml", ("pairs.seed=abc",))
    with pytest.raises(ConfigError, match="val_fraction"):
        load_params("params.yaml", ("pairs.val_fraction=1.5",))
    with pytest.raises(ConfigError, match="min must not exceed max"):
        load_params("params.yaml", ("validate.min_chars=50", "validate.max_chars=10"))


def test_override_sets_a_leaf_and_rejects_garbage():
    assert load_params("params.yaml", ("pairs.neighbours=5",)).pairs.neighbours == 5
    with pytest.raises(ConfigError, match="no '='"):
        load_params("params.yaml", ("pairs.neighbours",))


def test_missing_params_file_other_than_default_fails(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
