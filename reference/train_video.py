"""Train the text-to-video reference pipeline (Latte architecture) on moving digits, from scratch.

The clips come from ``reference.video_data`` (8 frames of 32x32, a digit moving 1.5 px/frame left, right, up
or down, named in the prompt). As the real Latte starts from PixArt-alpha, this one starts from the image
reference pipeline (``reference_models/pixart_digits``, trained by ``reference.train_image``):
- VAE: the image VAE as is (``LattePipeline`` decodes frame by frame);
- tokenizer / text encoder: the image ones, with the words "moving left right up down" appended to the
  vocabulary (new seeded random embedding rows; every other token keeps its id and embedding; frozen);
- transformer: a ``LatteTransformer3DModel`` (8 spatial + 8 temporal blocks, 4 heads x 32 = 128 hidden, patch
  2 -> 16 tokens per frame, cross-attention to the text) whose embedders, spatial blocks and final layer are
  the image transformer's; the temporal blocks are new, with zeroed output projections so that they start
  as the identity (the model starts as the image model applied per frame).
It is trained with the epsilon-prediction DDPM loss, 10% empty-prompt dropout (classifier-free guidance),
AdamW, warmup + constant LR and an EMA of the weights (the EMA weights ship).

Text conditioning matches what ``LattePipeline`` feeds the transformer for ONE prompt per call: the prompt's
T5 features cut to its token count (7 for every prompt here), no attention mask; the unconditional features
are those of "" cut to the same length. (With several prompts per call ``LattePipeline`` pads to 120 tokens
and zeroes the padding instead, which this model was not trained for: call it one prompt at a time, or pass
``prompt_embeds`` / ``negative_prompt_embeds`` from :func:`encode_video_prompts`.)

    python -m reference.train_video --minutes 50 --seed 0          # add --resume to continue
    python -m reference.train_video --save-only                    # re-write the pipeline from the checkpoint

Checkpoints (safetensors + JSON) go to reference_models/.ckpt/latte.safetensors every ``--ckpt-minutes``; the
pipeline goes to reference_models/latte_digits/.
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
from reference.data import PROMPT_WORDS
from reference.train_image import CKPT, ROOT, adapt_threads, build_scheduler, build_tokenizer, optimizer_step
from reference.video_data import FRAMES, all_video_prompts, sample_clips

OUT = os.path.join(ROOT, "latte_digits")
IMAGE = os.path.join(ROOT, "pixart_digits")
NEW_WORDS = ("moving", "left", "right", "up", "down")


def build_video_tokenizer():
    return build_tokenizer(PROMPT_WORDS, extra_words=NEW_WORDS)


def build_video_text_encoder(seed: int):
    """The image pipeline's frozen T5 with one new, seeded random embedding row per new word."""
    from transformers import T5EncoderModel

    enc = T5EncoderModel.from_pretrained(os.path.join(IMAGE, "text_encoder"))
    old = enc.get_input_embeddings().weight.detach()
    rows = torch.randn(len(NEW_WORDS), old.shape[1], generator=torch.Generator().manual_seed(seed + 4)) * old.std()
    enc.set_input_embeddings(torch.nn.Embedding.from_pretrained(torch.cat([old, rows]), freeze=True))
    enc.config.vocab_size = len(old) + len(NEW_WORDS)
    return enc.eval().requires_grad_(False)


def build_video_transformer(seed: int) -> diffusers.LatteTransformer3DModel:
    """8 output channels as in Latte (epsilon + learned-sigma halves): ``LattePipeline`` always keeps only the
    first half of the prediction unless the scheduler's variance is learned. Only that half is trained."""
    torch.manual_seed(seed + 3)
    return diffusers.LatteTransformer3DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=8, num_attention_heads=4,
        attention_head_dim=32, cross_attention_dim=128, caption_channels=64, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, video_length=FRAMES)


@torch.no_grad()
def init_from_image_model(model: diffusers.LatteTransformer3DModel) -> None:
    """Copy the image transformer into ``model`` (see the module docstring); temporal blocks start as identity."""
    image = diffusers.PixArtTransformer2DModel.from_pretrained(os.path.join(IMAGE, "transformer")).state_dict()
    proj_w, proj_b = image.pop("proj_out.weight"), image.pop("proj_out.bias")
    missing, unexpected = model.load_state_dict(image, strict=False)
    assert not unexpected and all(k.startswith(("temporal_transformer_blocks.", "proj_out.")) for k in missing)
    # proj_out rows are ordered (p, q, channel) with the channel fastest: image channel c -> video channel c
    c_img, c_vid = 4, model.config.out_channels
    rows = torch.arange(proj_w.shape[0])
    target = rows // c_img * c_vid + rows % c_img
    model.proj_out.weight.zero_()
    model.proj_out.bias.zero_()
    model.proj_out.weight[target], model.proj_out.bias[target] = proj_w, proj_b
    for block in model.temporal_transformer_blocks:
        for layer in (block.attn1.to_out[0], block.ff.net[2]):
            layer.weight.zero_()
            layer.bias.zero_()


@torch.no_grad()
def encode_video_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """T5 features as ``LattePipeline`` gives them for one prompt per call: cut to the prompt's token count.
    Every prompt must have the same count (true for the video prompts, and for "" cut to that count)."""
    ids = tokenizer(prompts, padding="longest", return_tensors="pt")
    n = int(ids.attention_mask.sum(1).max())
    return text_encoder(ids.input_ids[:, :n], attention_mask=ids.attention_mask[:, :n])[0]


def uncond_features(tokenizer, text_encoder, length: int) -> torch.Tensor:
    """Features of the empty prompt cut to ``length`` tokens, as ``LattePipeline`` builds the negative."""
    ids = tokenizer([""], padding="max_length", max_length=length, return_tensors="pt")
    return text_encoder(ids.input_ids, attention_mask=ids.attention_mask)[0]


def load_image_vae() -> diffusers.AutoencoderKL:
    return diffusers.AutoencoderKL.from_pretrained(os.path.join(IMAGE, "vae")).eval().requires_grad_(False)


def train(args) -> None:
    torch.manual_seed(args.seed)
    tokenizer = build_video_tokenizer()
    text_encoder = build_video_text_encoder(args.seed)
    vae = load_image_vae()
    sf = vae.config.scaling_factor
    model = build_video_transformer(args.seed)
    init_from_image_model(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    prompts = all_video_prompts()
    emb = encode_video_prompts(tokenizer, text_encoder, prompts)
    emb = torch.cat([emb, uncond_features(tokenizer, text_encoder, emb.shape[1])])
    index = {p: i for i, p in enumerate(prompts)}
    alphas_bar = diffusers.DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear").alphas_cumprod
    g = torch.Generator().manual_seed(args.seed + 30)
    step, spent = 0, 0.0
    if args.resume and (meta := load_checkpoint(CKPT, "latte", modules=dict(model=model, ema=ema),
                                                optimizer=opt, generator=g)):
        step, spent = meta["step"], meta["spent"]
    t0, last = time.time() - spent, time.time()
    save = lambda: save_checkpoint(CKPT, "latte", modules=dict(model=model, ema=ema), optimizer=opt,  # noqa: E731
                                   generator=g, step=step, spent=time.time() - t0, args=vars(args))
    bar = tqdm(desc="latte", initial=step, unit="step")
    avg = None
    while time.time() - t0 < args.minutes * 60:
        t_step = time.time()
        clips, _, _, ps = sample_clips(g, args.batch)
        b = clips.shape[0]
        with torch.no_grad():
            z0 = vae.encode(clips.flatten(0, 1)).latent_dist.sample(generator=g) * sf
        z0 = z0.reshape(b, FRAMES, *z0.shape[1:]).transpose(1, 2)       # (B, C, F, h, w), Latte's layout
        ids = torch.tensor([index[p] for p in ps])
        ids[torch.rand(b, generator=g) < args.p_uncond] = len(prompts)  # CFG dropout -> empty prompt
        t = torch.randint(0, 1000, (b,), generator=g)
        if args.high_t > 0:  # bias towards the noisy steps, where the clip's layout and motion are decided
            high = torch.rand(b, generator=g) < args.high_t
            t[high] = torch.randint(500, 1000, (int(high.sum()),), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = alphas_bar[t].view(b, 1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = model(zt, timestep=t, encoder_hidden_states=emb[ids]).sample[:, :4]  # see build_video_transformer
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
    print(f"latte: {step} steps, {(time.time() - t0) / 60:.1f} min, loss(avg) {avg}")
    save_pipeline(args)


def save_pipeline(args) -> str:
    """Write reference_models/latte_digits/ from the checkpoint (EMA transformer weights by default)."""
    tokenizer = build_video_tokenizer()
    model, ema = build_video_transformer(args.seed), build_video_transformer(args.seed)
    meta = load_checkpoint(CKPT, "latte", modules=dict(model=model, ema=ema))
    if meta is None:
        raise SystemExit("no checkpoint: train first (python -m reference.train_video)")
    pipe = diffusers.LattePipeline(
        tokenizer=tokenizer, text_encoder=build_video_text_encoder(args.seed), vae=load_image_vae(),
        transformer=(ema if args.weights == "ema" else model).eval(), scheduler=build_scheduler())
    pipe.save_pretrained(args.out)
    print(f"saved {args.out} ({args.weights} weights, step {meta['step']}, {meta['spent'] / 60:.1f} min)")
    return args.out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=50.0, help="wall-clock training budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--save-only", action="store_true", help="only write the pipeline from the checkpoint")
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--high-t", type=float, default=0.0,
                   help="fraction of each batch with timesteps drawn from [500, 1000) instead of [0, 1000)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=OUT, help="pipeline folder to write")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="transformer weights to ship")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    (save_pipeline if args.save_only else train)(args)


if __name__ == "__main__":
    main()
