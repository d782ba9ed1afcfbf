"""What a task is: one file per task, each registering one :class:`~raycv.tasks.registry.Task` object.

:mod:`raycv.tasks.registry` holds the Task interface and the registry (``get_task``, ``register_task``);
``classification``, ``segmentation`` and ``detection`` (detection and instance segmentation) define the
built-in tasks, with the pieces they share in ``confusion`` (confusion-matrix metrics), ``coco`` (COCO
mAP) and ``tiles`` (merging the detections of overlapping tiles).
"""
