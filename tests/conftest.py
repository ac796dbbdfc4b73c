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


def quick(tiny_data, tmp_path, **kw):
    """TrainParams of a seconds-long run: resnet18 at 32 px on part of the tiny preset, one process, no
    worker processes; step 02 runs once per tmp_path (valid_frac 0.2)"""
    from cdkit.prepare import create_prepared
    from cdkit.steps.train import TrainParams
    if not (tmp_path / "prep" / "split.parquet").exists():
        create_prepared(tiny_data, tmp_path / "prep", valid_frac=0.2, log=lambda *a: None)
    base = dict(data_dir=str(tiny_data), work_dir=str(tmp_path / "prep"), run_dir=str(tmp_path / "run"),
                arch="resnet18", size=32, bs=16, epochs=1, max_train_images=64, num_workers=0, lr=0.01)
    return TrainParams(**{**base, **kw})
