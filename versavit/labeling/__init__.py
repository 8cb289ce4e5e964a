"""Stage 0, pseudo-labelling: teachers and the sharded, resumable jobs that run them.

    depth     Depth-Anything(-V2) relative disparity      versavit.labeling.depth.DepthTeacher
    masks     SAM masks from boxes                        versavit.labeling.masks.MaskTeacher
    describe  region descriptions (image-text-to-text)    versavit.labeling.describe
    embed     sentence embeddings of expressions          versavit.labeling.embed.TextEmbedder

`label_dataset(kind, input_url, output_url, cfg.labeling, shard_index, num_shards)` runs one worker's
slice of a job (versavit.labeling.jobs). Teachers import transformers lazily, so importing this
package stays cheap.
"""

from versavit.labeling.describe import ClassLabelDescriber, Describer, ImageTextDescriber, Region, load_describer
from versavit.labeling.embed import TextEmbedder, resolve_embedder
from versavit.labeling.jobs import KINDS, finalize_dataset, label_dataset, make_labeler

__all__ = [
    "KINDS",
    "ClassLabelDescriber",
    "Describer",
    "ImageTextDescriber",
    "Region",
    "TextEmbedder",
    "finalize_dataset",
    "label_dataset",
    "load_describer",
    "make_labeler",
    "resolve_embedder",
]
