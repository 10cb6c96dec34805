"""Makes the shared helpers in passes_testlib.py importable from the pass tests."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
