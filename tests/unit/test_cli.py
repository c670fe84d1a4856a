"""cli.main's one rule for every command's failures (`_guarded`): a failure the user can act on is
one line ``geco: ...`` and exit 2 (a DAG stage's failure is judged by its cause; a prefix is said
once), a bug is its traceback. The commands themselves are walked in tests/integration/test_cli_errors.py."""
from __future__ import annotations

import pytest

from cli.main import _guarded
from geco.config import ConfigError
from pipelines.dag import StageFailed
from pipelines.retrain import RetrainError


def _raise(exc: BaseException):
    def work() -> int:
        raise exc
    return work


def test_user_errors_are_one_line_and_exit_2(capsys):
    assert _guarded("retrain", lambda: 3, prefix="retrain: ") == 3  # the work's own status
    assert _guarded("retrain", _raise(RetrainError("retrain: no models:/geco@production\n  to continue from")),
                    prefix="retrain: ") == 2
    assert capsys.readouterr().err == "geco: retrain: no models:/geco@production to continue from\n"
    assert _guarded("retrain", _raise(StageFailed("render", FileNotFoundError("objects/a.glb"))), prefix="retrain: ") == 2
    assert capsys.readouterr().err == "geco: retrain: stage render failed: FileNotFoundError: objects/a.glb\n"
    assert _guarded("run", _raise(ConfigError("stage1.lr: no such field"))) == 2
    assert capsys.readouterr().err == "geco: config error: stage1.lr: no such field\n"


def test_bugs_keep_their_traceback(capsys):
    with pytest.raises(ZeroDivisionError):
        _guarded("run", _raise(ZeroDivisionError("a bug")))
    with pytest.raises(StageFailed):  # a stage that failed of a bug
        _guarded("run", _raise(StageFailed("stage1", KeyError("x"))))
    assert capsys.readouterr().err == ""
