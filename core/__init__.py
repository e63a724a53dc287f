"""The receipt engine: programs, inputs, the compiled core and its pure-Python reference.

``Engine`` is the compiled core unless ``LOYALTY_NO_EXTENSIONS=1`` asks for the reference (or the extension
is missing), as multidict and yarl do; ``ReferenceEngine`` is always the pure-Python second opinion.
Nothing here imports from ``loyalty.server``.
"""
import os

from .errors import InputError, LoyaltyError, ProgramError
from .program import load_program, load_program_text, program_from_dict
from .reference import ReferenceEngine

NO_EXTENSIONS = bool(os.environ.get("LOYALTY_NO_EXTENSIONS"))

if NO_EXTENSIONS:
    Engine = ReferenceEngine
    COMPILED = False
else:
    try:
        from ._engine import Engine
        COMPILED = True
    except ImportError:  # pragma: no cover - a build without the extension
        Engine = ReferenceEngine
        COMPILED = False

__all__ = [
    "Engine", "ReferenceEngine", "COMPILED", "load_program", "load_program_text", "program_from_dict",
    "LoyaltyError", "ProgramError", "InputError",
]
