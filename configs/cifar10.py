"""CIFAR-10, 4,000 labels, Mean Teacher + Local Clustering: the reference's main run."""

from configs import default


def get_config(variant=None):
  return default.get_config(variant)
