"""The built-in tasks: importing this module registers each of them, in this order."""

from backbench.probe import tasks  # noqa: F401  probe, fewshot
from backbench.probe import neighbour_tasks  # noqa: F401  knn, knn-fewshot, retrieval
from backbench.probe import ood_tasks  # noqa: F401  ood (and open-set), shift
from backbench.probe import multilabel  # noqa: F401  probe-multilabel
from backbench.probe import dense_tasks  # noqa: F401  segmentation, detection
from backbench.probe import cluster  # noqa: F401  clustering
from backbench.probe import zeroshot  # noqa: F401  zeroshot
from backbench.probe import text_retrieval  # noqa: F401  text-retrieval
