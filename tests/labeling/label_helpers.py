"""Helpers shared by the labelling tests (a module, not conftest: conftest names collide across folders)."""

from __future__ import annotations

from versavit.config.schema import LabelingConfig, TeachersConfig


def labeling_config(teachers: dict[str, str], *, use_ground_truth: bool = False, describer: bool = True,
                    batch_size: int = 2, depth_input_size: int = 56) -> LabelingConfig:
    """The config a real run would have, pointing at the tiny teachers' folders."""
    return LabelingConfig(
        use_ground_truth=use_ground_truth, batch_size=batch_size, device="cpu",
        teachers=TeachersConfig(depth=teachers["depth"], depth_input_size=depth_input_size, masks=teachers["masks"],
                                describer=teachers["describer"] if describer else None,
                                embedder=teachers["embedder"]),
    )
