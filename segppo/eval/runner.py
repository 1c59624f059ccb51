"""`segppo eval`: generate, score, compare, export.

    results = evaluate(EvalConfig(policy=["sft", "ppo/policy"], prompts="q.jsonl", output="out",
                                  reward_model="rm"))
    results.policies["policy"].win_rate.rate

Steps: load the scorer (a callable first, so a bad `module:function` fails before any model
loads), load the prompts, then for each policy in turn generate all responses (`generate_responses`,
the model freed afterwards), write them to `responses/NAME.jsonl` (a scorer that fails leaves them
there, unscored) and score them; then statistics, win rates against the baseline, exports,
`responses/NAME.jsonl` again with the scores, the plot and `results.json` (written last, atomically).

Output folder:
    results.json                              everything below, summarised
    responses/NAME.jsonl                      every generation with its scores
    alpaca_eval/NAME/model_outputs.json       (--turns 1) AlpacaEval 2
    arena_hard/model_answer/NAME.jsonl        (--turns 1) Arena-Hard v0.1
    mt_bench/model_answer/NAME.jsonl          (--turns 2) MT-Bench
    score_distributions.png                   when matplotlib is installed
"""

from __future__ import annotations

import gc
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from segppo.config import EvalConfig
from segppo.data import ChatFormat
from segppo.generation import SamplingConfig, stop_token_ids
from segppo.io import atomic_write_json, atomic_write_text
from segppo.models import SegppoMetadata, load_tokenizer
from segppo.models.metadata import METADATA_FILE
from segppo.preflight import check_context, check_eval
from segppo.rm.scoring import load_scorer
from segppo.tracking import LiveProgress

from .exports import tiktoken_counter, write_exports
from .generation import Generation, close_engine, generate_responses, load_engine
from .plots import MATPLOTLIB_MISSING, plot_score_distributions
from .prompts import EvalPrompt, load_eval_prompts
from .results import EvalResults, PolicyResult
from .scoring import CallableScorer, RewardModelScorer, ScorerFn, ScoringItem, load_callable
from .stats import mean_ci, win_rate

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass
class PolicySpec:
    name: str
    path: str  # as given
    folder: str  # the model folder (a PPO run folder stands for its policy/)


def policy_folder(path: str) -> str:
    """A PPO run folder stands for its final `policy/` (a model, or with `--lora-export adapter` an
    adapter, which the checks then name as such); anything else is used as given."""
    p = Path(path)
    exported = any((p / "policy" / name).is_file() for name in ("config.json", "adapter_config.json"))
    if p.is_dir() and not (p / "config.json").is_file() and exported:
        return str(p / "policy")
    return path


def _default_name(path: str) -> str:
    p = Path(path.rstrip("/"))
    if p.name in ("", ".."):  # "." or "..": the folder it stands for
        p = Path(os.path.abspath(p))
    if p.name == "policy" and p.parent.name:  # run/policy: the run's name says more
        return p.parent.name
    return p.name or path


def _same_path(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _unique_name(name: str, taken: list[str]) -> str:
    """`name` safe for file names, with `-2`, `-3`, ... when it is taken."""
    clean = re.sub(r"[^A-Za-z0-9._+-]", "_", name) or "policy"
    candidate, k = clean, 1
    while candidate in taken:
        k += 1
        candidate = f"{clean}-{k}"
    return candidate


def policy_specs(cfg: EvalConfig) -> tuple[list[PolicySpec], str | None]:
    """(the policies with unique names, the baseline's name or None).

    Names are `--name`, else the folder's last path component (a run's name for `run/policy`);
    clashing default names get `-2`, `-3`, ... `--baseline` is a name, a `--policy` path, or the
    path of another policy, which is then evaluated too (first). Without `--baseline` the first
    policy is the baseline when there are several.
    """
    paths = list(cfg.policy)
    names = list(cfg.name) if cfg.name else [_default_name(p) for p in paths]
    baseline = None  # the baseline's index
    if cfg.baseline is not None:
        matches = [i for i, (n, p) in enumerate(zip(names, paths, strict=True)) if cfg.baseline in (n, p)]
        matches = matches or [i for i, p in enumerate(paths) if _same_path(cfg.baseline, p)]
        if matches:
            baseline = matches[0]
        else:
            if not Path(cfg.baseline).exists() and "/" not in cfg.baseline:
                raise ValueError(
                    f"--baseline {cfg.baseline!r} is neither a policy name ({', '.join(names)}), "
                    "a --policy path, nor an existing model folder"
                )
            paths.insert(0, cfg.baseline)
            names.insert(0, _default_name(cfg.baseline))
            baseline = 0
    if cfg.name:
        for name in cfg.name:
            if not _NAME.match(name):
                raise ValueError(
                    f"--name {name!r}: use letters, digits, '.', '_', '+' and '-' (it names export files)"
                )
        duplicates = sorted({n for n in cfg.name if cfg.name.count(n) > 1})
        if duplicates:
            raise ValueError(f"--name values must be unique; repeated: {', '.join(duplicates)}")
        if len(names) > len(cfg.name):  # the baseline, evaluated too, has a default name
            names[0] = _unique_name(names[0], cfg.name)
    else:
        taken: list[str] = []
        for name in names:
            taken.append(_unique_name(name, taken))
        names = taken
    if baseline is None and len(paths) > 1:
        baseline = 0
    specs = [PolicySpec(n, p, policy_folder(p)) for n, p in zip(names, paths, strict=True)]
    return specs, None if baseline is None else names[baseline]


def build_scorer(cfg: EvalConfig, scorer_fn: ScorerFn | None, device: torch.device):
    """The callable or reward-model scorer; exactly one must be given."""
    given = [x for x in (cfg.reward_model, cfg.scorer, scorer_fn) if x is not None]
    if len(given) != 1:
        if not given:
            raise ValueError("pass a scorer: --reward-model RM or --scorer module:function")
        raise ValueError("pass exactly one of --reward-model, --scorer (or a scorer function)")
    if cfg.scorer is not None:
        return CallableScorer(load_callable(cfg.scorer), name=cfg.scorer)
    if scorer_fn is not None:
        return CallableScorer(scorer_fn)
    rm = load_scorer(
        cfg.reward_model,
        device=device,
        dtype="bf16" if cfg.bf16 else None,
        segmenter=cfg.segmenter,
        granularity=cfg.granularity,
        threshold=cfg.threshold,
        trust_remote_code=cfg.trust_remote_code,
    )
    return RewardModelScorer(
        rm,
        path=cfg.reward_model,
        normalize=cfg.normalize,
        normalizer=cfg.normalizer,
        reward_mean=cfg.reward_mean,
        reward_std=cfg.reward_std,
        sigma_floor=cfg.sigma_floor,
        max_prompt_len=cfg.max_prompt_len,
    )


def chat_template_for(cfg: EvalConfig, tokenizer, scorer) -> tuple[str | None, str]:
    """(template argument for ChatFormat, where it came from).

    `--chat-template`, else the RM's (its recorded template, as PPO formats prompts) when the RM
    shares the policy's tokenizer, else the policy tokenizer's own (or segppo's default).
    """
    if cfg.chat_template:
        return cfg.chat_template, "--chat-template"
    if isinstance(scorer, RewardModelScorer) and scorer.shares_tokenizer(tokenizer):
        return scorer.chat.template, "reward model"
    return None, "policy tokenizer"


def chat_template_kwargs_for(
    cfg: EvalConfig, tokenizer, scorer, policy_folder: str | None = None
) -> dict | None:
    """The template variables: `--chat-template-kwargs`, else the ones a segppo PPO policy records
    it was trained with (its segppo.json), else the RM's recorded ones when the RM shares the
    policy's tokenizer (they belong to that tokenizer's model family), else none."""
    if cfg.chat_template_kwargs is not None:
        return cfg.chat_template_kwargs
    trained_with = _recorded_template_kwargs(policy_folder)
    if trained_with is not None:
        return trained_with
    if isinstance(scorer, RewardModelScorer) and scorer.shares_tokenizer(tokenizer):
        return scorer.chat.template_kwargs
    return None


def _recorded_template_kwargs(policy_folder: str | None) -> dict | None:
    """The template variables a policy folder's segppo.json records (a PPO policy's), if any."""
    path = Path(policy_folder) / METADATA_FILE if policy_folder else None
    if path is None or not path.is_file():
        return None
    try:
        return SegppoMetadata.load(path).chat_template_kwargs
    except ValueError:  # not segppo's, or damaged: the policy is prompted as any other
        return None


def _summarise(spec: PolicySpec, generations: list[Generation], rm: bool, **extra) -> PolicyResult:
    groups = [g.prompt.index for g in generations]
    segments = length = None
    if rm:
        total_segments = sum(g.num_segments or 0 for g in generations)
        segments = total_segments / len(generations)
        length = sum(g.scored_tokens or 0 for g in generations) / max(total_segments, 1)
    return PolicyResult(
        name=spec.name,
        path=spec.path,
        generations=generations,
        score=mean_ci([g.score for g in generations], groups),
        normalized_reward=mean_ci([g.normalized_reward for g in generations], groups) if rm else None,
        response_length=mean_ci([g.length for g in generations], groups),
        eos_fraction=sum(g.has_eos for g in generations) / len(generations),
        segments=segments,
        segment_length=length,
        truncated_prompts=sum(g.prompt_truncated for g in generations if g.sample == 0),
        **extra,
    )


def _add_win_rates(policies: dict[str, PolicyResult], baseline: str | None, rm: bool) -> None:
    if baseline is None:
        return
    base = policies[baseline].generations
    groups = [g.prompt.index for g in base]
    for name, result in policies.items():
        if name == baseline:
            continue
        same = [a.turns == b.turns for a, b in zip(result.generations, base, strict=True)]
        result.win_rate = win_rate(
            [g.score for g in result.generations], [g.score for g in base], groups, same
        )
        if rm:
            result.win_rate_normalized = win_rate(
                [g.normalized_reward for g in result.generations],
                [g.normalized_reward for g in base],
                groups,
                same,
            )


def trained_on_note(spec: PolicySpec, cfg: EvalConfig) -> str | None:
    """A note when a segppo PPO policy was trained on these very prompts (DESIGN.md §3.6)."""
    path = Path(spec.folder) / METADATA_FILE
    if not path.is_file():
        return None
    try:
        data = SegppoMetadata.load(path).data or {}
    except ValueError:
        return None
    trained, split = data.get("prompts"), data.get("split", "train")
    if not isinstance(trained, str) or split != cfg.split:
        return None
    same = trained == cfg.prompts or (
        Path(trained).exists()
        and Path(cfg.prompts).exists()
        and Path(trained).resolve() == Path(cfg.prompts).resolve()
    )
    if not same:
        return None
    return (
        f"{spec.name} was trained with PPO on these prompts ({cfg.prompts}, split {split!r}): "
        "its scores are on training prompts, not held-out ones"
    )


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate(cfg: EvalConfig, *, scorer_fn: ScorerFn | None = None, progress: bool = True) -> EvalResults:
    """Generate with every policy, score, compare against the baseline, export; see the module doc.

    `scorer_fn` is a Python callable `f(prompts, responses) -> list[float]` to score with instead
    of `cfg.reward_model`/`cfg.scorer` (exactly one of the three). `progress` shows a progress bar.
    Returns the results; `results.json` and the other files are in `cfg.output`.
    """
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    specs, baseline = policy_specs(cfg)
    # paths and hub names, in one line, before any model is loaded
    fields = {s.folder: "policy" if s.path in cfg.policy else "baseline" for s in specs}
    check_eval(cfg, fields, [s.name for s in specs])
    for spec in specs:  # the first turn fits every policy (the engines check each batch as well)
        check_context(spec.folder, "policy", cfg)
    scorer = build_scorer(cfg, scorer_fn, device)
    rm = isinstance(scorer, RewardModelScorer)
    prompts, report = load_eval_prompts(
        cfg.prompts, split=cfg.split, max_samples=cfg.max_samples, prompt_key=cfg.prompt_key, turns=cfg.turns
    )
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if report.skipped:
        notes.append(f"prompts: {report}")
    if rm and scorer.params is None:
        notes.append(
            "the reward model has no normalizer: normalized_reward is the sum of raw segment rewards "
            "(fit one with `segppo fit-normalizer` and pass --normalizer)"
        )
    if cfg.greedy and cfg.top_p < 1:  # the argmax is in every nucleus
        notes.append(f"--top-p {cfg.top_p} was not applied: --temperature 0 decodes greedily")
    counter = tiktoken_counter()
    token_len_counter = "tiktoken gpt-3.5-turbo" if counter is not None else "policy tokenizer"

    total = len(specs) * len(prompts) * cfg.num_samples * cfg.turns
    policies: dict[str, PolicyResult] = {}
    with LiveProgress(total, "eval", enabled=progress, unit="responses") as bar:
        for spec in specs:
            bar.update(0, policy=spec.name)
            note = trained_on_note(spec, cfg)
            if note:
                notes.append(note)
            tokenizer = load_tokenizer(spec.folder, trust_remote_code=cfg.trust_remote_code)
            template, source = chat_template_for(cfg, tokenizer, scorer)
            chat = ChatFormat(
                tokenizer,
                template,
                template_kwargs=chat_template_kwargs_for(cfg, tokenizer, scorer, spec.folder),
            )
            sampling = SamplingConfig(
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                stop_token_ids=stop_token_ids(chat, tokenizer, cfg.stop_token),
            )
            engine = load_engine(
                spec.folder,
                chat.pad_token_id,
                rollout_engine=cfg.rollout_engine,
                bf16=cfg.bf16,
                max_len=cfg.turns * (cfg.max_prompt_len + cfg.max_new_tokens),  # a second turn's prompt
                seed=cfg.seed,
                device=device,
                trust_remote_code=cfg.trust_remote_code,
            )
            t0 = time.perf_counter()
            generations = generate_responses(
                engine,
                tokenizer,
                chat,
                prompts,
                sampling,
                num_samples=cfg.num_samples,
                turns=cfg.turns,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                max_prompt_len=cfg.max_prompt_len,
                long_prompts=cfg.long_prompts,
                device=device,
                on_batch=lambda n, tokens, name=spec.name: bar.update(n, tokens=tokens, policy=name),
            )
            time_generation = time.perf_counter() - t0
            close_engine(engine)
            del engine
            _free_memory()
            responses_file = f"responses/{spec.name}.jsonl"
            _write_responses(out / responses_file, generations)  # unscored: a failing scorer keeps them

            t0 = time.perf_counter()
            items = [
                ScoringItem(g.messages, g.response, g.prompt_ids, g.response_ids, g.has_eos)
                for g in generations
            ]
            direct = None
            if rm:
                direct = scorer.reads_policy_ids(tokenizer, chat)
                scores = scorer.score(items, cfg.batch_size, direct=direct)
            else:
                scores = scorer.score(items)
            for i, g in enumerate(generations):
                g.score = scores.score[i]
                if rm:
                    g.normalized_reward = scores.normalized_reward[i]
                    g.num_segments = scores.num_segments[i]
                    g.scored_tokens = scores.scored_tokens[i]
            time_scoring = time.perf_counter() - t0

            choices = _choices(prompts, generations, cfg.num_samples)
            exports = write_exports(
                out,
                spec.name,
                prompts,
                choices,
                turns=cfg.turns,
                token_len=counter
                or (lambda text, tok=tokenizer: len(tok.encode(text, add_special_tokens=False))),
                seed=cfg.seed,
            )
            _write_responses(out / responses_file, generations)
            policies[spec.name] = _summarise(
                spec,
                generations,
                rm,
                chat_template_source=source,
                chat_template_kwargs=chat.template_kwargs or None,
                scored_as_generated=direct,
                sampling=sampling.describe(),
                exports=exports,
                responses_file=responses_file,
                time_generation_s=time_generation,
                time_scoring_s=time_scoring,
            )
    _add_win_rates(policies, baseline, rm)

    plot = None
    if cfg.plot:
        panels = {"score": {n: p.scores for n, p in policies.items()}}
        if rm:
            panels = {
                "RM score": panels["score"],
                "PPO reward": {n: [g.normalized_reward for g in p.generations] for n, p in policies.items()},
            }
        path = plot_score_distributions(out / "score_distributions.png", panels, title=f"{cfg.prompts}")
        if path is None:
            notes.append(MATPLOTLIB_MISSING)
        else:
            plot = path.name

    results = EvalResults(
        config=cfg,
        policies=policies,
        baseline=baseline,
        scorer=scorer.describe(),
        prompts={
            "source": cfg.prompts,
            "split": cfg.split,
            "count": len(prompts),
            "layout": report.layout,
            "skipped": report.skipped,
        },
        output_dir=out,
        plot=plot,
        notes=notes,
        token_len_counter=token_len_counter,
    )
    results.time_s = time.perf_counter() - start
    atomic_write_json(results.results_file, results.to_dict())
    return results


def _write_responses(path: Path, generations: list[Generation]) -> None:
    atomic_write_text(path, "".join(json.dumps(g.to_dict(), ensure_ascii=False) + "\n" for g in generations))


def _choices(
    prompts: list[EvalPrompt], generations: list[Generation], num_samples: int
) -> list[list[list[str]]]:
    """choices[i][s] = the turn texts of sample s on prompt i (generations are prompt-major)."""
    return [[generations[i * num_samples + s].turns for s in range(num_samples)] for i in range(len(prompts))]
