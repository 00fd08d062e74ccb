"""The wheel carries the project's LICENSE (MIT, as pyproject's license says)."""

import importlib.metadata
import os


def test_wheel_ships_the_mit_license():
    dist = importlib.metadata.distribution("mlx-qsdpa")
    assert dist.metadata["License"] == "MIT"
    licenses = [f for f in dist.files if f.parts[-2:] == ("licenses", "LICENSE")]
    assert len(licenses) == 1, [str(f) for f in dist.files if "dist-info" in str(f)]
    text = licenses[0].read_text()
    assert text.startswith("MIT License\n") and "Copyright (c) 2026 mlx-qsdpa contributors" in text
    repo_license = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "LICENSE")
    assert text == open(repo_license).read()
