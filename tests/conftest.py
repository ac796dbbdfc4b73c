import io
from pathlib import Path

import numpy as np
import pytest

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cdiscount"


def jpeg_bytes(seed=0, size=180, mode="RGB", fmt="JPEG"):
    "A small real picture, encoded by PIL"
    from PIL import Image
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, quality=90) if fmt == "JPEG" else im.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def real_dir():
    if not (REAL / "train_example.bson").exists():
        pytest.skip(f"{REAL} is absent (the real competition files are not part of the kit)")
    return REAL


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    "The synthetic tiny preset, written once per test session"
    from cdkit.synth import write_dataset
    out = tmp_path_factory.mktemp("tiny")
    write_dataset(out, preset="tiny", seed=0)
    return out
