"""The model an annotation runs (SPEC §3 ``model:``): a raycv run or export, or a model from outside raycv.

The driver resolves it once, before anything starts (:func:`resolve`): the card every stage reads (task,
class names, preprocessing, normalisation), the model's identity (``model_id``, the hash of its weights or
file) and a check that it loads, so a wrong file exits 2 at once. Each actor then loads it on its device
(:func:`load`). A card's ``preprocess`` says how images become the model's input: ``resize`` (an int: the
shorter side, as torchvision's ``Resize``; ``[h, w]``: exact; null: the image's size), ``crop`` (centre),
then pixels / 255 and ``normalization`` (mean, std).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from raycv import storage
from raycv.errors import ConfigError
from raycv.models import foreign, portable, saved
from raycv.storage import Storage

if TYPE_CHECKING:
    from raycv.config import ModelSourceConfig

EXPORT_CARD_KEY = "export"  # model.json of `raycv export-model`: {"format", "file"}
_IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@dataclass(frozen=True)
class ModelSource:
    """What the actors load: ``kind`` run (a run directory), arch (an architecture and its weights at
    ``uri``) or file (a portable model file at ``uri``); ``card`` as a run's ``model.json``, plus
    ``preprocess``; ``embed``: strip a classifier's head for features."""

    kind: Literal["run", "arch", "file"]
    uri: str
    card: dict[str, Any]
    model_id: str
    embed: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return str(self.card["task"])

    @property
    def preprocess(self) -> dict[str, Any]:
        return dict(self.card["preprocess"])

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """The model input's size when every image gets the same one (an exact resize, or a crop)."""
        p = self.preprocess
        fixed = p.get("crop") or (p["resize"] if isinstance(p.get("resize"), list | tuple) else None)
        if fixed is None:
            return None
        return (int(fixed), int(fixed)) if isinstance(fixed, int) else (int(fixed[0]), int(fixed[1]))

    @property
    def label(self) -> str:
        """How the run's header names the model."""
        return self.card.get("arch") or self.uri


def resolve(model: str | ModelSourceConfig, store: Storage) -> ModelSource:
    """The model of an annotate config, checked: loads once here so that a wrong one exits 2 now.

    Raises:
        ConfigError: no such run, weights that do not fit, a file that is no model, a missing class list...
    """
    from raycv.tasks.registry import get_task

    if isinstance(model, str):
        return _from_dir(model, store, task=None)
    if model.run:
        return _from_dir(model.run, store, task=model.task)
    task = get_task(str(model.task))
    embed = task.embeds
    uri = str(model.weights or model.file or "")
    meta: dict[str, Any] = {}
    tv_weights = None
    if model.torchvision_weights:
        tv_weights = foreign.torchvision_weights(model.torchvision_weights)
        if not model.weights:
            uri = foreign.hub_cache_file(tv_weights, model.torchvision_weights)
    if model.arch:
        meta = foreign.weights_meta(model.arch, tv_weights)
    classes = _class_names(model, meta, store)
    if classes is None and not embed:
        raise ConfigError(
            "model.classes",
            None,
            f"A {task.name} model from outside raycv needs its class names: model.classes (a list, or the "
            "URI of a text file, one name a line), or model.num_classes, or model.torchvision_weights.",
        )
    if task.objects and classes and classes[0] == "__background__":
        classes = classes[1:]  # torchvision's detection categories: index 0 is the background
    card = {
        "task": task.name,
        "arch": model.arch or f"file:{uri.rsplit('/', 1)[-1]}",
        "num_classes": len(classes or []),
        "class_names": list(classes or []),
        "in_channels": model.in_channels,
        "preprocess": _preprocess(model, meta, task),
        "normalization": _normalization(model, meta, task),
        "source": {k: v for k, v in model.model_dump(mode="json").items() if v is not None},
    }
    data = store.read_bytes(uri) if uri else b""
    source = ModelSource(
        kind="arch" if model.arch else "file",
        uri=uri,
        card=card,
        model_id=saved.model_id_of(data),
        embed=embed,
    )
    load(source, store, data=data)  # fails here (exit 2), not in every actor
    return source


def load(
    source: ModelSource, store: Storage, device: str = "cpu", *, data: bytes | None = None
) -> saved.LoadedRun:
    """The model of ``source`` on ``device``, in eval mode, with its card and identity."""
    from raycv.tasks.registry import get_task

    card = source.card
    objects = get_task(source.task).objects
    if source.kind == "run":
        run = saved.load_run(source.uri, store, device)
        model: Any = run.model
        if source.embed:
            foreign.strip_head(model)
        return saved.LoadedRun(model=model, card=card, model_id=source.model_id)
    data = store.read_bytes(source.uri) if data is None else data
    if source.kind == "file":
        model = portable.load_model_file(data, source.uri, device, objects=objects)
        return saved.LoadedRun(model=model, card=card, model_id=source.model_id)
    num = len(card["class_names"]) + (1 if objects else 0)
    model = foreign.build_arch(
        card["arch"], task=source.task, num_classes=max(num, 1), in_channels=int(card["in_channels"])
    )
    state = foreign.load_state(data, source.uri)
    skip = foreign.strip_head(model) if source.embed else ""
    adapted = foreign.fit_weights(model, state, source.uri, skip=skip)
    if adapted:
        card["first_conv_adapted"] = adapted
    model.to(device).eval()
    return saved.LoadedRun(model=model, card=card, model_id=source.model_id)


def _from_dir(run_dir: str, store: Storage, task: str | None) -> ModelSource:
    """A directory written by ``raycv train`` (model.pt) or ``raycv export-model`` (a model file)."""
    from raycv.tasks.registry import get_task

    card = saved.read_card(run_dir, store)
    size = card.get("image_size")
    card.setdefault("preprocess", {"resize": [size, size] if isinstance(size, int) else size, "crop": None})
    asked, own = (get_task(task) if task else None), get_task(card["task"])
    embed = asked is not None and asked.embeds
    if asked is not None and asked is not own:
        if not (embed and own.image_labels):
            raise ConfigError(
                "model.task",
                task,
                f"{run_dir} holds a {card['task']} model; it annotates as {card['task']} (leave model.task "
                "out) or, a classifier, as embedding.",
            )
        card = {**card, "task": task, "source_task": card["task"]}
    export = card.get(EXPORT_CARD_KEY)
    if export:
        uri = storage.join(run_dir, export["file"])
        data = store.read_bytes(uri)
        source = ModelSource(kind="file", uri=uri, card=card, model_id=saved.model_id_of(data), embed=embed)
        if embed:
            raise ConfigError(
                "model.task", task, "An exported classifier gives logits; annotate embeddings from its run."
            )
        load(source, store, data=data)
        return source
    weights = store.read_bytes(storage.join(run_dir, saved.WEIGHTS))
    return ModelSource(kind="run", uri=run_dir, card=card, model_id=saved.model_id_of(weights), embed=embed)


def _class_names(model: ModelSourceConfig, meta: dict[str, Any], store: Storage) -> list[str] | None:
    if isinstance(model.classes, list):
        return [str(c) for c in model.classes]
    if isinstance(model.classes, str):
        try:
            text = store.read_bytes(model.classes).decode("utf-8")
        except FileNotFoundError:
            raise ConfigError(
                "model.classes", model.classes, "No such file: give a list or a text file's URI."
            ) from None
        return [line.strip() for line in text.splitlines() if line.strip()]
    if meta.get("classes"):
        return list(meta["classes"])
    if model.num_classes:
        return [str(i) for i in range(model.num_classes)]
    return None


def _preprocess(model: ModelSourceConfig, meta: dict[str, Any], task: Any) -> dict[str, Any]:
    p = model.preprocess
    resize = p.resize if "resize" in p.model_fields_set else meta.get("resize", None if task.objects else 224)
    crop = p.crop if "crop" in p.model_fields_set else meta.get("crop")
    if task.objects and (resize is not None or crop is not None):
        raise ConfigError(
            "model.preprocess",
            {"resize": resize, "crop": crop},
            "Detectors resize their input themselves and give boxes in its pixels: set resize and crop to null.",
        )
    if task.label_maps and crop is not None:
        raise ConfigError(
            "model.preprocess.crop", crop, "A label map covers the whole image: set crop: null."
        )
    return {"resize": _as_list(resize), "crop": _as_list(crop)}


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value


def _normalization(model: ModelSourceConfig, meta: dict[str, Any], task: Any) -> dict[str, Any]:
    default = {"mean": [0.0] * 3, "std": [1.0] * 3} if task.unit_pixels else _IMAGENET
    mean = model.preprocess.mean or meta.get("mean") or default["mean"]
    std = model.preprocess.std or meta.get("std") or default["std"]
    c = model.in_channels
    if len(mean) != c and c != 3:  # RGB statistics over N bands, cyclically (the first conv is adapted so)
        mean, std = [mean[i % len(mean)] for i in range(c)], [std[i % len(std)] for i in range(c)]
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
