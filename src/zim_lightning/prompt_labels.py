"""Point labels and the padding point of ZIM's decoder prompts, shared by the data pipeline, the models
and the predictor (``data/`` does not import ``models/``, so they live here).

Prompts follow SAM's ONNX convention, which the official ``zim_anything`` runner uses: ``point_labels``
1 positive, 0 negative, 2 / 3 the top-left / bottom-right box corners, and -1 the padding point that
point-only prompts end with. The values are ints; prompt tensors hold them as floats.
"""

from __future__ import annotations

#: Point labels of SAM's ONNX convention.
LABEL_PAD, LABEL_NEGATIVE, LABEL_POSITIVE, LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT = -1, 0, 1, 2, 3
#: Ours, not SAM's: an absent point, which fills a training batch's prompts to one length. Unlike the
#: padding point (-1), which is a token of SAM's convention and changes the output, an absent point
#: changes nothing (no token attends to it); the official runner never sends one.
LABEL_ABSENT = -2
#: Where SAM's predictor and the official runner put the padding point, (X, Y) pixels.
PADDING_POINT = (-0.5, -0.5)
