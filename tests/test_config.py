import pytest
import yaml
from pydantic import BaseModel

from es2.config import Params, load_params
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


def test_missing_params_file_fails_even_under_the_default_name(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    monkeypatch.chdir(tmp_path)  # no params.yaml here: no silent fallback to defaults in code
    with pytest.raises(ConfigError, match="params.yaml: params file not found") as err:
        load_params()
    assert "--params" in err.value.hint


def _sections(model: type[BaseModel], prefix: str = ""):
    for name, info in model.model_fields.items():
        key = f"{prefix}{info.alias or name}"
        yield key, info
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            yield from _sections(sub, f"{key}.")
        elif getattr(sub, "__origin__", None) is dict:  # evaluate.profiles: name -> budgets
            yield from _sections(sub.__args__[1], f"{key}.<name>.")


def test_params_yaml_is_the_only_home_of_defaults():
    with_default = [key for key, info in _sections(Params) if not info.is_required()]
    assert not with_default, f"code defaults beside params.yaml: {with_default}"


def test_a_key_missing_from_params_yaml_is_refused_by_name(tmp_path):
    raw = yaml.safe_load(open("params.yaml", encoding="utf-8"))
    del raw["evaluate"]["profiles"]["standard"]["gcg_prompts"]
    del raw["train"]["weight_decay"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert "missing key 'train.weight_decay'" in str(err.value)
    assert "missing key 'evaluate.profiles.standard.gcg_prompts'" in str(err.value)
