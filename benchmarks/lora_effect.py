"""Effect and fidelity of the shipped reference LoRA (`reference_models/pixart_digits_lora`, mirrors the
digits) on FP32 and on calibrated W8A8, side by side: how often the classifier reads each sample as drawn and
flipped back, and PSNR of W8A8 (+ LoRA) vs FP32 (+ the same LoRA) from the same seeds.

The measurement is `reference.train_lora.evaluate`, the one the training script ends with, so the shipped
LoRA is judged the same way it was accepted; this entry point only runs it without training.

    OMP_NUM_THREADS=1 python -m benchmarks.lora_effect [--samples 70] [--steps 20]
"""

from __future__ import annotations

import sys

from reference.train_lora import main

if __name__ == "__main__":
    main(["--evaluate-only", *sys.argv[1:]])
