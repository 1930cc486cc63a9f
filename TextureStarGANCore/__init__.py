"""TextureStarGANCore: the CT kernel-harmonization engine (texture-aware StarGAN v2).

Pure Python + PyTorch, importable without 3D Slicer. See DESIGN.md beside this file.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Harmonizer", "__version__"]


def __getattr__(name: str):
    # Lazy import keeps `import TextureStarGANCore` cheap (no torch) for tools that only need metadata.
    if name in {"Harmonizer", "HarmonizationCancelled"}:
        from . import inference

        return getattr(inference, name)
    raise AttributeError(name)
