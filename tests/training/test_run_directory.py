import io
import json

import pytest
import torch

from raycv.errors import ConfigError
from raycv.models import create_model, saved
from raycv.storage import Storage
from raycv.training import run_directory

STORE = Storage()  # s3:// through the environment's endpoint (conftest's S3 server)


class NotWeights:
    """An arbitrary class: unpickling it would need code execution, which weights_only refuses."""


def _run_dir(tmp_path, arch="test_classifier"):
    model = create_model(arch, num_classes=3)
    mid = run_directory.save_weights(str(tmp_path / "model.pt"), model.state_dict())
    card = {
        "task": "classification",
        "arch": arch,
        "num_classes": 3,
        "class_names": ["a", "b", "c"],
        "image_size": 32,
        "in_channels": 3,
    }
    STORE.write_json(str(tmp_path / "model.json"), card)
    return model, mid


def test_saved_run_loads_back_identically(tmp_path):
    model, mid = _run_dir(tmp_path)
    loaded = saved.load_run(str(tmp_path), STORE)
    assert loaded.model_id == mid == saved.model_id_of(STORE.read_bytes(str(tmp_path / "model.pt")))
    assert loaded.class_names == ["a", "b", "c"] and loaded.size_hw == (32, 32)
    x = torch.rand(2, 3, 32, 32)
    model.eval()
    assert torch.allclose(loaded.model(x), model(x)) and not loaded.model.training


def test_state_dict_forms_and_refusal_of_pickled_code(tmp_path):
    sd = {"w": torch.ones(2)}
    buf = io.BytesIO()
    torch.save({"model": sd, "epoch": 3}, buf)
    assert torch.equal(saved.load_state_dict(buf.getvalue())["w"], torch.ones(2))

    bad = io.BytesIO()
    torch.save({"x": NotWeights()}, bad)
    with pytest.raises(ValueError, match="weights_only=True"):
        saved.load_state_dict(bad.getvalue(), "evil.pt")
    lst = io.BytesIO()
    torch.save([torch.ones(1)], lst)
    with pytest.raises(ValueError, match="holds a list, not a state_dict"):
        saved.load_state_dict(lst.getvalue())


def test_a_folder_without_a_card_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model: got .* No model.json there"):
        saved.read_card(str(tmp_path), STORE)


def test_metrics_file_is_rewritten_whole(tmp_path):
    run_directory.write_metrics(str(tmp_path), [{"epoch": 1}, {"epoch": 2}])
    run_directory.write_metrics(str(tmp_path), [{"epoch": 1}])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1]


def test_the_card_records_a_first_conv_adapted_to_the_bands(tmp_path):
    """RGB weights on a 6-band model: the card says which conv was adapted, and normalises every band."""
    from raycv.config import TrainConfig
    from raycv.models import load_weights

    report = load_weights(
        create_model("test_classifier", num_classes=3, in_channels=6),
        create_model("test_classifier", num_classes=3).state_dict(),
    )
    cfg = TrainConfig.model_validate(
        {
            "model": {"arch": "test_classifier", "weights": "rgb.pt", "options": {"in_channels": 6}},
            "data": {"train": str(tmp_path / "ds"), "image_size": 32},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    info = {"num_classes": 3, "class_names": ["a", "b", "c"], "n_train": 8, "n_val": 2}
    best = {"epoch": 1, "metrics": {"accuracy": 0.5}}
    record = {"history": [{"epoch": 1, "train_loss": 1.0}], "best": best, "resumed_at_epochs": []}
    record["first_conv_adapted"] = run_directory.first_conv_adapted(report)
    run_directory.write_run_dir(cfg, info, record)
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["first_conv_adapted"] == {
        "layer": "features.0.0.weight",
        "from_channels": 3,
        "to_channels": 6,
    }
    assert card["in_channels"] == 6 and card["best_epoch"] == 1
    mean, std = card["normalization"]["mean"], card["normalization"]["std"]
    assert mean == [0.485, 0.456, 0.406] * 2 and std == [0.229, 0.224, 0.225] * 2
    # the card rebuilds the 6-band model (in_channels is in its options too)
    model = create_model("test_classifier", num_classes=3, in_channels=6)
    run_directory.save_weights(str(tmp_path / "run" / "model.pt"), model.state_dict())
    assert saved.load_run(str(tmp_path / "run"), STORE).model.features[0][0].in_channels == 6


def test_the_card_has_no_adaptation_without_one():
    from raycv.models import load_weights

    model = create_model("test_classifier", num_classes=3)
    assert run_directory.first_conv_adapted(load_weights(model, model.state_dict())) is None
