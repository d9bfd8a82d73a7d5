"""Train the text-to-image reference pipeline (PixArt-alpha architecture) on the digit data, from scratch.

Two stages, each resumable and time-boxed, then the pipeline directory is written:
  1. ``vae``: a small ``AutoencoderKL`` (32x32x3 -> 8x8x4 latents) with L1 + MSE reconstruction and a small
     KL term; its ``scaling_factor`` is then set to 1/std of the latents it produces.
  2. ``transformer``: a ``PixArtTransformer2DModel`` (8 layers, 4 heads x 32 = 128 hidden, patch 2 -> 16
     tokens, cross-attention to a frozen random-init T5 encoder) with the epsilon-prediction DDPM loss on the
     scaled latents, 10% empty-prompt dropout (for classifier-free guidance), AdamW, warmup + constant LR, and
     an EMA of the weights (the EMA weights are what ship).

    python -m reference.train_image --stage vae --minutes 6 --seed 0
    python -m reference.train_image --stage transformer --minutes 49 --seed 0     # add --resume to continue
    python -m reference.train_image --stage save                                  # re-write pipeline from ckpt

Checkpoints (safetensors + JSON, ``reference.checkpoint``) go to reference_models/.ckpt/ every ``--ckpt-minutes``;
the pipeline goes to reference_models/pixart_digits/ (also written at the end of the transformer stage).
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import diffusers

from reference.checkpoint import load_checkpoint, save_checkpoint
from reference.data import PROMPT_WORDS, all_prompts, sample_batch

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference_models")
CKPT = os.path.join(ROOT, ".ckpt")
OUT = os.path.join(ROOT, "pixart_digits")
TEXT_LEN = 8  # enough for every prompt; padding is masked, so the pipeline's 120-token padding is equivalent


# ------------------------------------------------------------------------------------------------ components
def build_tokenizer(words: tuple[str, ...] = PROMPT_WORDS, extra_words: tuple[str, ...] = ()):
    """A T5 (Unigram) tokenizer built in code over the prompt words (char fallback for anything else);
    ``extra_words`` are appended at the end, so every other token keeps its id."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'-\""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in words]
    vocab += [(c, -10.0) for c in chars]
    vocab += [("\u2581" + c, -9.0) for c in chars if c not in words]
    vocab += [("\u2581" + w, -3.0) for w in extra_words]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=120)


def build_text_encoder(vocab_size: int, seed: int):
    """A small T5 encoder (d_model 64), frozen at its seeded random init."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    enc = T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return enc.eval().requires_grad_(False)


def build_vae(seed: int) -> diffusers.AutoencoderKL:
    torch.manual_seed(seed + 1)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=32)


def build_transformer(seed: int) -> diffusers.PixArtTransformer2DModel:
    torch.manual_seed(seed + 2)
    return diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=8, patch_size=2, attention_head_dim=32, num_attention_heads=4, in_channels=4,
        out_channels=4, cross_attention_dim=128, caption_channels=64, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6)


def build_scheduler():
    # PixArt-alpha's scheduler config (linear betas, DPM-Solver++ order 2, epsilon prediction)
    return diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon", solver_order=2, algorithm_type="dpmsolver++")


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 features and masks exactly as ``PixArtAlphaPipeline.encode_prompt`` computes them (shorter pad)."""
    t = tokenizer(prompts, padding="max_length", max_length=TEXT_LEN, truncation=True,
                  add_special_tokens=True, return_tensors="pt")
    return text_encoder(t.input_ids, attention_mask=t.attention_mask)[0], t.attention_mask


# ------------------------------------------------------------------------------------------------ stage 1: VAE
def train_vae(args) -> None:
    vae = build_vae(args.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 10)
    step, spent = 0, 0.0
    if args.resume and (meta := load_checkpoint(CKPT, "vae", modules=dict(model=vae), optimizer=opt, generator=g)):
        step, spent = meta["step"], meta["spent"]
    t0, last = time.time() - spent, time.time()
    bar = tqdm(desc="vae", initial=step, unit="step")
    while time.time() - t0 < args.minutes * 60:
        x = sample_batch(g, args.vae_batch)[0]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.3f}")
        if time.time() - last > args.ckpt_minutes * 60:
            save_checkpoint(CKPT, "vae", modules=dict(model=vae), optimizer=opt, generator=g, step=step,
                            spent=time.time() - t0)
            last = time.time()
    bar.close()
    # scaling factor = 1 / std of sampled latents over a large fixed batch; report reconstruction PSNR
    vae.eval()
    with torch.no_grad():
        x = sample_batch(torch.Generator().manual_seed(123), 1024)[0]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=torch.Generator().manual_seed(0))
        rec = vae.decode(post.mode()).sample.clamp(-1, 1)
        psnr = 10 * torch.log10(4.0 / F.mse_loss(rec, x))
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    print(f"vae: {step} steps, {(time.time() - t0) / 60:.1f} min, latent std {z.std():.3f}, "
          f"latent mean {z.mean():.3f}, recon PSNR {psnr:.2f} dB")
    save_checkpoint(CKPT, "vae", modules=dict(model=vae), optimizer=opt, generator=g, step=step,
                    spent=time.time() - t0, scaling_factor=vae.config.scaling_factor, psnr=float(psnr), done=True)


def load_trained_vae(seed: int) -> diffusers.AutoencoderKL:
    vae = build_vae(seed)
    meta = load_checkpoint(CKPT, "vae", modules=dict(model=vae))
    if not (meta and meta.get("done")):
        raise SystemExit("train the VAE first: --stage vae")
    vae.register_to_config(scaling_factor=meta["scaling_factor"])
    return vae.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ stage 2: DiT
_times: dict[int, list[float]] = {}


def adapt_threads(step: int, seconds: float, max_threads: int) -> int:
    """Cope with a shared CPU: every 100 steps time 5 steps at 1 thread and 5 at ``max_threads``, then keep
    the faster (with another busy process, 2 OpenMP threads on 2 cores can be 10x slower than 1)."""
    phase = step % 100
    if phase in range(1, 11):
        _times.setdefault(torch.get_num_threads(), []).append(seconds)
    if phase == 0:
        _times.clear()
    if phase < 5:
        torch.set_num_threads(1)
    elif phase < 10:
        torch.set_num_threads(max_threads)
    elif phase == 10:
        best = min(_times, key=lambda k: sorted(_times[k])[len(_times[k]) // 2])
        torch.set_num_threads(best)
    return torch.get_num_threads()


def optimizer_step(model, ema, opt, loss: torch.Tensor, step: int, args) -> None:
    """One AdamW step (linear warmup, then constant LR; grad-clip 1.0) and the EMA update of ``ema``."""
    for grp in opt.param_groups:
        grp["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    d = min(args.ema, (1 + step) / (10 + step))  # short EMA memory early in training
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - d)


def train_transformer(args) -> None:
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), args.seed)
    vae = load_trained_vae(args.seed)
    sf = vae.config.scaling_factor
    model = build_transformer(args.seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    prompts = all_prompts()
    emb, mask = encode_prompts(tokenizer, text_encoder, prompts + [""])
    index = {p: i for i, p in enumerate(prompts)}
    alphas_bar = diffusers.DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear").alphas_cumprod
    g = torch.Generator().manual_seed(args.seed + 20)
    step, spent = 0, 0.0
    if args.resume and (meta := load_checkpoint(CKPT, "transformer", modules=dict(model=model, ema=ema),
                                                optimizer=opt, generator=g)):
        step, spent = meta["step"], meta["spent"]
    save = lambda: save_checkpoint(CKPT, "transformer", modules=dict(model=model, ema=ema),  # noqa: E731
                                   optimizer=opt, generator=g, step=step, spent=time.time() - t0, args=vars(args))
    t0, last = time.time() - spent, time.time()
    bar = tqdm(desc="transformer", initial=step, unit="step")
    avg = None
    while time.time() - t0 < args.minutes * 60:
        t_step = time.time()
        x, _, _, ps = sample_batch(g, args.batch)
        with torch.no_grad():
            z0 = vae.encode(x).latent_dist.sample(generator=g) * sf
        b = z0.shape[0]
        ids = torch.tensor([index[p] for p in ps])
        ids[torch.rand(b, generator=g) < args.p_uncond] = len(prompts)  # CFG dropout -> empty prompt
        t = torch.randint(0, 1000, (b,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = alphas_bar[t].view(b, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = model(zt, encoder_hidden_states=emb[ids], encoder_attention_mask=mask[ids], timestep=t,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        loss = F.mse_loss(pred, eps)
        optimizer_step(model, ema, opt, loss, step, args)
        step += 1
        threads = adapt_threads(step, time.time() - t_step, args.threads)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.update()
        bar.set_postfix(loss=f"{avg:.4f}", threads=threads)
        if time.time() - last > args.ckpt_minutes * 60:
            save()
            last = time.time()
    bar.close()
    save()
    print(f"transformer: {step} steps, {(time.time() - t0) / 60:.1f} min, loss(avg) {avg}")
    save_pipeline(args)


def save_pipeline(args) -> str:
    """Write reference_models/pixart_digits/ from the checkpoints (EMA transformer weights by default)."""
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), args.seed)
    model, ema = build_transformer(args.seed), build_transformer(args.seed)
    meta = load_checkpoint(CKPT, "transformer", modules=dict(model=model, ema=ema))
    if meta is None:
        raise SystemExit("no checkpoint: train first (--stage transformer)")
    transformer = ema if args.weights == "ema" else model
    pipe = diffusers.PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=load_trained_vae(args.seed),
        transformer=transformer.eval(), scheduler=build_scheduler())
    pipe.save_pretrained(args.out)
    print(f"saved {args.out} ({args.weights} transformer weights, step {meta['step']}, {meta['spent'] / 60:.1f} min)")
    return args.out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["vae", "transformer", "save"], required=True)
    p.add_argument("--minutes", type=float, default=50.0, help="wall-clock budget for this stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1.5e-3)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--kl", type=float, default=1e-3, help="weight of the per-pixel KL term (VAE stage)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=OUT, help="pipeline folder to write")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="transformer weights to ship")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"vae": train_vae, "transformer": train_transformer, "save": save_pipeline}[args.stage](args)


if __name__ == "__main__":
    main()
