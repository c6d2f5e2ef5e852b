"""proto"""
import numpy as np
from etils import epath
import tensorflow_datasets as tfds


class Lecture3Text(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)

    def __init__(self, *, documents=None, **kwargs):
        self._documents = documents
        super().__init__(**kwargs)

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text(), "replaced": np.int32}
            ),
            description="x",
        )

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(files) for s, files in self._documents.items()}

    def _generate_examples(self, files):
        for rel, text in files:
            yield rel, {"text": text, "path": rel, "replaced": 0}
