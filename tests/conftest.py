import os

import pytest
import torch

# Triton's CPU interpreter must be chosen before triton is first imported: without a GPU,
# the Triton kernels are tested in it on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every backend on every device it is meant to serve: the `backend` fixture's parametrization,
# jointly with the test's `device`.
BACKEND_DEVICES = [("torch", "cpu"), ("cpp", "cpu"), ("triton", "cpu"),
                   ("torch", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]


def _parametrized(metafunc) -> set[str]:
    """The arguments the test parametrizes itself."""
    names: set[str] = set()
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0] if mark.args else mark.kwargs["argnames"]
        if isinstance(argnames, str):
            argnames = argnames.split(",")
        names.update(name.strip() for name in argnames)
    return names


def pytest_generate_tests(metafunc):
    """A test that takes ``backend`` (the fixture below, not one of its module's own) runs once per
    (backend, device) pair of :data:`BACKEND_DEVICES`, with ids like ``cpp-cpu``."""
    if "backend" not in metafunc.fixturenames or "backend" in _parametrized(metafunc):
        return
    if "backend" in vars(metafunc.module) or (metafunc.cls is not None and "backend" in vars(metafunc.cls)):
        return
    metafunc.parametrize("backend,device", BACKEND_DEVICES, indirect=["backend"],
                         ids=[f"{name}-{device}" for name, device in BACKEND_DEVICES])


@pytest.fixture
def backend(request, device):
    """The backend of the test's (backend, device) pair, forced (``REGFAST_BACKEND``) for the whole test;
    the test is skipped, with the reason, where that backend cannot serve ``device`` tensors here."""
    from helpers import use_backend

    from regfast._dispatch import unavailable_reason

    name = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reason = unavailable_reason(name, device)
    if reason is not None:
        pytest.skip(f"the {name} backend cannot serve {device} tensors: {reason}")
    with use_backend(name):
        yield name


def _compile_gate(session):
    """tests/test_triton_compile.py, when it is among the tests to run and was imported (Triton is installed)."""
    for item in session.items:
        if item.path.name == "test_triton_compile.py":
            return item.module
    return None


def pytest_collection_finish(session):
    """The Triton compile gate's compile runs start as soon as the tests are known: they take minutes of
    compiling and run in the background beside the rest of the suite, whose tests mostly wait on Python."""
    gate = _compile_gate(session)
    if gate is not None:
        gate.start_compile_runs()


def pytest_sessionfinish(session):
    """Compile runs still going (the gate's tests were not reached: ``-x``, an interrupt) are stopped."""
    gate = _compile_gate(session)
    if gate is not None:
        gate.stop_compile_runs()
