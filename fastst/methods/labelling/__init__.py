"""Pseudo-label passes: label a target set with a model, resumably (docs/formats.md §3.1,
docs/design.md §1.7).

``LabelPass`` (base.py) is the resumable skeleton every pass shares: the finished-pass check,
the pass state, the PNG writer pool, the distributed steps and barriers, progress, the manifest
and the verification of the label files. Its subclasses are the selectors:

- ``IASPass`` / ``ias_pass`` (ias.py): instance-adaptive thresholds of the IAST rounds
  (docs/ops.md §1, docs/recipes.md §4); manifest format "fastst-pseudo-v1".
- ``ClassBalancedPass`` / ``cbst_pass`` (class_balanced.py): class-balanced thresholds of the
  CBST/CRST rounds, the TPLD phases (with voting) and IAST's constant and class-balanced
  selectors (docs/recipes.md §5, §6); manifest format "fastst-cbst-pseudo-v1".

``python -m fastst.pseudo`` runs a stage's pass alone.
"""
from fastst.methods.labelling.base import (IMAGES_LOGGED, LABEL_DIR, MANIFEST_NAME, STATE_NAME,
                                           LabelPass, class_names, labels_present,
                                           load_pass_state, log_pass_images, read_manifest,
                                           require_finished_pass, verify_labels)
from fastst.methods.labelling.class_balanced import (CBST_MANIFEST_FORMAT, VALUES_STORE_LIMIT,
                                                     ClassBalancedPass, cbst_pass, kept_values,
                                                     mine_classes, pass_probabilities,
                                                     read_cbst_manifest, threshold_store,
                                                     thresholds_over_ranks)
from fastst.methods.labelling.ias import MANIFEST_FORMAT, IASPass, ias_pass, read_ias_manifest

__all__ = ["LabelPass", "IASPass", "ClassBalancedPass", "ias_pass", "cbst_pass",
           "MANIFEST_FORMAT", "CBST_MANIFEST_FORMAT", "MANIFEST_NAME", "STATE_NAME", "LABEL_DIR",
           "IMAGES_LOGGED", "VALUES_STORE_LIMIT", "read_manifest", "read_ias_manifest",
           "read_cbst_manifest", "verify_labels", "labels_present", "require_finished_pass",
           "load_pass_state", "class_names", "log_pass_images", "mine_classes",
           "threshold_store", "pass_probabilities", "thresholds_over_ranks", "kept_values"]
