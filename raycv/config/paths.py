"""Whether the paths a config reads from exist: checked before anything starts on the cluster."""

from __future__ import annotations

from typing import Any

from raycv.errors import ConfigError


def check_paths(cfg: Any) -> None:
    """Check that the paths a config reads from exist, before anything starts on the cluster.

    Raises:
        ConfigError: naming the first missing path.
    """
    from raycv.storage import Storage

    store = Storage(endpoint_url=cfg.storage.endpoint_url)
    from raycv.config import TrainConfig

    if isinstance(cfg, TrainConfig):
        needed = [
            ("data.train", cfg.data.train),
            ("data.val", cfg.data.val),
            ("model.weights", cfg.model.weights),
        ]
    elif isinstance(cfg.model, str):
        needed = [("model", cfg.model)]
    else:
        m = cfg.model
        needed = [("model.run", m.run), ("model.weights", m.weights), ("model.file", m.file)]
        if isinstance(m.classes, str):
            needed.append(("model.classes", m.classes))
    for field, uri in needed:
        if uri is None:
            continue
        try:
            found = store.exists(uri)
        except Exception as exc:  # unreachable endpoint, bad credentials: say so, with the field
            raise ConfigError(
                field, uri, f"It could not be checked ({exc}); check storage.endpoint_url and credentials."
            ) from exc
        if not found:
            raise ConfigError(
                field, uri, "Nothing exists at this path; give an existing local path, file:// or s3:// URI."
            )
