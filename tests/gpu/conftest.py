from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    # This hook sees every test of the session: mark only those in tests/gpu.
    gpu_items = [i for i in items if HERE in Path(i.path).parents]
    if not gpu_items:
        return
    from shardtune.tuner.targets import local_gpu_arch

    if local_gpu_arch() is None:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
