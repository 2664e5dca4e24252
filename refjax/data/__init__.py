"""Data: named sources (local shared files, HF hub, tfds), the Example record, user-data mixtures
and the alignment set. Prompt templates live in `refjax.data.prompts`.
"""

from refjax.data.mixture import (MixtureError, build_alignment_set, make_alignment_set,
                                 make_user_mixture)
from refjax.data.paths import data_dir, set_data_root
from refjax.data.records import DataError, Example, FieldMap, LoadReport, read_examples
from refjax.data.sources import SOURCES, get_spec, load_source, load_source_with_report

__all__ = ["Example", "DataError", "MixtureError", "FieldMap", "LoadReport", "SOURCES", "get_spec",
           "load_source", "load_source_with_report", "read_examples", "make_user_mixture",
           "make_alignment_set", "build_alignment_set", "set_data_root", "data_dir"]
