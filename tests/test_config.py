import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raycv.config import AnnotateConfig, TrainConfig, apply_override, load_config
from raycv.config.paths import check_paths
from raycv.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _train(tmp_path: Path, **over) -> dict:
    data = {
        "model": {"arch": "simple_cnn"},
        "data": {"train": str(tmp_path)},
        "output": {"dir": str(tmp_path / "run")},
    }
    data.update(over)
    return data


def test_defaults_follow_the_spec(tmp_path):
    cfg = load_config(_write(tmp_path, _train(tmp_path)))
    assert isinstance(cfg, TrainConfig)
    assert cfg.task == "classification" and cfg.train.epochs == 10 and cfg.train.optimizer == "adamw"
    assert cfg.scaling.num_workers == "auto" and cfg.output.max_failures == 2  # sized from the cluster
    assert cfg.data.size_hw == (64, 64) and cfg.data_format == "imagefolder"


def test_warmup_and_clip_default_by_task(tmp_path):
    from raycv.training.guard import clip_grad_norm_of, warmup_epochs_of

    cls = load_config(_write(tmp_path, _train(tmp_path)))
    assert cls.train.warmup_epochs is None and cls.train.clip_grad_norm is None
    assert warmup_epochs_of(cls) == 0 and clip_grad_norm_of(cls) is None
    det = load_config(
        _write(
            tmp_path, _train(tmp_path, task="instance_segmentation", model={"arch": "maskrcnn_resnet50_fpn"})
        )
    )
    assert warmup_epochs_of(det) == 1.0 and clip_grad_norm_of(det) == 10.0
    off = load_config(
        _write(tmp_path, _train(tmp_path, task="detection", model={"arch": "test_detector"})),
        ["train.warmup_epochs=0.5", "train.clip_grad_norm=0"],
    )
    assert warmup_epochs_of(off) == 0.5 and clip_grad_norm_of(off) is None  # 0 turns clipping off


def test_set_overrides_parse_values_as_yaml(tmp_path):
    cfg = load_config(
        _write(tmp_path, _train(tmp_path)),
        ["train.epochs=3", "train.augment.mixup=0.2", "data.image_size=[32, 48]", "train.amp=false"],
    )
    assert cfg.train.epochs == 3 and cfg.train.augment.mixup == 0.2
    assert cfg.data.size_hw == (32, 48) and cfg.train.amp is False


@pytest.mark.parametrize(
    ("override", "field", "words"),
    [
        ("train.epochz=3", "train.epochz", ["Unknown key", "Did you mean 'epochs'"]),
        ("train.epochs=many", "train.epochs", ["'many'", "integer"]),
        ("train.epochs=0", "train.epochs", ["0", "greater than 0"]),
        ("train.epochs=-2", "train.epochs", ["-2", "greater than 0"]),
        ("model.arch=resnet19", "model.arch", ["'resnet19'", "Did you mean 'resnet18'", "raycv models"]),
        ("train.optimizer=lbfgs", "train.optimizer", ["'lbfgs'", "'sgd', 'adam' or 'adamw'"]),
        ("scaling.num_workers=0", "scaling.num_workers", ["0"]),
        ("train.warmup_epochs=-1", "train.warmup_epochs", ["-1", "greater than or equal to 0"]),
        ("train.clip_grad_norm=-0.5", "train.clip_grad_norm", ["-0.5", "greater than or equal to 0"]),
        ("train.clip_grad_norm=big", "train.clip_grad_norm", ["'big'", "number"]),
    ],
)
def test_bad_values_name_field_value_and_fix(tmp_path, override, field, words):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, _train(tmp_path)), [override])
    assert err.value.field == field
    for w in words:
        assert w in str(err.value)


def test_missing_required_section(tmp_path):
    data = _train(tmp_path)
    del data["output"]
    with pytest.raises(ConfigError, match=r"output: got None\. This key is required"):
        load_config(_write(tmp_path, data))


def test_missing_dataset_path_is_a_config_error(tmp_path):
    cfg = load_config(_write(tmp_path, _train(tmp_path)), [f"data.train={tmp_path}/nope"])
    with pytest.raises(ConfigError) as err:
        check_paths(cfg)
    assert err.value.field == "data.train" and "nope" in str(err.value) and "Nothing exists" in str(err.value)


def test_task_and_arch_must_agree(tmp_path):
    with pytest.raises(ConfigError, match="raycv models --task semantic_segmentation"):
        load_config(_write(tmp_path, _train(tmp_path)), ["task=semantic_segmentation"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        apply_override({}, "train.epochs")
    with pytest.raises(ConfigError, match="not a section"):
        apply_override({"task": "x"}, "task.y=1")


def test_annotate_config(tmp_path):
    p = _write(
        tmp_path,
        {
            "model": "s3://b/run",
            "input": ["s3://b/a.jpg"],
            "output": "s3://b/out",
            "tile": {"size": 512, "overlap": 64},
        },
    )
    cfg = load_config(p, kind="annotate")
    assert isinstance(cfg, AnnotateConfig) and cfg.tile is not None and cfg.tile.size == 512
    with pytest.raises(ConfigError, match=r"tile: got .*overlap must be less than half"):
        load_config(p, ["tile.overlap=300"], kind="annotate")


def test_every_example_config_validates():
    configs = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        kind = "annotate" if "annotate" in path.name else "train"
        assert load_config(path, kind=kind) is not None


def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path):
    p = _write(tmp_path, _train(tmp_path, train={"epochs": 0}))
    proc = subprocess.run(
        [sys.executable, "-m", "raycv.cli", "train", str(p)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "train.epochs: got 0" in proc.stderr and "Traceback" not in proc.stderr


def test_image_size_below_the_model_minimum(tmp_path):
    with pytest.raises(ConfigError, match=r"below the 75 px that 'inception_v3' needs"):
        load_config(_write(tmp_path, _train(tmp_path)), ["model.arch=inception_v3", "data.image_size=64"])


def test_model_options_must_fit_the_builder(tmp_path):
    base = _train(tmp_path, task="semantic_segmentation", model={"arch": "unet", "options": {"depth": 3}})
    cfg = load_config(_write(tmp_path, base))
    assert cfg.model.options == {"depth": 3}
    with pytest.raises(
        ConfigError,
        match=r"model.options: got \{'deep': 3\}.*do not fit 'unet'.*unexpected keyword argument 'deep'",
    ):
        load_config(_write(tmp_path, base), ["model.options={deep: 3}"])
