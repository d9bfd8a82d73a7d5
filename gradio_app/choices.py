"""What the UI offers (pure data, so the page can be built and served before torch and the models load)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = {  # choice shown in the UI -> pipeline directory
    "bundled image: pixart_digits": os.path.join(ROOT, "reference_models", "pixart_digits"),
    "bundled video: latte_digits": os.path.join(ROOT, "reference_models", "latte_digits"),
}
DEFAULT_SOURCE = next(iter(BUNDLED))
CUSTOM = "local directory or Hub id"
VARIANTS = ("FP", "W8A8", "W4A8-MP")
# The checkbox (and --quantize-text-encoder): the quantized variants load their text encoders weight-only int8 too,
# the encoders' own default (activations stay FP: T5's outlier channels; an encoder runs once per prompt)
ENCODER_PRESET = "w8a16"
ENCODER_CHECKBOX = "Quantize the text encoder too (W8A16)"
# At 1 step the PixArt pipelines take a one-step-model path that needs a scheduler returning two outputs (LCM-like)
# and crash with the bundled DPM-Solver one; 2 is the smallest count every pipeline the app offers runs.
STEPS_RANGE = (2, 100)
SEED_RANGE = (0, 2**63 - 1)  # torch.Generator.manual_seed takes a 64-bit seed
GUIDANCE_RANGE = (0.0, 30.0)
# One Calibrate request runs the whole pipeline once per prompt on the app's single queue: bounded, so that no
# request holds it for hours (the statistics settle after a few dozen prompts).
MAX_CALIBRATION_PROMPTS = 64
MAX_CALIBRATION_STEPS = 640  # prompts x steps of one Calibrate request: e.g. 64 prompts at 10 steps, 32 at 20
DEFAULT_SAVE_ROOT = "viditq-out"  # Save writes only inside this folder (--output-dir), relative to the start folder
CALIBRATION_PROMPTS = ["a thick handwritten digit 7", "a thin handwritten digit 3", "an italic handwritten digit 5",
                       "a faint handwritten digit 0", "a handwritten digit 8"]
