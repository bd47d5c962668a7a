"""The unit tier's guard (tests/conftest.py) is on: Trainer.train fails every test under tests/unit/."""

import sys

import pytest


def test_trainer_train_fails_the_test_with_where_to_move_it():
    from transformers import Trainer  # imported here on purpose: the guard must patch it on import too

    with pytest.raises(
        pytest.fail.Exception, match="the unit tier trains nothing: move this test to tests/smoke/"
    ):
        Trainer.train(object())


def test_a_trainer_imported_before_the_test_is_refused_too():
    assert "transformers.trainer" in sys.modules  # the test above imported it
    from transformers import Trainer

    with pytest.raises(pytest.fail.Exception, match="the unit tier trains nothing"):
        Trainer.train(object())
