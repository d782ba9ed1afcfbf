"""`raycv config example|schema`: the examples are valid configs, and the schemas validate them."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from raycv.cli import main
from raycv.config import build_config
from raycv.config.annotate import AnnotateConfig
from raycv.config.train import TrainConfig


@pytest.mark.parametrize(("kind", "model"), [("train", TrainConfig), ("annotate", AnnotateConfig)])
def test_the_example_is_a_valid_config_and_the_schema_accepts_it(kind, model, capsys):
    assert main(["config", "example", kind]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"# raycv {kind} CONFIG.yaml") and text.count("#") >= 8  # commented
    data = yaml.safe_load(text)
    cfg = build_config(model, data)
    assert main(["config", "schema", kind]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.validate(data, schema)
    jsonschema.validate(cfg.model_dump(mode="json"), schema)
    with pytest.raises(jsonschema.ValidationError):  # unknown keys are refused, as the loader does
        jsonschema.validate({**data, "unknown_key": 1}, schema)


def test_annotate_schema_knows_the_model_mapping_and_auto(capsys):
    assert main(["config", "schema", "annotate"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.validate(
        {
            "model": {"task": "classification", "file": "m.onnx", "classes": ["a", "b"]},
            "input": "x",
            "output": "y",
            "actors": 3,
        },
        schema,
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"model": "m", "input": "x", "output": "y", "actors": "many"}, schema)


def test_help_texts_name_no_internal_documents(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "SPEC" not in capsys.readouterr().out
