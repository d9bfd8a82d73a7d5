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
STEPS_RANGE = (1, 100)
GUIDANCE_RANGE = (0.0, 30.0)
# One Calibrate request runs the whole pipeline once per prompt on the app's single queue: bounded, so that no
# request holds it for hours (the statistics settle after a few dozen prompts).
MAX_CALIBRATION_PROMPTS = 64
CALIBRATION_PROMPTS = ["a thick handwritten digit 7", "a thin handwritten digit 3", "an italic handwritten digit 5",
                       "a faint handwritten digit 0", "a handwritten digit 8"]
