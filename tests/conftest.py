import io
import os
from pathlib import Path

import numpy as np
import pytest

# Perturbations of the numerics, as another machine would bring them (tools/perturb_tests.sh sets them):
# CDKIT_TEST_SEED shifts every training seed the tests use (TrainParams.seed of `quick`, the demo's seed=...),
# CDKIT_TEST_THREADS sets torch's intra-op threads here and, through OMP_NUM_THREADS, in the papermill kernels
# the pipeline starts; ATEN_CPU_CAPABILITY (default, avx2, avx512) is read by torch itself. A test whose
# verdict changes under any of them asserts floating-point luck, not behaviour. The synthetic data is the
# same on every machine (numpy's generators are bit-exact): CDKIT_TEST_DATA_SEED draws another tiny preset,
# which also changes what it plants (how many test pictures are unanimous train copies, say).
SEED = int(os.environ.get("CDKIT_TEST_SEED", "0"))
DATA_SEED = int(os.environ.get("CDKIT_TEST_DATA_SEED", "0"))
THREADS = os.environ.get("CDKIT_TEST_THREADS")
if THREADS:
    import torch
    os.environ["OMP_NUM_THREADS"] = THREADS  # the kernels papermill starts inherit it
    torch.set_num_threads(int(THREADS))


def pytest_report_header(config):
    import torch
    return (f"cdkit numerics: seed shift {SEED}, torch threads {torch.get_num_threads()}, "
            f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")


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
    "The synthetic tiny preset, written once per test run"
    from cdkit.data.synth import write_dataset
    out = tmp_path_factory.mktemp("tiny")
    write_dataset(out, preset="tiny", seed=DATA_SEED)
    return out


def quick(tiny_data, tmp_path, **kw):
    """TrainParams of a seconds-long run: resnet18 at 32 px on part of the tiny preset, one process, no
    worker processes; step 02 runs once per tmp_path (valid_frac 0.2)"""
    from cdkit.data.prepare import create_prepared
    from cdkit.steps.train import TrainParams
    if not (tmp_path / "prep" / "split.parquet").exists():
        create_prepared(tiny_data, tmp_path / "prep", valid_frac=0.2, log=lambda *a: None)
    base = dict(data_dir=str(tiny_data), work_dir=str(tmp_path / "prep"), run_dir=str(tmp_path / "run"),
                arch="resnet18", size=32, bs=16, epochs=1, max_train_images=64, num_workers=0, lr=0.01, seed=SEED)
    return TrainParams(**{**base, **kw})
