"""The feature store: atomic ``.npy`` files in three scales, a manifest of every source file, locks, integrity."""

from mess_ai.store.atomic import atomic_save_npy, atomic_write_json, load_npy
from mess_ai.store.integrity import IntegrityReport, Problem, check_store
from mess_ai.store.layout import SCALES, ExpectedShapes, FeatureStore, check_dataset_name
from mess_ai.store.manifest import DONE, FAILED, PENDING, Manifest

__all__ = [
    "DONE", "FAILED", "PENDING", "SCALES", "ExpectedShapes", "FeatureStore", "IntegrityReport", "Manifest",
    "Problem", "atomic_save_npy", "atomic_write_json", "check_dataset_name", "check_store", "load_npy",
]
