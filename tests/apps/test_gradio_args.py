"""What the Gradio app takes from outside: its address (`--host` / `--port`, else Gradio's GRADIO_SERVER_NAME /
GRADIO_SERVER_PORT as on Spaces and in containers, else 127.0.0.1:7860), its output folder, and every value of a
request (numbers, Calibrate's prompt lines, Save's directory), called as Gradio's events call the handlers."""

import math
import os
import re

import pytest

gr = pytest.importorskip("gradio")

from gradio_app import app as ui  # noqa: E402
from gradio_app.app import parse_args  # noqa: E402
from gradio_app.choices import (BUNDLED, DEFAULT_SOURCE, ENCODER_CHECKBOX, MAX_CALIBRATION_PROMPTS,  # noqa: E402
                                MAX_CALIBRATION_STEPS, STEPS_RANGE)
from gradio_app.inputs import calibration_prompts, save_directory  # noqa: E402


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
    assert calibration_prompts(" a 7 \n\n  \na 3\n") == ["a 7", "a 3"]
    assert len(calibration_prompts("a 7\n" * MAX_CALIBRATION_PROMPTS)) == MAX_CALIBRATION_PROMPTS
    with pytest.raises(ValueError, match=f"at most {MAX_CALIBRATION_PROMPTS} per request.*viditq calibrate"):
        calibration_prompts("a 7\n" * (MAX_CALIBRATION_PROMPTS + 1))
    for empty in ("", "\n  \n", None):
        with pytest.raises(ValueError, match="No calibration prompts"):
            calibration_prompts(empty)


def test_the_output_folder_defaults_to_viditq_out_and_must_be_a_folder(tmp_path):
    assert parse_args([], environ={}).output_dir == "viditq-out"
    assert parse_args(["--output-dir", str(tmp_path)], environ={}).output_dir == str(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        parse_args(["--output-dir", str(tmp_path / "file")], environ={})


def generate(seed=0, steps=20, guidance=4.5, prompt="a thick handwritten digit 7", quantize_encoder=False):
    return ui.run_generate(DEFAULT_SOURCE, "", prompt, "", seed, steps, guidance, quantize_encoder)


def checkbox(app: gr.Blocks) -> gr.Checkbox:
    [box] = [block for block in app.blocks.values() if isinstance(block, gr.Checkbox)]
    return box


def test_the_text_encoder_checkbox_is_off_unless_the_flag_turns_it_on():
    assert parse_args([], environ={}).quantize_text_encoder is False
    assert parse_args(["--quantize-text-encoder"], environ={}).quantize_text_encoder is True
    off, on = checkbox(ui.build_app()), checkbox(ui.build_app(quantize_encoder=True))
    assert off.label == on.label == ENCODER_CHECKBOX == "Quantize the text encoder too (W8A16)"
    assert (off.value, on.value) == (False, True)


def test_the_checkbox_reaches_the_pipeline_and_the_weights_count_the_whole_pipeline():
    """Generate as the page calls it, box unchecked then checked: the W8A8 / W4A8-MP tables weigh the whole pipeline
    (transformer + text encoder + VAE), and less with the box checked, by the text encoder's part only."""
    def tables(quantize_encoder):
        status, *outputs = generate(steps=2, quantize_encoder=quantize_encoder)
        return status, outputs[1::2]

    def row(table, name):
        return re.search(rf"\| {re.escape(name)} \| ([^|]+) \|", table).group(1)

    def mib(text):
        return float(text.split(" ")[0])

    plain_status, plain = tables(False)
    both_status, both = tables(True)
    assert "W8A16 text encoder" in both_status and "W8A16" not in plain_status
    assert row(plain[0], "weights (whole pipeline)") == row(both[0], "weights (whole pipeline)")  # FP stays FP
    for p, b in zip(plain[1:], both[1:]):
        assert "+ text encoder W8A16**" in b and "text encoder W8A16" not in p
        assert mib(row(b, "weights (whole pipeline)")) < mib(row(p, "weights (whole pipeline)"))
        assert re.search(r"\(0\.\d\dx FP\)", row(b, "weights (whole pipeline)"))
        by_plain = dict(part.split(" ") for part in row(p, "weights by component").removesuffix(" MiB").split(" · "))
        by_both = dict(part.split(" ") for part in row(b, "weights by component").removesuffix(" MiB").split(" · "))
        assert list(by_both) == ["transformer", "text_encoder", "vae"]
        assert float(by_both["text_encoder"]) < float(by_plain["text_encoder"])
        assert {k: v for k, v in by_both.items() if k != "text_encoder"} == \
            {k: v for k, v in by_plain.items() if k != "text_encoder"}


@pytest.mark.parametrize("field, value, message", [
    ("seed", math.inf, "The seed must be a whole number from 0 to 9223372036854775807 (got inf)"),
    ("seed", -math.inf, "(got -inf)"), ("seed", math.nan, "The seed must be a whole number (.*) (got nan)"),
    ("seed", -3, "(got -3)"), ("seed", 2.5, "(got 2.5)"), ("seed", 2**63, "(got 9223372036854775808)"),
    ("seed", "seven", "(got 'seven')"), ("seed", None, "(got None)"), ("seed", True, "(got True)"),
    ("steps", math.nan, "Steps must be a whole number from 2 to 100 (got nan); 20 is a good default"),
    ("steps", math.inf, "(got inf)"), ("steps", 1, "(got 1)"), ("steps", 0, "(got 0)"), ("steps", -5, "(got -5)"),
    ("steps", 101, "(got 101)"), ("steps", 2.5, "(got 2.5)"), ("steps", "20x", "(got '20x')"),
    ("guidance", math.nan, "Guidance must be a number from 0 to 30 (got nan); 4.5 is a good default"),
    ("guidance", math.inf, "(got inf)"), ("guidance", -1, "(got -1)"), ("guidance", 31, "(got 31)"),
    ("guidance", [4.5], "(got [4.5])"),
])
def test_every_invalid_number_is_a_user_error_that_names_it(field, value, message):
    """A gr.Error with the field, the value and the fix, raised before any model loads, for anything that is not a
    finite number in range (Gradio passes these fields unrounded, so NaN, inf and fractions reach the check)."""
    with pytest.raises(gr.Error, match=re.escape(message).replace(re.escape("(.*)"), ".*")):
        generate(**{field: value})


def test_numbers_in_range_are_taken_in_any_spelling():
    from gradio_app.inputs import generation

    assert generation(" a 7 ", 20.0, 4, 7.0) == ("a 7", 20, 4.0, 7)
    assert generation("a 7", "2", "0", " 9 ") == ("a 7", 2, 0.0, 9)
    assert generation("a 7", STEPS_RANGE[1], 30, 2**63 - 1) == ("a 7", STEPS_RANGE[1], 30.0, 2**63 - 1)


def test_the_number_fields_pass_values_unrounded_to_the_checks():
    """With precision=0, Gradio itself rounded 2.5 to 2 and failed on inf with a bare OverflowError before the
    handler ran; now every value reaches inputs.py."""
    numbers = [block for block in ui.build_app().blocks.values() if isinstance(block, gr.Number)]
    assert [n.label for n in numbers] == ["Seed", f"Steps ({STEPS_RANGE[0]}-{STEPS_RANGE[1]})", "Guidance"]
    for number in numbers:
        assert number.preprocess(2.5) == 2.5 and number.preprocess(math.inf) == math.inf


def test_the_fewest_steps_allowed_run_on_every_bundled_pipeline():
    """1 step crashed inside the PixArt pipeline (its one-step path wants another scheduler); 2 is the minimum."""
    for choice in BUNDLED:
        status = ui.run_generate(choice, "", "a handwritten digit 4", "", 0, STEPS_RANGE[0], 4.5)[0]
        assert f"{STEPS_RANGE[0]} steps" in status


def test_calibration_is_bounded_in_prompts_x_steps_and_the_ui_says_so():
    prompts = "\n".join(f"a handwritten digit {d % 10}" for d in range(MAX_CALIBRATION_PROMPTS))
    with pytest.raises(gr.Error, match=f"{MAX_CALIBRATION_PROMPTS} calibration prompts x 11 steps = "
                                       f"{MAX_CALIBRATION_PROMPTS * 11} denoising steps: at most "
                                       f"{MAX_CALIBRATION_STEPS} per request. Use fewer steps \\(e.g. 10 for"):
        ui.run_calibrate(DEFAULT_SOURCE, "", prompts, 11, 4.5)
    for steps, guidance, message in [(math.nan, 4.5, "Steps must be"), (20, math.nan, "Guidance must be")]:
        with pytest.raises(gr.Error, match=message):
            ui.run_calibrate(DEFAULT_SOURCE, "", "a 7", steps, guidance)
    labels = [block.label for block in ui.build_app().blocks.values() if isinstance(block, gr.Textbox)]
    assert any(f"at most {MAX_CALIBRATION_PROMPTS}" in label and f"prompts x steps at most {MAX_CALIBRATION_STEPS}"
               in label for label in labels), labels


def test_save_stays_inside_the_output_folder(tmp_path):
    root = tmp_path / "out"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "link").parent.mkdir()
    os.symlink(outside, root / "link")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("mine")
    (root / "a-file").write_text("x")
    (root / "old").mkdir()
    (root / "old" / "model_index.json").write_text("{}")
    (root / "killed" / ".viditq-tmp-abc").mkdir(parents=True)  # what a killed save leaves
    for typed, expected in [("w8", root / "w8"), (" sub/w8 ", root / "sub" / "w8"), (str(root / "w8"), root / "w8"),
                            ("a/../w8", root / "w8"), ("old", root / "old"), ("killed", root / "killed")]:
        assert save_directory(str(root), typed) == str(expected)
    for typed, message in [("", "No directory given"), ("   ", "No directory given"), (None, "No directory given"),
                           ("../elsewhere", f"that is {outside}, and this app saves only inside its output folder"),
                           (str(outside), "--output-dir"), ("/etc", "saves only inside"), (".", "saves only inside"),
                           ("link", f"that is {outside}"), ("link/w8", "saves only inside"),
                           ("a-file", f"{root / 'a-file'} is a file"), ("a-file/w8", f"{root / 'a-file'} is a file"),
                           ("notes", r"it holds other files \(todo.txt\) and no saved pipeline")]:
        with pytest.raises(ValueError, match=message):
            save_directory(str(root), typed)
    with pytest.raises(gr.Error, match=re.escape(f"Cannot save to '/etc': that is /etc, and this app saves only "
                                                 f"inside its output folder {root}")):
        ui.run_save(DEFAULT_SOURCE, "", "W8A8", "/etc", output_dir=str(root))
    assert sorted(os.listdir(outside)) == [] and (root / "notes" / "todo.txt").read_text() == "mine"


def test_save_writes_a_pipeline_that_loads_and_can_be_saved_again(tmp_path):
    from viditq_diffusers.checkpoint import checkpoint_summary

    root = tmp_path / "viditq-out"
    for _ in range(2):  # the second save replaces the first one's checkpoint (a folder that holds a pipeline)
        status = ui.run_save(DEFAULT_SOURCE, "", "W8A8", "pixart-w8a8", output_dir=str(root))
        assert status.startswith(f"Saved the W8A8 pipeline to {root / 'pixart-w8a8'}")
    with pytest.raises(gr.Error, match="Could not save to .*File name too long"):  # an OSError, shown as such
        ui.run_save(DEFAULT_SOURCE, "", "W8A8", "x" * 300, output_dir=str(root))
    saved = checkpoint_summary(str(root / "pixart-w8a8"))
    assert set(saved) == {"transformer"}, saved  # the box unchecked: the text encoder saved in floating point
    transformer = saved["transformer"]
    assert transformer["model_class"] == "PixArtTransformer2DModel" and set(transformer["formats"]) == {"W8A8"}


def test_save_with_the_checkbox_writes_the_w8a16_text_encoder_and_it_reloads(tmp_path):
    from diffusers import DiffusionPipeline

    from viditq_diffusers import ViDiTQLinear

    root = tmp_path / "viditq-out"
    status = ui.run_save(DEFAULT_SOURCE, "", "W8A8", "both", True, output_dir=str(root))
    assert status.startswith(f"Saved the W8A8 pipeline (text encoder W8A16) to {root / 'both'}")
    pipe = DiffusionPipeline.from_pretrained(root / "both")
    assert {(m.weight_bits, m.act_bits) for m in pipe.text_encoder.modules() if isinstance(m, ViDiTQLinear)} \
        == {(8, 16)}
    assert {(m.weight_bits, m.act_bits) for m in pipe.transformer.modules() if isinstance(m, ViDiTQLinear)} \
        == {(8, 8)}


def test_the_flag_checks_the_box_on_the_served_page_and_preloads_the_encoders(tmp_path):
    """`python -m gradio_app --quantize-text-encoder` for real: the page's checkbox starts checked, and the
    preload (which prints "models ready" last) loaded the W8A16 encoders without an error."""
    import json
    import urllib.request

    from harness.gradio_ui.server import AppServer

    server = AppServer(tmp_path / "app.log", args=("--quantize-text-encoder", "--output-dir", str(tmp_path))).start()
    try:
        server.wait_for_log("models ready", timeout=300)
        with urllib.request.urlopen(f"{server.url}/config", timeout=30) as response:
            config = json.load(response)
    finally:
        server.stop()
    [box] = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "quantize-text-encoder"]
    assert box["props"]["value"] is True and box["props"]["label"] == ENCODER_CHECKBOX
    assert "Traceback" not in server.log()
