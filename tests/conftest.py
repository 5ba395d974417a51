import sys
from pathlib import Path

# tests/naive.py is imported as `naive` by the unit tests.
sys.path.insert(0, str(Path(__file__).parent))
