"""Paths of the models bundled with ditcache (diffusers-format folders, loadable offline).

``reference-digits`` is the project's reference model: a tiny Wan transformer on
16x16 MNIST digits, trained by ``launch/train_reference.py``; ``reference-digits-moe`` is its
two-expert (Wan2.2-style) variant.
"""

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
REFERENCE_DIGITS = MODELS_DIR / "reference-digits"
REFERENCE_DIGITS_MOE = MODELS_DIR / "reference-digits-moe"
