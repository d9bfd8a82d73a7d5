"""The Gradio app's address: `--host` / `--port`, else Gradio's GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (Spaces,
containers), else 127.0.0.1:7860."""

import pytest

pytest.importorskip("gradio")

from gradio_app.app import parse_args  # noqa: E402


def test_defaults_without_flags_or_environment():
    args = parse_args([], environ={})
    assert (args.host, args.port) == ("127.0.0.1", 7860)


def test_the_environment_decides_without_flags():
    args = parse_args([], environ={"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"})
    assert (args.host, args.port) == ("0.0.0.0", 7861)


def test_flags_win_over_the_environment():
    args = parse_args(["--host", "127.0.0.2", "--port", "9000"],
                      environ={"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"})
    assert (args.host, args.port) == ("127.0.0.2", 9000)


def test_empty_variables_count_as_unset():
    args = parse_args([], environ={"GRADIO_SERVER_NAME": "", "GRADIO_SERVER_PORT": ""})
    assert (args.host, args.port) == ("127.0.0.1", 7860)


def test_a_port_that_is_not_a_number_is_refused_by_name():
    with pytest.raises(SystemExit, match="GRADIO_SERVER_PORT='http'"):
        parse_args([], environ={"GRADIO_SERVER_PORT": "http"})
