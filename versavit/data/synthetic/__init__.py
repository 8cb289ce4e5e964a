"""The built-in synthetic world: procedural 3D scenes with exact depth, masks and language.

    >>> from versavit.data.synthetic import render_sample
    >>> sample = render_sample(seed=0, split="train", index=0, image_size=224)
"""

from versavit.data.synthetic.render import (
    CLASSES,
    SHAPES,
    Camera,
    Geometry,
    Primitive,
    Scene,
    cast_scene,
    render_scene,
    shade,
)
from versavit.data.synthetic.scene import (
    COLORS,
    DEPTH_MARGIN,
    IGNORE_INDEX,
    LR_MARGIN,
    MIN_AREA_FRACTION,
    RELATIONS,
    SIZES,
    SPLITS,
    SceneSample,
    render_sample,
    resolve_expression,
)

__all__ = [
    "CLASSES", "COLORS", "DEPTH_MARGIN", "IGNORE_INDEX", "LR_MARGIN", "MIN_AREA_FRACTION", "RELATIONS",
    "SHAPES", "SIZES", "SPLITS", "Camera", "Geometry", "Primitive", "Scene", "SceneSample", "cast_scene",
    "render_sample", "render_scene", "resolve_expression", "shade",
]
