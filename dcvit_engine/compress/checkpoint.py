"""Old name of dcvit_engine.compress.run_state (the resumable run state of a compression
run), kept for one release so that existing imports keep working; import run_state instead.
It is the same module object, so what is patched or read through either name is shared."""
import sys

from . import run_state

sys.modules[__name__] = run_state
