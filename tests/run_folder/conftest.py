"""The run-folder tests write real runs with the runner's fixtures (the small model, the test recipes)."""

from tests.train.conftest import _one_thread_and_private_cache, plan_for, plan_from, small_model  # noqa: F401
