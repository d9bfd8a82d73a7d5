"""Every value a request brings, checked in one place before anything runs (no torch, no Gradio: the page is
served before those load).

Each check returns the value in the type the pipelines take, or raises `ValueError` with a message that names the
field, the value and the fix (the app shows it as `gr.Error`). Numbers come from Gradio unrounded (the app's
`gr.Number` fields have no precision), so NaN, infinity, text and fractions reach these checks too.
"""

from __future__ import annotations

import math
import numbers
import os

from .choices import GUIDANCE_RANGE, MAX_CALIBRATION_PROMPTS, MAX_CALIBRATION_STEPS, SEED_RANGE, STEPS_RANGE


def finite_number(value) -> int | float | None:
    """`value` as a finite int or float (numbers, or their text as an API client may send); None otherwise."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value) if math.isfinite(value) else None


def whole_number(field: str, value, low: int, high: int, fix: str) -> int:
    number = finite_number(value)
    if number is None or number != int(number) or not low <= number <= high:
        raise ValueError(f"{field} must be a whole number from {low} to {high} (got {value!r}); {fix}.")
    return int(number)


def real_number(field: str, value, low: float, high: float, fix: str) -> float:
    number = finite_number(value)
    if number is None or not low <= number <= high:
        raise ValueError(f"{field} must be a number from {low:g} to {high:g} (got {value!r}); {fix}.")
    return float(number)


def steps_and_guidance(steps, guidance) -> tuple[int, float]:
    return (whole_number("Steps", steps, *STEPS_RANGE, "20 is a good default"),
            real_number("Guidance", guidance, *GUIDANCE_RANGE, "4.5 is a good default"))


def generation(prompt, steps, guidance, seed) -> tuple[str, int, float, int]:
    """A Generate request: (prompt, steps, guidance, seed)."""
    prompt = prompt.strip() if isinstance(prompt, str) else ""
    if not prompt:
        raise ValueError("The prompt is empty: type what to generate, e.g. 'a thick handwritten digit 7'.")
    steps, guidance = steps_and_guidance(steps, guidance)
    return prompt, steps, guidance, whole_number("The seed", seed, *SEED_RANGE, "any whole number such as 0 will do")


def calibration_prompts(text) -> list[str]:
    """The non-empty lines of the Calibrate box; refused when there are none or more than
    MAX_CALIBRATION_PROMPTS."""
    prompts = [line.strip() for line in (text if isinstance(text, str) else "").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("No calibration prompts: write one prompt per line, like those you will generate.")
    if len(prompts) > MAX_CALIBRATION_PROMPTS:
        raise ValueError(f"{len(prompts)} calibration prompts: at most {MAX_CALIBRATION_PROMPTS} per request (each "
                         f"runs the whole pipeline); keep a representative {MAX_CALIBRATION_PROMPTS}, or calibrate "
                         f"offline with `viditq calibrate` and its --prompts file.")
    return prompts


def calibration(text, steps, guidance) -> tuple[list[str], int, float]:
    """A Calibrate request: (prompts, steps, guidance). It runs prompts x steps denoising steps on the app's single
    queue, so that product is bounded too."""
    prompts = calibration_prompts(text)
    steps, guidance = steps_and_guidance(steps, guidance)
    if len(prompts) * steps > MAX_CALIBRATION_STEPS:
        raise ValueError(f"{len(prompts)} calibration prompts x {steps} steps = {len(prompts) * steps} denoising "
                         f"steps: at most {MAX_CALIBRATION_STEPS} per request. Use fewer steps (e.g. "
                         f"{max(STEPS_RANGE[0], MAX_CALIBRATION_STEPS // len(prompts))} for {len(prompts)} prompts) "
                         f"or fewer prompts, or calibrate offline with `viditq calibrate`.")
    return prompts, steps, guidance


def save_directory(root: str, directory) -> str:
    """The absolute folder to save into: `directory` read relative to the output root, which it must stay inside
    once `..` and symlinks are resolved. Refused: the root itself, a file, and a non-empty folder that holds no
    saved pipeline (no model_index.json), so that a save never overwrites files it did not write."""
    from viditq_diffusers.atomic import TEMP_PREFIX  # here: the core loads torch, and the page is served before

    text = directory.strip() if isinstance(directory, str) else ""
    root = os.path.realpath(root)
    if not text:
        raise ValueError(f"No directory given: type a folder name such as pixart-w8a8; it is created inside the "
                         f"output folder {root}.")
    target = os.path.realpath(os.path.join(root, text))  # an absolute `text` replaces the root: refused below
    if target == root or os.path.commonpath([root, target]) != root:
        raise ValueError(f"Cannot save to {text!r}: that is {target}, and this app saves only inside its output "
                         f"folder {root}. Type a folder name inside it, such as pixart-w8a8, or restart the app "
                         f"with --output-dir set to where saves should go.")
    existing = target  # the folder itself, else the nearest parent that exists: a folder too, or a save fails
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"Cannot save to {target}: {existing} is a file. Type the name of a new folder, such as "
                         f"pixart-w8a8.")
    if os.path.isdir(target) and not os.path.isfile(os.path.join(target, "model_index.json")):
        foreign = sorted(name for name in os.listdir(target) if not name.startswith(TEMP_PREFIX))
        if foreign:
            raise ValueError(f"Cannot save to {target}: it holds other files ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}) and no saved pipeline, and a save would "
                             f"overwrite them. Type the name of a new folder, or empty this one.")
    return target
