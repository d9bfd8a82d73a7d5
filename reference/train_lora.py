"""Train the reference LoRA: ``reference_models/pixart_digits`` drawing every digit mirrored left-right.

A rank-8 LoRA (PEFT, ``init_lora_weights=True``: B = 0, so training starts from the base model) on the
attention and feed-forward linears of the transformer blocks (``attn1`` / ``attn2`` ``to_q, to_k, to_v,
to_out.0``, ``ff.net.0.proj``, ``ff.net.2``: the layers ViDiT-Q quantizes), trained in FP32 on CPU with the
base model's epsilon loss on *mirrored* digits: the training images are ``reference.data.sample_batch``
(every prompt and style of the base pipeline) flipped left-right, encoded once by the pipeline's VAE into a
fixed pool of latents. The prompts are unchanged, so the LoRA changes the style, not the vocabulary; 10% of
prompts are replaced by "" as in the base training, so classifier-free guidance stays consistent.

Only the LoRA factors train (the base transformer, VAE and text encoder are frozen); AdamW, constant LR after
a short warm-up, grad-clip 1.0, time-boxed. The result is written in the diffusers/PEFT LoRA format that
``pipe.load_lora_weights`` reads: ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` in
``pytorch_lora_weights.safetensors``, the ``LoraConfig`` as ``lora_adapter_metadata`` (keys prefixed
``transformer.``), tensors stored in fp16. Load it with ``viditq_diffusers.lora.load_lora_file`` (PixArt has no
diffusers loader).

    OMP_NUM_THREADS=1 python -m reference.train_lora --minutes 8 --seed 0
    OMP_NUM_THREADS=1 python -m reference.train_lora --evaluate-only   # re-measure the shipped LoRA, FP32 and W8A8
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
import os
import time

import torch
import torch.nn.functional as F

import diffusers

from reference.data import all_prompts, sample_batch
from reference.train_image import OUT as PIPELINE, encode_prompts
from viditq_diffusers.atomic import atomic_path

OUT = os.path.join(os.path.dirname(PIPELINE), "pixart_digits_lora")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
# the shipped LoRA's recipe (its README): the parser's defaults, and what benchmarks/lora_training.py trains with
RECIPE = dict(rank=8, lr=2e-3, warmup=20, batch=64, pool=2048, p_uncond=0.1, seed=0)
# digits whose mirror image the classifier does not read as the digit (0, 1 and 8 are near-symmetric)
ASYMMETRIC = (2, 3, 4, 5, 6, 7, 9)


def mirror(images: torch.Tensor) -> torch.Tensor:
    """The style the LoRA learns: flip left-right (last axis)."""
    return images.flip(-1)


@torch.no_grad()
def mirror_score(classifier, samples: torch.Tensor, digits: list[int]) -> dict[str, float]:
    """How mirrored samples (in [-1, 1]) are: the classifier's accuracy on them as drawn and flipped back.

    A mirrored digit is recognised when flipped back ("flipped"), an upright one as drawn ("upright");
    ``mirrored = flipped - upright`` goes from about -1 (all upright) to +1 (all mirrored)."""
    want = torch.tensor(digits)
    upright = (classifier(samples).argmax(-1) == want).float().mean().item()
    flipped = (classifier(mirror(samples)).argmax(-1) == want).float().mean().item()
    return {"upright": upright, "flipped": flipped, "mirrored": flipped - upright}


@torch.no_grad()
def latent_pool(vae, n: int, seed: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``n`` mirrored training images encoded once: (posterior mean, std, prompts); latents are unscaled."""
    g = torch.Generator().manual_seed(seed)
    means, stds, prompts = [], [], []
    for start in range(0, n, chunk):
        images, _, _, batch_prompts = sample_batch(g, min(chunk, n - start))
        post = vae.encode(mirror(images)).latent_dist
        means.append(post.mean), stds.append(post.std), prompts.extend(batch_prompts)
    return torch.cat(means), torch.cat(stds), prompts


def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=True)


def save_lora(transformer, adapter_name: str, config, folder: str, extra: dict) -> str:
    """Write the adapter as diffusers' ``save_lora_weights`` does for a pipeline's transformer."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    # stored in fp16 (half the bytes, as most LoRA files); loading casts to the model's dtype
    state = {f"transformer.{k}": v.detach().half().contiguous() for k, v in state.items()}
    meta = {f"transformer.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, WEIGHT_NAME)
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True),
                                        "training": json.dumps(extra, sort_keys=True)})
    return path


@dataclass
class TrainingData:
    """What every step samples from: the text features of every prompt and of "" (last), the pool of mirrored
    latents (posterior mean and std, unscaled) with each one's prompt index, the VAE's scaling factor and the
    DDPM schedule's cumulative alphas."""

    emb: torch.Tensor
    mask: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    pool_ids: torch.Tensor
    scaling_factor: float
    alphas_bar: torch.Tensor

    @property
    def empty_prompt(self) -> int:
        return self.emb.shape[0] - 1


def training_data(pipe, pool: int, seed: int) -> TrainingData:
    """Encode the prompts and a pool of `pool` mirrored images once (the pipeline's text encoder and VAE)."""
    prompts = all_prompts()
    with torch.no_grad():
        emb, mask = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts + [""])
    index = {p: i for i, p in enumerate(prompts)}
    mean, std, pool_prompts = latent_pool(pipe.vae, pool, seed)
    alphas_bar = diffusers.DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear").alphas_cumprod
    return TrainingData(emb, mask, mean, std, torch.tensor([index[p] for p in pool_prompts]),
                        pipe.vae.config.scaling_factor, alphas_bar)


def add_lora(transformer, rank: int, adapter: str, seed: int):
    """The LoRA on `transformer` (FP or quantized: PEFT injection, `ViDiTQLinear -> ViDiTQLoraLinear` registered);
    returns (its LoraConfig, its trainable parameters). Everything else of the transformer is frozen."""
    from peft import inject_adapter_in_model

    from viditq_diffusers.lora import register_custom_module

    transformer.requires_grad_(False)
    config = register_custom_module(lora_config(rank))
    torch.manual_seed(seed)
    inject_adapter_in_model(config, transformer, adapter_name=adapter)
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return config, params


def train_steps(transformer, data: TrainingData, params, args, steps: int | None = None,
                minutes: float | None = None, log_every: int = 20) -> dict:
    """The training loop: until `steps` steps or `minutes` of wall time (whichever is given). Returns the steps,
    the seconds of each step, the smoothed loss (EMA 0.95) and the wall time."""
    transformer.train()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 1)
    step, avg, t0, step_seconds = 0, None, time.time(), []
    while (step < steps) if steps is not None else (time.time() - t0 < minutes * 60):
        started = time.perf_counter()
        idx = torch.randint(len(data.pool_ids), (args.batch,), generator=g)
        z0 = (data.mean[idx] + data.std[idx] * torch.randn(data.mean[idx].shape, generator=g)) * data.scaling_factor
        ids = data.pool_ids[idx].clone()
        ids[torch.rand(args.batch, generator=g) < args.p_uncond] = data.empty_prompt  # CFG dropout -> ""
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = data.alphas_bar[t].view(-1, 1, 1, 1)
        pred = transformer(a.sqrt() * z0 + (1 - a).sqrt() * eps, encoder_hidden_states=data.emb[ids],
                           encoder_attention_mask=data.mask[ids], timestep=t,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        loss = F.mse_loss(pred, eps)
        for grp in opt.param_groups:
            grp["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        step_seconds.append(time.perf_counter() - started)
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if log_every and step % log_every == 0:
            print(f"step {step}  loss(avg) {avg:.4f}  {time.time() - t0:.0f} s", flush=True)
    transformer.eval()
    return dict(steps=step, step_seconds=step_seconds, final_loss=avg, seconds=time.time() - t0)


def train(args) -> None:
    pipe = diffusers.PixArtAlphaPipeline.from_pretrained(args.pipeline)
    transformer = pipe.transformer.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    t_start = time.time()
    data = training_data(pipe, args.pool, args.seed)
    print(f"encoded {args.pool} mirrored images in {time.time() - t_start:.0f} s", flush=True)
    config, params = add_lora(transformer, args.rank, args.adapter, args.seed)
    result = train_steps(transformer, data, params, args, minutes=args.minutes)
    minutes = result["seconds"] / 60
    print(f"trained {result['steps']} steps in {minutes:.1f} min, loss(avg) {result['final_loss']:.4f}", flush=True)
    extra = dict(steps=result["steps"], minutes=round(minutes, 2), final_loss=round(result["final_loss"], 4),
                 **{k: v for k, v in vars(args).items() if k in ("rank", "lr", "batch", "pool", "seed", "p_uncond",
                                                                 "warmup")})
    path = save_lora(transformer, args.adapter, config, args.out, extra)
    print(f"saved {path} ({os.path.getsize(path) / 1024:.0f} KiB)")


def evaluation_set(samples: int) -> tuple[list[int], list[str]]:
    """The digits and prompts of the mirror evaluation: the asymmetric digits, styles cycling (sample i seeded i)."""
    from reference.data import STYLES, prompt_for

    digits = [ASYMMETRIC[i % len(ASYMMETRIC)] for i in range(samples)]
    return digits, [prompt_for(d, STYLES[i % len(STYLES)]) for i, d in enumerate(digits)]


def sampling_call(steps: int) -> dict:
    return dict(num_inference_steps=steps, guidance_scale=4.5, height=32, width=32, use_resolution_binning=False,
                clean_caption=False)


def calibrate_digits(fp_pipe, steps: int):
    """The statistics the W8A8 of the evaluation is quantized with: 10 prompts (one per digit, plain style)."""
    from reference.data import prompt_for
    from viditq_diffusers import calibrate

    call = {k: v for k, v in sampling_call(steps).items() if k != "num_inference_steps"}
    return calibrate(fp_pipe, [prompt_for(d, "plain") for d in range(10)], num_inference_steps=steps,
                     seeds=[100 + d for d in range(10)], **call)


def evaluate(args) -> dict:
    """Mirror score and fidelity of FP32 and calibrated W8A8, without and with the LoRA (seeded samples of the
    asymmetric digits, styles cycling); writes a grid of the first 14 samples of each to ``samples.png``."""
    from reference.classifier import load_classifier
    from viditq_diffusers import ViDiTQConfig
    from viditq_diffusers.evaluation import generate, save_grid
    from viditq_diffusers.lora import load_lora_file
    from viditq_diffusers.metrics import psnr

    classifier = load_classifier()
    digits, prompts = evaluation_set(args.samples)
    call = sampling_call(args.steps)
    seeds = list(range(len(prompts)))
    fp = diffusers.PixArtAlphaPipeline.from_pretrained(args.pipeline)
    stats = calibrate_digits(fp, args.steps)
    w8a8 = diffusers.PixArtAlphaPipeline.from_pretrained(
        args.pipeline, quantization_config=ViDiTQConfig(preset="w8a8", calibration=stats))
    samples = {}
    for name, pipe in (("FP32", fp), ("W8A8", w8a8)):
        pipe.set_progress_bar_config(disable=True)
        samples[name] = generate(pipe, prompts, seeds, **call)
        load_lora_file(pipe.transformer, args.out, adapter_name=args.adapter)
        samples[f"{name} + LoRA"] = generate(pipe, prompts, seeds, **call)

    print(f"{len(prompts)} samples of digits {ASYMMETRIC} (styles cycling), {args.steps} steps, guidance 4.5; W8A8 "
          f"calibrated on 10 prompts")
    print("| model | recognised as drawn | recognised flipped back | mirrored score | PSNR vs FP32 (same LoRA) dB |")
    print("|---|---:|---:|---:|---:|")
    scores = {}
    for name, x in samples.items():
        scores[name] = {**mirror_score(classifier, x, digits),
                        "psnr": psnr(x, samples[name.replace("W8A8", "FP32")]) if name.startswith("W8A8") else None}
        s = scores[name]
        fidelity = "-" if s["psnr"] is None else f"{s['psnr']:.2f}"
        print(f"| {name} | {s['upright']:.0%} | {s['flipped']:.0%} | {s['mirrored']:+.2f} | {fidelity} |")
    save_grid({name: x[:14] for name, x in samples.items()}, os.path.join(args.out, "samples.png"))
    return scores


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget")
    p.add_argument("--seed", type=int, default=RECIPE["seed"])
    p.add_argument("--rank", type=int, default=RECIPE["rank"])
    p.add_argument("--lr", type=float, default=RECIPE["lr"])
    p.add_argument("--warmup", type=int, default=RECIPE["warmup"])
    p.add_argument("--batch", type=int, default=RECIPE["batch"])
    p.add_argument("--pool", type=int, default=RECIPE["pool"], help="mirrored training images, VAE-encoded once")
    p.add_argument("--p-uncond", type=float, default=RECIPE["p_uncond"])
    p.add_argument("--adapter", default="mirror")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pipeline", default=PIPELINE)
    p.add_argument("--out", default=OUT)
    p.add_argument("--samples", type=int, default=70, help="samples for the evaluation")
    p.add_argument("--steps", type=int, default=20, help="sampling steps for the evaluation")
    p.add_argument("--evaluate-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.evaluate_only:
        train(args)
    evaluate(args)


if __name__ == "__main__":
    main()
