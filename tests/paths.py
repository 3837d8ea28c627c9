"""Where the tests find the repository and its bundled data (one place, whatever a test file's depth)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
DATA = TESTS / "data"
