"""Input pipelines: the embedded cluttered-MNIST dataset and tfds datasets through grain."""

from laud_jax.data.pipeline import EMBEDDED, DatasetInfo, dataset_info, eval_batches, train_iterator

__all__ = ["EMBEDDED", "DatasetInfo", "dataset_info", "eval_batches", "train_iterator"]
