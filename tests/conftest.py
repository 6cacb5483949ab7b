import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread here, and tests stay deterministic."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def fitted_policy(tmp_path_factory):
    """A tiny arith policy fitted for 60 steps, or more until greedy decoding is well formed
    (tests/gen_helpers.py): greedy decoding writes steps,
    answers and EOS. Built once per test session."""
    import torch

    from gen_helpers import fit_tiny_policy

    torch.set_num_threads(1)
    return fit_tiny_policy(tmp_path_factory.mktemp("policies") / "fitted", steps=60,
                           until_well_formed=True)
