"""Where a fine-tuned model comes from, carried in its file and copied into every export manifest.

A deployed file must trace back to the GHN checkpoint and prediction seed that produced its
starting point and to the fine-tune that changed it; a model fine-tuned twice keeps the whole
chain (``parent``).
"""

from __future__ import annotations

from pathlib import Path

from ghnq_deploy.export.manifest import sha256_file
from ghnq_deploy.ghn.predict import PredictedModel


def finetuned_meta(parent: PredictedModel, parent_file: Path, from_ghn: bool, finetune: dict) -> dict:
    """The meta of the fine-tuned model file: parent's GHN and seed (when the start came from it) and the fine-tune."""
    parent_ancestry = parent.meta.get("ancestry")
    ghn = (parent.meta.get("ghn") or {}) if from_ghn else {}
    ancestry = {
        "ghn_checkpoint": ({"path": ghn.get("path"), "sha256": ghn.get("sha256")} if ghn else None),
        "prediction": {"seed": parent.meta.get("seed"), "bits": parent.meta.get("bits"), "file": str(parent_file),
                       "sha256": sha256_file(parent_file), "used_as_start": from_ghn},
        "finetune": finetune,
        "parent": parent_ancestry,
    }
    return {"ghn": ghn, "seed": parent.meta.get("seed"), "bits": finetune["bits"], "bn_stats": "calibrated",
            "ancestry": ancestry}
