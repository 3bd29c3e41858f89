import pytest


@pytest.fixture(autouse=True)
def x64_unchanged(request):
    """float64 runs switch JAX's x64 on in a scope only; no Flax test may leave it changed."""
    callspec = getattr(request.node, "callspec", None)
    flax_case = callspec is not None and callspec.params.get("framework") == "flax"
    if not (flax_case or request.module.__name__.endswith("test_flax_model")):
        yield
        return
    import jax

    before = jax.config.jax_enable_x64
    yield
    assert jax.config.jax_enable_x64 == before
