"""The model replicas of an annotation run: one callable class per task, used as Ray Data actors.

Each loads the run's weights in ``__init__`` (never a ``ray.put`` model) and turns a batch of planned
images into rows of the task's Parquet schema; one image's failure becomes that image's error row.
"""

from raycv.annotators.classification import Classifier
from raycv.annotators.detection import Detector
from raycv.annotators.segmentation import Segmenter
from raycv.errors import error_fields

__all__ = ["Classifier", "Detector", "Segmenter", "error_fields"]
