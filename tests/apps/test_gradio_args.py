"""What the Gradio app takes from outside: its address (`--host` / `--port`, else Gradio's GRADIO_SERVER_NAME /
GRADIO_SERVER_PORT as on Spaces and in containers, else 127.0.0.1:7860) and the Calibrate box's prompt lines."""

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


def test_calibration_prompts_are_bounded():
    """Calibrate runs the pipeline once per prompt on the single queue: a request with too many lines is refused
    before any pipeline loads, with the bound and the offline alternative in the message."""
    from gradio_app.choices import MAX_CALIBRATION_PROMPTS
    from gradio_app.variants import calibration_prompts

    assert calibration_prompts(" a 7 \n\n  \na 3\n") == ["a 7", "a 3"]
    assert len(calibration_prompts("a 7\n" * MAX_CALIBRATION_PROMPTS)) == MAX_CALIBRATION_PROMPTS
    with pytest.raises(ValueError, match=f"at most {MAX_CALIBRATION_PROMPTS} per request.*viditq calibrate"):
        calibration_prompts("a 7\n" * (MAX_CALIBRATION_PROMPTS + 1))
    for empty in ("", "\n  \n", None):
        with pytest.raises(ValueError, match="No calibration prompts"):
            calibration_prompts(empty)
