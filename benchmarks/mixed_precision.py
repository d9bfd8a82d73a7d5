"""Mixed-precision frontier on the reference pipelines: uniform W8A8 / W4A8, the paper's W4A8-MP heuristic, and
plans searched at several average weight-bit budgets (issue 7).

Per pipeline (image, video and their stressed copies):
1. one calibration run (as `quality.py`: other prompts and seeds than the evaluation's);
2. the sensitivity table: each layer group (role x block range) quantized alone at W4A8, W4A8 in groups of 64
   (4.625 bits with the group scales), W8A8 and timestep-wise (W8 while t >= 750, W4 after; both copies
   stored and counted), all with the per-layer balancing, generated on the calibration prompts (other
   seeds), scored by the pipeline's own metrics: fidelity = minus the relative squared error vs FP (squared
   errors of groups add up; dB do not), text alignment = the classifier's accuracy on the request, temporal
   consistency = minus the warp error relative to FP (video). Cached, so reruns resume;
3. plans allocated at each budget among the single-precision options, and one among all of them
   (`mixed_precision.allocate_best`, an exact integer program); with `--candidates N` its N best plans are
   each generated whole on the confirmation prompts (the calibration prompts again, `--confirm-repeats` seeds
   each, other seeds than the sensitivity's) and the best measured kept (`search.confirm`);
4. every config evaluated on the evaluation prompts, as `quality.py` does.

It prints a frontier table per pipeline, which groups each searched plan protected (W8), the proxy's rank
agreement, the heuristic's fidelity loss as the sensitivity table predicts it with the budget from which a
searched plan is predicted to match it, and writes a sensitivity heatmap PNG, the calibration statistics and
every searched plan (JSON, for
`ViDiTQConfig(plan=..., calibration=...)`) per pipeline into `--out`.

    python -m benchmarks.mixed_precision [--only image|video] [--budgets 6 5 4.5] [--block-ranges 2]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from diffusers import DiffusionPipeline

from benchmarks.quality import ROOT, ImageTask, VideoTask, calibrate_task, evaluate
from reference.classifier import load_classifier
from viditq_diffusers import ViDiTQConfig, metrics
from viditq_diffusers.jsonio import write_json
from viditq_diffusers.mixed_precision import allocate_best, rank_agreement
from viditq_diffusers.mixed_precision.heatmap import save_heatmap
from viditq_diffusers.mixed_precision.search import confirm, plan_from_choice, quantizable_groups
from viditq_diffusers.mixed_precision.sensitivity import FIDELITY, TEMPORAL, TEXT, measure
from viditq_diffusers.plan import build_plan
from viditq_diffusers.testing.stress import stress

OPTIONS = {"W4A8": {"preset": "w4a8"}, "W8A8": {"preset": "w8a8"},
           # 4-bit weights in groups of 64 input channels: 4.625 bits with the group scales and zero points
           "W4A8-g64": {"preset": "w4a8", "group_size": 64},
           # timestep-wise: W8 for the first ~quarter of the steps (t >= 750), W4 after; both copies stored
           "W4A8, W8 while t >= 750": {"preset": "w4a8", "early_weight_bits": 8, "early_timestep": 750.0}}
SINGLE = ("W4A8", "W4A8-g64", "W8A8")  # one precision for all steps


def scorer(task, classifier, prompts_digits):
    """Higher-is-better scores of samples vs the FP samples of the same prompts and seeds."""
    def score(samples, reference):
        out = {FIDELITY: -metrics.relative_mse(samples, reference)}  # additive across groups, unlike dB
        if isinstance(task, VideoTask):
            digits, directions = prompts_digits
            from reference.evaluate_video import classify_clips

            got_d, got_m = classify_clips(classifier, samples)
            hits = sum(int(d) == e and m == f for d, m, e, f in zip(got_d, got_m, digits, directions))
            out[TEXT] = hits / len(digits)
            out[TEMPORAL] = -metrics.temporal_consistency(samples) / metrics.temporal_consistency(reference)
        else:
            out[TEXT] = metrics.accuracy(classifier(samples), torch.tensor(prompts_digits))
        return out
    return score


def sensitivity_prompts(task, repeats=1):
    """The calibration prompts (not the evaluation's) with what they ask for, each `repeats` times."""
    if isinstance(task, VideoTask):
        from reference.video_data import DIRECTIONS

        return (task.calibration_prompts * repeats,
                ([d for d in range(10)] * repeats, [DIRECTIONS[(d + 1) % 4] for d in range(10)] * repeats))
    return task.calibration_prompts * repeats, list(range(10)) * repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["image", "video"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[6.0, 5.0, 4.5])
    parser.add_argument("--tw-budget", type=float, default=6.0, help="budget of the timestep-wise search")
    parser.add_argument("--block-ranges", type=int, default=2)
    parser.add_argument("--per-layer", action="store_true", help="every layer its own group (finer, more runs)")
    parser.add_argument("--per-digit", type=int, default=3, help="image evaluation: prompts per digit")
    parser.add_argument("--per-pair", type=int, default=1, help="video evaluation: clips per (digit, direction)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--stress", type=float, default=100.0, help="k of the stressed variants; 0 = skip them")
    parser.add_argument("--stressed-only", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "mixed_precision"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-proxy", action="store_true", help="skip the epsilon-error proxy (halves the search time)")
    parser.add_argument("--candidates", type=int, default=1,
                        help="plans per budget confirmed whole (default 1: none); "
                             "the integer program's pick is a row too")
    parser.add_argument("--confirm-repeats", type=int, default=3, help="confirmation: seeds per calibration prompt")
    parser.add_argument("--sensitivity-repeats", type=int, default=1,
                        help="sensitivity: seeds per calibration prompt (more = less sample noise; its own cache file)")
    parser.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS),
                        help="the precision options to measure and search among (default: all)")
    args = parser.parse_args()
    args.rotation_seeds, args.grid, args.suite, args.alphas = [0], 10, "mixed", []
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    classifier = load_classifier()
    for kind, task in (("image", ImageTask(args)), ("video", VideoTask(args))):
        if args.only not in (None, kind):
            continue
        pipe = DiffusionPipeline.from_pretrained(task.pipeline)
        pipe.set_progress_bar_config(disable=True)
        variants = {} if args.stressed_only else {kind: pipe}
        if args.stress:
            variants[f"{kind}-stressed"] = stress(pipe, k=args.stress)
            variants[f"{kind}-stressed"].set_progress_bar_config(disable=True)
        for slug, variant in variants.items():  # one JSON per pipeline, so variants can run as separate jobs
            write_json(os.path.join(args.out, f"{slug}.json"), run_pipeline(slug, variant, task, classifier, args))


def choice_of(plan: dict, option_plans: dict[str, dict], groups: dict[str, list[str]]) -> dict[str, str] | None:
    """The option each group of `plan` uses (matched on bits, group size and timestep-wise bits), or None when a
    group matches no option."""
    def spec(p, name):
        entry = p["layers"][name]
        return entry.weight_bits, entry.group_size, entry.early_weight_bits

    choice = {}
    for group, layers in groups.items():
        match = [o for o, p in option_plans.items() if all(spec(p, n) == spec(plan, n) for n in layers)]
        if not match:
            return None
        choice[group] = match[0]
    return choice


def equal_fidelity_budget(table: dict, weights: int, target: float, step: float = 0.05) -> float | None:
    """The smallest average weight-bit budget (in `step`s from 4) whose searched plan is predicted (the sum of
    its groups' fidelity degradations) no worse than `target`."""
    bits = 4.0
    while bits <= 8.0:
        if allocate_best(table, bits * weights, 1)[0].degradation[FIDELITY] <= target:
            return bits
        bits = round(bits + step, 6)
    return None


def run_pipeline(slug, pipe, task, classifier, args) -> dict:
    stats = calibrate_task(pipe, task)
    stats.save(os.path.join(args.out, f"{slug}-calibration.safetensors"))  # what the saved plans quantize with
    prompts, asked = sensitivity_prompts(task, args.sensitivity_repeats)
    cache = f"{slug}-sensitivity" + (f"-x{args.sensitivity_repeats}" if args.sensitivity_repeats > 1 else "") + ".json"
    groups = quantizable_groups(pipe.transformer, args.block_ranges, args.per_layer)
    options = {label: OPTIONS[label] for label in args.options}
    table = measure(pipe, groups, options, prompts, list(range(2000, 2000 + len(prompts))),
                    scorer(task, classifier, asked), calibration=stats, proxy=not args.no_proxy,
                    cache=os.path.join(args.out, cache), **task.call)
    save_heatmap(table, os.path.join(args.out, f"{slug}-sensitivity.png"), title=f"{slug}: degradation vs FP")
    weights = sum(pipe.transformer.get_submodule(n).weight.numel() for names in groups.values() for n in names)
    configs = {f"uniform {o}": dict(**OPTIONS[o], stats=True) for o in SINGLE if o in options}
    configs["W4A8-MP (paper heuristic)"] = dict(preset="w4a8_mp", stats=True)
    protected, confirmed, predicted_loss = {}, {}, {}
    confirm_prompts, confirm_asked = sensitivity_prompts(task, args.confirm_repeats)
    confirm_seeds = list(range(3000, 3000 + len(confirm_prompts)))
    confirm_score = scorer(task, classifier, confirm_asked)
    single_table = {g: {o: entries[o] for o in SINGLE if o in entries} for g, entries in table.items()}
    searches = [(f"searched, <= {b:g} bits", "searched", b, single_table) for b in args.budgets]
    if set(options) - set(SINGLE):
        searches.append((f"searched timestep-wise, <= {args.tw_budget:g} bits", "timestep-wise", args.tw_budget,
                         table))
    for label, name, budget, candidates in searches:
        found = allocate_best(candidates, budget * weights, args.candidates)
        best, confirmed[label] = 0, []
        if len(found) > 1:
            best, confirmed[label] = confirm(pipe, groups, options, candidates, found, confirm_prompts, confirm_seeds,
                                             confirm_score, calibration=stats, **task.call)
        choice = found[best].choice
        if best:  # the confirmation changed the pick: evaluate the integer program's own as well
            configs[f"{label} (integer program's pick)"] = dict(
                plan=plan_from_choice(pipe.transformer, groups, options, found[0].choice, stats), stats=True)
        plan = plan_from_choice(pipe.transformer, groups, options, choice, stats)
        configs[label] = dict(plan=plan, stats=True)
        write_json(os.path.join(args.out, f"{slug}-{name}-{budget:g}bits.plan.json"), plan)
        protected[label] = sorted(f"{g}: {o}" for g, o in choice.items() if o != "W4A8")
        if name == "searched":
            predicted_loss[label] = found[best].degradation[FIDELITY]
    # The heuristic in the search's own terms: its predicted fidelity loss, and the budget at which a searched
    # plan is predicted to match it.
    option_plans = {o: build_plan(pipe.transformer, ViDiTQConfig(**OPTIONS[o], calibration=stats)) for o in options}
    heuristic = choice_of(build_plan(pipe.transformer, ViDiTQConfig(preset="w4a8_mp", calibration=stats)),
                          option_plans, groups)
    matched = None
    if heuristic is not None and set(heuristic.values()) <= set(SINGLE):
        predicted = sum(table[g][o]["metrics"][FIDELITY] for g, o in heuristic.items())
        matched = {"heuristic_predicted": predicted,
                   "equal_fidelity_bits": equal_fidelity_budget(single_table, weights, predicted),
                   "searched_predicted": predicted_loss}
    rows = evaluate(pipe, task, args, classifier, os.path.join(args.out, slug), configs)
    video = isinstance(task, VideoTask)
    print(f"\n{slug}\n| config | avg weight bits | weight bytes vs FP16 | PSNR dB | text alignment (accuracy) | FD |"
          + (" warp error / FP |" if video else "") + "\n|---|---:|---:|---:|---:|---:|" + ("---:|" if video else ""))
    for label, r in rows.items():
        bits = f"{r['avg_bits']:.2f}" if "avg_bits" in r else "32 (FP)"
        size = f"{r['bytes_vs_fp16']:.3f}" if "bytes_vs_fp16" in r else "2.000"
        print(f"| {label} | {bits} | {size} | {r['psnr']:.2f} | {r['accuracy']:.3f} | {r['fd']:.3f} |"
              + (f" {r['warp_ratio']:.3f} |" if video else ""))
    for label, kept in protected.items():
        print(f"{label} keeps above W4A8: {', '.join(kept) or 'nothing'}")
        print("  confirmation, relative squared error of each candidate (predicted -> measured whole): " + ", ".join(
            f"{c['predicted'][FIDELITY]:.2e} -> {c['measured'][FIDELITY]:.2e}{' (kept)' if c['chosen'] else ''}"
            for c in confirmed[label]))
    print(f"proxy rank agreement (Spearman, W4A8): {rank_agreement(table, 'W4A8')}")
    if matched:
        print("predicted fidelity loss (sum of the groups' relative squared errors): heuristic "
              f"{matched['heuristic_predicted']:.3e}; " + ", ".join(
                  f"{label}: {v:.3e}" for label, v in matched["searched_predicted"].items())
              + f"; the search is predicted to match the heuristic from {matched['equal_fidelity_bits']} bits")
    return {"rows": rows, "protected": protected, "confirmed": confirmed,
            "rank_agreement": rank_agreement(table, "W4A8"), "heuristic_in_search_terms": matched}


if __name__ == "__main__":
    sys.exit(main())
