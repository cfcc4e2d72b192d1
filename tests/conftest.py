"""Fixtures shared by the tests (helpers that tests import live in helpers.py)."""

import pytest
import transformers

transformers.logging.set_verbosity_error()


@pytest.fixture(params=["llama", "gpt2", "bert"])
def family(request):
    return request.param
